"""The one fetcher of image URIs (catalog images for ingest, URL queries of the search service,
catalog images the search service shows, training images): ``file://``, ``http(s)://`` and
``s3://``, each guarded where it may lead and how much it may read.

http(s)://
- The URI is parsed once, with urllib3's parser (the one the connection is made from, so no
  second parser can read another host out of it); user info (``user@``) and anything but a
  plain host and port in the authority are refused.
- The host is resolved once, within what is left of ``total_timeout`` (the lookup runs on a
  small pool of resolver threads; a resolver that hangs costs one of them, never the caller);
  every address must be globally routable (no loopback, private,
  link-local, shared 100.64.0.0/10, multicast, reserved, NAT64/6to4 forms of those) unless
  ``allow_private`` or ``allow_networks`` say otherwise; the connection is made to the
  address that was checked (Host header and TLS server name stay the name), so a second
  resolution (DNS rebinding) cannot lead elsewhere.
- Redirects are followed for ``max_redirects`` hops, each checked like the first URI.
- Proxy environment variables are ignored (the connection goes where it was checked).
- Timeouts: ``connect_timeout`` and ``read_timeout`` per socket operation, and
  ``total_timeout`` for the whole fetch at the socket level (a watchdog closes the
  connection), so a host that sends a byte every few seconds is cut off.
- At most ``max_bytes`` are read, whatever the Content-Length says; compressed transfer
  encodings are not accepted (the bytes read are the bytes kept).
- Retries with backoff for transient errors (connection failures, timeouts, 429, 5xx),
  within the total deadline.

file://
- Only under ``file_roots`` (``None``: anywhere; ``()``: nowhere), judged on the resolved path
  (no symlink escapes) and again on the file actually opened; regular files only (opened
  non-blocking, so a FIFO or a device is refused, never read); at most ``max_bytes``.

s3://
- An object of an S3-compatible store (the endpoint and credentials from the process's AWS
  settings, :mod:`vsearch.core.objects`); at most ``max_bytes``; only where ``schemes`` has it.

A permanent problem (missing file, 404, too large, a refused address) raises
:class:`FetchError` at once; a transient one still failing after the retries raises it with
``transient=True``. The message (``str(exc)``) is for the operator (logs, dead-letter
headers); ``exc.public`` says as much as a remote client may know (nothing of what answered
inside the network). Callers decide what a failure means (ingest dead-letters the event; the
search service answers 400 or 413). :meth:`Fetcher.fetch` raises nothing but ``FetchError``.

    fetcher = Fetcher(FetchConfig(max_bytes=5_000_000))
    data = fetcher.fetch("https://cdn.example.com/shoe-123.jpg")
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import ipaddress
import os
import socket
import stat
import threading
import time
import urllib.parse
import urllib.request
from concurrent import futures
from pathlib import Path
from typing import Sequence

import urllib3
from botocore.exceptions import BotoCoreError, ClientError
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationParseError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util import Timeout, parse_url

from .config import csv_list
from .images import DEFAULT_MAX_BYTES
from .objects import s3_client, split_s3, unavailable_errors

PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 414, 451}
RETRY_HTTP = (429, 500, 502, 503, 504)
REDIRECT_HTTP = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024
MAX_URI_CHARS = 8192
POOLS = 64                            # pinned connection pools kept (one per scheme, address, port, host)
# Address ranges that are never "global" even where Python's is_global says so, or that
# embed an IPv4 address (NAT64, 6to4) which is checked in turn.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")
_SHARED = ipaddress.ip_network("100.64.0.0/10")


class FetchError(Exception):
    """The image at a URI cannot be had; the message says why. ``transient``: it may work
    later (a host that kept failing); ``too_large``: over the size limit; ``public``: what a
    remote client may be told."""

    def __init__(self, reason: str, *, transient: bool = False, too_large: bool = False,
                 public: str | None = None):
        super().__init__(reason)
        self.transient = transient
        self.too_large = too_large
        self.public = public or ("the image is over the size limit" if too_large
                                 else "the image could not be fetched")


class Refused(FetchError):
    """The URI leads somewhere this fetcher may not go (scheme, host, address, folder)."""

    def __init__(self, reason: str):
        super().__init__(reason, public="the URI is not allowed here")


@dataclasses.dataclass(frozen=True)
class FetchConfig:
    connect_timeout: float = 3.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0        # seconds for one fetch, redirects and retries included
    max_bytes: int = DEFAULT_MAX_BYTES
    retries: int = 3                   # extra attempts after the first, for transient errors
    backoff: float = 0.2               # seconds, doubled per attempt
    workers: int = 8                   # parallel fetches in fetch_many
    schemes: tuple[str, ...] = ("file", "http", "https")
    allow_private: bool = False        # http(s) to any address (loopback, private, link-local...)
    allow_networks: tuple[str, ...] = ()   # CIDRs allowed besides the global ones, e.g. "10.1.0.0/16"
    max_redirects: int = 3             # every hop is checked like the first URI (0: none)
    file_roots: tuple[Path, ...] | None = None   # file:// only under these folders (None: any, (): none)


def parse_networks(text: str) -> tuple[str, ...]:
    """``"10.0.0.0/8, fd00::/8"`` -> the CIDRs, each checked (``ValueError`` naming a bad one)."""
    out = csv_list(text)
    for net in out:
        ipaddress.ip_network(net, strict=False)
    return out


def address_is_global(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` is a globally routable unicast address (and, for the IPv6 forms that
    carry an IPv4 address, whether that one is)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return address_is_global(ip.ipv4_mapped)
        if ip in _NAT64:
            return address_is_global(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in _NAT64_LOCAL:
            return False
        if ip in _SIXTOFOUR:
            return address_is_global(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))
        if ip.teredo is not None:
            return False
    elif ip in _SHARED:
        return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved and not ip.is_unspecified


class _Registry(threading.local):
    """The connections the current thread's fetch uses, for its watchdog to cut off."""
    conns: list | None = None


_registry = _Registry()


class _Tracked:
    def request(self, *args, **kwargs):
        if _registry.conns is not None:
            _registry.conns.append(self)
        return super().request(*args, **kwargs)


class _HTTPConnection(_Tracked, HTTPConnection):
    pass


class _HTTPSConnection(_Tracked, HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _short(uri: str) -> str:
    return repr(uri[:120]) if len(uri) <= 120 else repr(uri[:120]) + "..."


class Fetcher:
    def __init__(self, config: FetchConfig | None = None):
        self.config = cfg = config or FetchConfig()
        self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in cfg.allow_networks)
        self._roots = None if cfg.file_roots is None else tuple(
            Path(os.path.realpath(r)) for r in cfg.file_roots)
        self._pools: collections.OrderedDict[tuple, urllib3.HTTPConnectionPool] = collections.OrderedDict()
        self._pools_lock = threading.Lock()
        self._pool = futures.ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="fetch")

    def fetch(self, uri: str) -> bytes:
        """The bytes at ``uri``; raises :class:`FetchError` (only) with a reason."""
        try:
            return self._fetch(uri)
        except FetchError:
            raise
        except Exception as exc:  # noqa: BLE001  (a parser or library error must not escape as another kind)
            raise FetchError(f"cannot fetch {_short(str(uri))}: {type(exc).__name__}: {str(exc)[:200]}") from exc

    def _fetch(self, uri: str) -> bytes:
        if not isinstance(uri, str):
            raise Refused(f"a URI must be a string, got {type(uri).__name__}")
        scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
        if scheme not in self.config.schemes:
            raise Refused(f"unsupported URI scheme in {_short(uri)}: expected "
                          f"{', '.join(s + '://' for s in self.config.schemes)}")
        check_uri_text(uri)
        if scheme == "file":
            return self._file(uri)
        if scheme == "s3":
            return self._s3(uri)
        return self._http(uri)

    def fetch_many(self, uris: Sequence[str]) -> list[bytes | FetchError]:
        """Fetch in parallel; each item is its bytes or the :class:`FetchError`. Local files
        are read on the calling thread while the network fetches run on the pool (a local
        read is a few system calls: handing it to a thread costs more than it saves, 96 vs
        260-344 microseconds a file here)."""
        def one(u):
            try:
                return self.fetch(u)
            except FetchError as exc:
                return exc
        local = [isinstance(u, str) and u[:7].lower() == "file://" for u in uris]
        remote = [u for u, here in zip(uris, local) if not here]
        fetched = self._pool.map(one, remote) if remote else iter(())   # submitted at once, read in order
        # the pool's fetches are under way while the local files are read here
        out = [one(u) if here else None for u, here in zip(uris, local)]
        return [got if here else next(fetched) for got, here in zip(out, local)]

    # --- file:// ----------------------------------------------------------------------------

    def _file(self, uri: str) -> bytes:
        parsed = urllib.parse.urlsplit(uri)
        if parsed.netloc not in ("", "localhost"):
            raise Refused(f"file URI with a host ({parsed.netloc[:80]!r}) is not readable here: {_short(uri)}")
        if self._roots is not None and not self._roots:
            raise Refused(f"file:// URIs are not read here (no folders are configured): {_short(uri)}")
        path = urllib.request.url2pathname(parsed.path)
        if "\x00" in path or not path.startswith("/"):
            raise Refused(f"{_short(uri)} is not an absolute file path")
        real = os.path.realpath(path)
        self._check_root(real, uri)
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
        try:
            fd = os.open(real, flags)
        except FileNotFoundError as exc:
            raise FetchError(f"no such file: {path}") from exc
        except PermissionError as exc:
            raise FetchError(f"cannot read {path}: permission denied") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Refused(f"{path} changed into a symbolic link while being opened") from exc
            raise FetchError(f"cannot open {path}: {exc.strerror}", transient=exc.errno in (
                errno.EIO, errno.EAGAIN, errno.EMFILE, errno.ENFILE, errno.ESTALE)) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Refused(f"{path} is not a regular file")
            opened = f"/proc/self/fd/{fd}"
            if os.path.exists(opened):                       # what was opened, not what was asked
                self._check_root(os.readlink(opened), uri)
            if st.st_size > self.config.max_bytes:
                raise FetchError(f"{_short(uri)} is {st.st_size} bytes; the limit is {self.config.max_bytes}",
                                 too_large=True)
            chunks, total = [], 0
            while True:
                chunk = os.read(fd, min(CHUNK, self.config.max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > self.config.max_bytes:
                    raise FetchError(f"{_short(uri)} is larger than the limit of {self.config.max_bytes} bytes",
                                     too_large=True)
            return b"".join(chunks)
        except OSError as exc:
            raise FetchError(f"cannot read {path}: {exc.strerror}", transient=True) from exc
        finally:
            os.close(fd)

    def _check_root(self, real: str, uri: str) -> None:
        if self._roots is None:
            return
        if not any(Path(real).is_relative_to(r) for r in self._roots):
            raise Refused(f"{_short(uri)} lies outside the folders this service may read")

    # --- s3:// ------------------------------------------------------------------------------

    def _s3(self, uri: str) -> bytes:
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

    def _target(self, uri: str, deadline: float):
        """``(scheme, host, port, request path, address)`` of an http(s) URI, every check done:
        one parse (urllib3's, the one the request is made from), no user info, a valid host
        name, resolved once before ``deadline`` (a ``time.monotonic()``), every address allowed."""
        try:
            url = parse_url(uri)
        except (LocationParseError, ValueError) as exc:
            raise Refused(f"{_short(uri)} is not a valid URL") from exc
        scheme = (url.scheme or "").lower()
        if scheme not in ("http", "https") or scheme not in self.config.schemes:
            raise Refused(f"{_short(uri)}: only {', '.join(s for s in self.config.schemes if s != 'file')} "
                          "URLs are fetched")
        if url.auth is not None:
            raise Refused(f"{_short(uri)}: URLs with user info (user@host) are refused")
        raw_authority = uri.split("//", 1)[1].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0] \
            if "//" in uri else ""
        if any(c in raw_authority for c in "\\@%") or not url.host:
            raise Refused(f"{_short(uri)}: the URL's authority must be a plain host[:port]")
        host = url.host.strip("[]")
        port = url.port or (443 if scheme == "https" else 80)
        try:
            ip = ipaddress.ip_address(host)
            addresses = [ip]
        except ValueError:
            try:
                ascii_host = host.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise Refused(f"{_short(uri)}: {host[:80]!r} is not a valid host name") from exc
            infos = _resolve(ascii_host, port, deadline)
            addresses = list(dict.fromkeys(ipaddress.ip_address(i[4][0].split("%", 1)[0]) for i in infos))
            host = ascii_host
        for ip in addresses:
            if not self._allowed(ip):
                raise Refused(f"host {host[:80]!r} is not a public address ({ip}): refused")
        path = url.request_uri or "/"
        return scheme, host, port, path, addresses

    def _allowed(self, ip) -> bool:
        if self.config.allow_private:
            return True
        if any(ip.version == n.version and ip in n for n in self._networks):
            return True
        return address_is_global(ip)

    def _pool_for(self, scheme: str, host: str, port: int, ip) -> urllib3.HTTPConnectionPool:
        key = (scheme, str(ip), port, host)
        with self._pools_lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            kwargs = dict(maxsize=max(1, self.config.workers), block=False, retries=False)
            if scheme == "https":
                pool = _HTTPSPool(str(ip), port, server_hostname=host, assert_hostname=host,
                                  cert_reqs="CERT_REQUIRED", **kwargs)
            else:
                pool = _HTTPPool(str(ip), port, **kwargs)
            self._pools[key] = pool
            while len(self._pools) > POOLS:
                _, old = self._pools.popitem(last=False)
                old.close()
            return pool

    def _http(self, uri: str) -> bytes:
        cfg = self.config
        deadline = time.monotonic() + cfg.total_timeout
        conns: list = []
        expired = threading.Event()

        def cut_off():
            expired.set()
            for conn in list(conns):
                sock = getattr(conn, "sock", None)
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        watchdog = threading.Timer(cfg.total_timeout, cut_off)
        watchdog.daemon = True
        watchdog.start()
        _registry.conns = conns
        try:
            for _hop in range(cfg.max_redirects + 1):
                result = self._hop(uri, deadline, expired)
                if isinstance(result, bytes):
                    return result
                uri = result                         # a redirect: checked like the first URI
            raise FetchError(f"GET {_short(uri)}: more than {cfg.max_redirects} redirects")
        finally:
            _registry.conns = None
            watchdog.cancel()

    def _hop(self, uri: str, deadline: float, expired: threading.Event) -> bytes | str:
        """One URI: its bytes, or the next URI of a redirect."""
        cfg = self.config
        scheme, host, port, path, addresses = self._target(uri, deadline)
        default_port = 443 if scheme == "https" else 80
        headers = {"Host": host if port == default_port else f"{host}:{port}",
                   "User-Agent": "vsearch-fetch/1", "Accept": "image/*,*/*;q=0.5",
                   "Accept-Encoding": "identity"}
        delay, last = cfg.backoff, None
        for attempt in range(cfg.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or expired.is_set():
                break
            if attempt:
                time.sleep(min(delay, max(0.0, remaining - 0.05)))
                delay *= 2
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
            ip = addresses[attempt % len(addresses)]
            pool = self._pool_for(scheme, host, port, ip)
            timeout = Timeout(connect=min(cfg.connect_timeout, remaining), read=min(cfg.read_timeout, remaining))
            try:
                r = pool.urlopen("GET", path, headers=headers, redirect=False, retries=False,
                                 preload_content=False, decode_content=False, timeout=timeout,
                                 assert_same_host=False)
            except (ConnectTimeoutError, NewConnectionError) as exc:
                last = FetchError(f"GET {_short(uri)} failed to connect", transient=True)
                last.__cause__ = exc
                continue
            except (ReadTimeoutError, ProtocolError, OSError) as exc:
                if expired.is_set():
                    break
                last = FetchError(f"GET {_short(uri)} failed: {type(exc).__name__}", transient=True)
                last.__cause__ = exc
                continue
            except SSLError as exc:
                raise FetchError(f"GET {_short(uri)}: TLS failed ({str(exc)[:120]})") from exc
            except HTTPError as exc:
                raise FetchError(f"GET {_short(uri)} failed: {type(exc).__name__}") from exc
            done = False
            try:
                if r.status in REDIRECT_HTTP and r.headers.get("location"):
                    if not cfg.max_redirects:
                        raise FetchError(f"GET {_short(uri)} answered a redirect; redirects are not followed")
                    return urllib.parse.urljoin(uri, r.headers["location"])
                if r.status in RETRY_HTTP:
                    last = FetchError(f"GET {_short(uri)} answered {r.status} (gave up after "
                                      f"{attempt + 1} attempts)", transient=True)
                    retry_after = r.headers.get("retry-after", "")
                    if retry_after.isdigit():
                        delay = max(delay, min(float(retry_after), 10.0))
                    continue
                if r.status != 200:
                    raise FetchError(f"GET {_short(uri)} answered {r.status}")
                data = self._body(r, uri, deadline, expired)
                done = True
                return data
            except (ReadTimeoutError, ProtocolError, OSError) as exc:
                if expired.is_set():
                    break
                last = FetchError(f"GET {_short(uri)}: reading the body failed ({type(exc).__name__})",
                                  transient=True)
                last.__cause__ = exc
            finally:
                if not done:                         # an unread or broken body: never reused
                    r.close()
                r.release_conn()
        if expired.is_set() or deadline - time.monotonic() <= 0:
            raise FetchError(f"GET {_short(uri)} took longer than {cfg.total_timeout:g}s", transient=True)
        raise last or FetchError(f"GET {_short(uri)} failed", transient=True)

    def _body(self, r, uri: str, deadline: float, expired: threading.Event) -> bytes:
        cfg = self.config
        encoding = (r.headers.get("content-encoding") or "identity").strip().lower()
        if encoding not in ("identity", ""):
            raise FetchError(f"GET {_short(uri)} sent a {encoding!r}-encoded body; only identity is accepted")
        declared = r.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cfg.max_bytes:
            raise FetchError(f"{_short(uri)} is {declared} bytes; the limit is {cfg.max_bytes}", too_large=True)
        chunks, total = [], 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or expired.is_set():
                raise FetchError(f"GET {_short(uri)} took longer than {cfg.total_timeout:g}s", transient=True)
            conn = r.connection
            if conn is not None and getattr(conn, "sock", None) is not None:
                conn.sock.settimeout(max(0.01, min(cfg.read_timeout, remaining)))
            chunk = r.read1(CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > cfg.max_bytes:
                raise FetchError(f"{_short(uri)} is larger than the limit of {cfg.max_bytes} bytes",
                                 too_large=True)
            chunks.append(chunk)
        if expired.is_set():
            raise FetchError(f"GET {_short(uri)} took longer than {cfg.total_timeout:g}s", transient=True)
        return b"".join(chunks)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        with self._pools_lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()


# Name lookups run here, so that one can be abandoned at the fetch's deadline (getaddrinfo
# cannot be interrupted). A hung resolver holds one of these threads until it answers; when
# all are held, further lookups wait their turn and time out with the same reason.
_RESOLVERS = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fetch-dns")


def _resolve(host: str, port: int, deadline: float) -> list:
    """``socket.getaddrinfo`` of ``host`` for TCP, or :class:`FetchError` (transient) when it
    fails or has not answered by ``deadline``."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchError(f"no time left to resolve host {host[:80]!r}", transient=True)
    lookup = _RESOLVERS.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM,
                               proto=socket.IPPROTO_TCP)
    try:
        return lookup.result(timeout=remaining)
    except futures.TimeoutError as exc:
        lookup.cancel()
        raise FetchError(f"host {host[:80]!r} did not resolve within {remaining:.3g}s",
                         transient=True) from exc
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise FetchError(f"host {host[:80]!r} does not resolve", transient=True) from exc


def check_uri_text(uri) -> str:
    """A URI as text a fetch can carry: a string without control characters, whitespace or
    lone surrogates, of at most :data:`MAX_URI_CHARS` characters; :class:`Refused` otherwise.
    (The catalog event schema checks the same before an event is accepted.)"""
    if not isinstance(uri, str):
        raise Refused(f"a URI must be a string, got {type(uri).__name__}")
    if len(uri) > MAX_URI_CHARS:
        raise Refused(f"URI longer than {MAX_URI_CHARS} characters")
    bad = next((c for c in uri if ord(c) < 0x21 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF
                or 0x80 <= ord(c) <= 0x9F), None)
    if bad is not None:
        raise Refused(f"URI contains the character U+{ord(bad):04X} (control, space or lone surrogate): "
                      "percent-encode it")
    return uri
