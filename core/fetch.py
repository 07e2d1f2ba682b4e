"""The one fetcher of image URIs (catalog images for ingest, URL queries of the search service,
training images): ``file://``, ``http(s)://`` and ``s3://`` with timeouts, a size limit on the
bytes actually read, retries with backoff for transient errors (urllib3's ``Retry`` on the adapter:
connection failures, timeouts, 429 and 5xx), and the checks of where a URI may lead.

A permanent problem (missing file, 404, too large, a refused address) raises
:class:`FetchError` at once; a transient one still failing after the retries raises it with
``transient=True``. Callers decide what that means (ingest dead-letters the event; the search
service answers 400 or 413).

    fetcher = Fetcher(FetchConfig(max_bytes=5_000_000, allow_private=False))
    data = fetcher.fetch("https://cdn.example.com/shoe-123.jpg")
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import stat
import time
import urllib.parse
import urllib.request
from concurrent import futures
from pathlib import Path
from typing import Sequence

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ReadTimeoutError
from urllib3.util.retry import Retry

PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 414, 451}
RETRY_HTTP = (429, 500, 502, 503, 504)
CHUNK = 64 * 1024


class FetchError(Exception):
    """The image at a URI cannot be had; the message says why. ``transient``: it may work
    later (a host that kept failing); ``too_large``: over the size limit."""

    def __init__(self, reason: str, *, transient: bool = False, too_large: bool = False):
        super().__init__(reason)
        self.transient = transient
        self.too_large = too_large


@dataclasses.dataclass(frozen=True)
class FetchConfig:
    connect_timeout: float = 3.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0        # seconds for one fetch, retries included
    max_bytes: int = 20 * 1024 * 1024
    retries: int = 3                   # extra attempts after the first, for transient errors
    backoff: float = 0.2               # seconds, doubled per attempt
    workers: int = 8                   # parallel fetches in fetch_many
    schemes: tuple[str, ...] = ("file", "http", "https")
    allow_private: bool = True         # http(s) to private, loopback, link-local addresses
    max_redirects: int = 3             # every hop is checked like the first URI (0: none)
    file_roots: tuple[Path, ...] | None = None   # file:// only under these folders (None: any)


def _address_is_public(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global


class Fetcher:
    def __init__(self, config: FetchConfig | None = None):
        self.config = cfg = config or FetchConfig()
        self._session = requests.Session()
        retry = Retry(total=cfg.retries, connect=cfg.retries, read=cfg.retries, status=cfg.retries,
                      backoff_factor=cfg.backoff, status_forcelist=RETRY_HTTP,
                      allowed_methods=frozenset({"GET"}), raise_on_status=False, redirect=False,
                      respect_retry_after_header=True)
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(1, cfg.workers), max_retries=retry)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._pool = futures.ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="fetch")

    def fetch(self, uri: str) -> bytes:
        """The bytes at ``uri``; raises :class:`FetchError` with a reason."""
        if not isinstance(uri, str):
            raise FetchError(f"a URI must be a string, got {type(uri).__name__}")
        scheme = urllib.parse.urlsplit(uri).scheme.lower()
        if scheme not in self.config.schemes:
            raise FetchError(f"unsupported URI scheme in {uri[:120]!r}: expected "
                             f"{', '.join(s + '://' for s in self.config.schemes)}")
        if scheme == "file":
            return self._file(uri)
        if scheme == "s3":
            return self._s3(uri)
        return self._http(uri)

    def fetch_many(self, uris: Sequence[str]) -> list[bytes | FetchError]:
        """Fetch in parallel; each item is its bytes or the :class:`FetchError`."""
        def one(u):
            try:
                return self.fetch(u)
            except FetchError as exc:
                return exc
        return list(self._pool.map(one, uris))

    # --- file:// ----------------------------------------------------------------------------

    def _file(self, uri: str) -> bytes:
        parsed = urllib.parse.urlsplit(uri)
        if parsed.netloc not in ("", "localhost"):
            raise FetchError(f"file URI with a host ({parsed.netloc!r}) is not readable here: {uri[:120]}")
        path = Path(urllib.request.url2pathname(parsed.path))
        roots = self.config.file_roots
        if roots is not None:
            real = path.resolve()
            if not any(real.is_relative_to(r) for r in roots):
                raise FetchError(f"{uri[:120]} lies outside the folders this service may read")
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise FetchError(f"{path} is not a regular file")
            if st.st_size > self.config.max_bytes:
                raise FetchError(f"{uri[:120]} is {st.st_size} bytes; the limit is {self.config.max_bytes}",
                                 too_large=True)
            with open(path, "rb") as fh:
                data = fh.read(self.config.max_bytes + 1)
        except FileNotFoundError as exc:
            raise FetchError(f"no such file: {path}") from exc
        except PermissionError as exc:
            raise FetchError(f"cannot read {path}: permission denied") from exc
        except OSError as exc:
            raise FetchError(f"cannot read {path}: {exc}", transient=True) from exc
        if len(data) > self.config.max_bytes:
            raise FetchError(f"{uri[:120]} is larger than the limit of {self.config.max_bytes} bytes",
                             too_large=True)
        return data

    # --- s3:// ------------------------------------------------------------------------------

    def _s3(self, uri: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        from .objects import s3_client, split_s3, unavailable_errors
        cfg = self.config
        try:
            bucket, key = split_s3(uri)
            obj = s3_client(cfg.connect_timeout, cfg.read_timeout).get_object(Bucket=bucket, Key=key)
            if int(obj.get("ContentLength") or 0) > cfg.max_bytes:
                raise FetchError(f"{uri[:120]} is {obj['ContentLength']} bytes; the limit is {cfg.max_bytes}",
                                 too_large=True)
            data = obj["Body"].read(cfg.max_bytes + 1)
        except ValueError as exc:
            raise FetchError(str(exc)) from exc
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            raise FetchError(f"GET {uri[:120]} answered {code or status}",
                             transient=status == 429 or status >= 500) from exc
        except unavailable_errors() as exc:
            raise FetchError(f"GET {uri[:120]}: the object store did not answer", transient=True) from exc
        except BotoCoreError as exc:
            raise FetchError(f"GET {uri[:120]} failed: {type(exc).__name__}") from exc
        if len(data) > cfg.max_bytes:
            raise FetchError(f"{uri[:120]} is larger than the limit of {cfg.max_bytes} bytes", too_large=True)
        return data

    # --- http(s):// ---------------------------------------------------------------------------

    def _check_host(self, uri: str) -> None:
        parsed = urllib.parse.urlsplit(uri)
        if not parsed.hostname:
            raise FetchError(f"{uri[:120]!r} has no host")
        if self.config.allow_private:
            return
        try:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            infos = socket.getaddrinfo(parsed.hostname, port, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, ValueError, UnicodeError) as exc:
            raise FetchError(f"host {parsed.hostname[:80]!r} does not resolve") from exc
        if any(not _address_is_public(info[4][0]) for info in infos):
            raise FetchError(f"host {parsed.hostname[:80]!r} is not a public address: refused")

    def _http(self, uri: str) -> bytes:
        cfg = self.config
        deadline = time.monotonic() + cfg.total_timeout
        for _hop in range(cfg.max_redirects + 1):
            self._check_host(uri)
            try:
                with self._session.get(uri, stream=True, allow_redirects=False,
                                       timeout=(cfg.connect_timeout, cfg.read_timeout)) as r:
                    if r.is_redirect and r.headers.get("location"):
                        uri = urllib.parse.urljoin(uri, r.headers["location"])
                        if urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
                            raise FetchError("redirected to a URI that is not http(s)")
                        continue
                    return self._body(r, uri, deadline)
            except requests.Timeout as exc:
                raise FetchError(f"GET {uri[:120]} timed out", transient=True) from exc
            except requests.ConnectionError as exc:
                if exc.args and isinstance(exc.args[0], ReadTimeoutError):     # while reading the body
                    raise FetchError(f"GET {uri[:120]} timed out", transient=True) from exc
                raise FetchError(f"GET {uri[:120]} failed to connect", transient=True) from exc
            except requests.RequestException as exc:
                raise FetchError(f"GET {uri[:120]} failed: {type(exc).__name__}") from exc
        raise FetchError(f"GET {uri[:120]}: more than {cfg.max_redirects} redirects")

    def _body(self, r: requests.Response, uri: str, deadline: float) -> bytes:
        cfg = self.config
        if r.status_code in PERMANENT_HTTP:
            raise FetchError(f"GET {uri[:120]} answered {r.status_code}")
        if r.status_code in RETRY_HTTP:
            raise FetchError(f"GET {uri[:120]} answered {r.status_code} (gave up after "
                             f"{cfg.retries + 1} attempts)", transient=True)
        if r.status_code != 200:
            raise FetchError(f"GET {uri[:120]} answered {r.status_code}")
        declared = r.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_bytes:
            raise FetchError(f"{uri[:120]} is {declared} bytes; the limit is {cfg.max_bytes}", too_large=True)
        chunks, total = [], 0
        for chunk in r.iter_content(CHUNK):
            total += len(chunk)
            if total > cfg.max_bytes:
                raise FetchError(f"{uri[:120]} is larger than the limit of {cfg.max_bytes} bytes",
                                 too_large=True)
            if time.monotonic() > deadline:
                raise FetchError(f"GET {uri[:120]} took longer than {cfg.total_timeout:.0f}s", transient=True)
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._session.close()
