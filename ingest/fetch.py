"""Image fetch for catalog events: ``file://`` and ``http(s)://`` with connect/read timeouts,
a size limit and retries with backoff for transient errors (connection failures, timeouts,
429 and 5xx). A permanent problem (missing file, 404, too large) raises :class:`FetchError`
at once; a transient one still failing after the retries raises :class:`FetchError` too
(``transient=True``), so one dead image host cannot stall the whole topic: the event goes to
the dead-letter topic with the reason and can be replayed from there."""

from __future__ import annotations

import dataclasses
import logging
import time
import urllib.parse
import urllib.request
from concurrent import futures
from pathlib import Path
from typing import Sequence

import requests

log = logging.getLogger(__name__)

PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 414, 451}


class FetchError(Exception):
    def __init__(self, reason: str, transient: bool = False):
        super().__init__(reason)
        self.transient = transient


@dataclasses.dataclass
class FetchConfig:
    connect_timeout: float = 3.0
    read_timeout: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    retries: int = 3                 # extra attempts after the first, for transient errors
    backoff: float = 0.2             # seconds, doubled per attempt
    workers: int = 8                 # parallel fetches


class Fetcher:
    def __init__(self, config: FetchConfig | None = None):
        self.config = config or FetchConfig()
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=self.config.workers)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._pool = futures.ThreadPoolExecutor(max_workers=self.config.workers,
                                                thread_name_prefix="fetch")

    def fetch(self, uri: str) -> bytes:
        """The bytes at ``uri``; raises :class:`FetchError` with a reason."""
        if uri.startswith("file://"):
            return self._file(uri)
        if uri.startswith(("http://", "https://")):
            return self._http_with_retries(uri)
        raise FetchError(f"unsupported URI scheme in {uri[:120]!r} (file://, http://, https://)")

    def fetch_many(self, uris: Sequence[str]) -> list[bytes | FetchError]:
        """Fetch in parallel; each item is its bytes or the :class:`FetchError`."""
        def one(u):
            try:
                return self.fetch(u)
            except FetchError as exc:
                return exc
        return list(self._pool.map(one, uris))

    def _file(self, uri: str) -> bytes:
        parsed = urllib.parse.urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise FetchError(f"file URI with a host ({parsed.netloc!r}) is not readable here: {uri[:120]}")
        path = Path(urllib.request.url2pathname(parsed.path))
        if path.is_dir():
            raise FetchError(f"{path} is a directory, not an image file")
        try:
            size = path.stat().st_size
            if size > self.config.max_bytes:
                raise FetchError(f"{uri[:120]} is {size} bytes; the limit is {self.config.max_bytes}")
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise FetchError(f"no such file: {path}") from exc
        except IsADirectoryError as exc:
            raise FetchError(f"{path} is a directory, not an image file") from exc
        except PermissionError as exc:
            raise FetchError(f"cannot read {path}: permission denied") from exc
        except OSError as exc:
            raise FetchError(f"cannot read {path}: {exc}", transient=True) from exc

    def _http_with_retries(self, uri: str) -> bytes:
        delay = self.config.backoff
        last: FetchError | None = None
        for attempt in range(self.config.retries + 1):
            try:
                return self._http(uri)
            except FetchError as exc:
                if not exc.transient:
                    raise
                last = exc
                if attempt < self.config.retries:
                    time.sleep(delay)
                    delay *= 2
        raise FetchError(f"{last} (gave up after {self.config.retries + 1} attempts)", transient=True)

    def _http(self, uri: str) -> bytes:
        cfg = self.config
        try:
            with self._session.get(uri, stream=True, timeout=(cfg.connect_timeout, cfg.read_timeout)) as r:
                if r.status_code in PERMANENT_HTTP:
                    raise FetchError(f"GET {uri[:120]} answered {r.status_code}")
                if r.status_code == 429 or r.status_code >= 500:
                    raise FetchError(f"GET {uri[:120]} answered {r.status_code}", transient=True)
                if r.status_code >= 300:
                    raise FetchError(f"GET {uri[:120]} answered {r.status_code}")
                declared = r.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > cfg.max_bytes:
                    raise FetchError(f"{uri[:120]} is {declared} bytes; the limit is {cfg.max_bytes}")
                chunks, total = [], 0
                for chunk in r.iter_content(64 * 1024):
                    total += len(chunk)
                    if total > cfg.max_bytes:
                        raise FetchError(f"{uri[:120]} is larger than the limit of {cfg.max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except requests.Timeout as exc:
            raise FetchError(f"GET {uri[:120]} timed out: {exc}", transient=True) from exc
        except requests.ConnectionError as exc:
            raise FetchError(f"GET {uri[:120]} failed to connect: {exc}", transient=True) from exc
        except requests.RequestException as exc:
            raise FetchError(f"GET {uri[:120]} failed: {exc}") from exc

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._session.close()
