"""Where the one fetcher may not go: SSRF attempts against local HTTP servers that record every
request that reached them, and file:// reads outside their bounds. A refused fetch must leave
the recorders empty."""

from __future__ import annotations

import http.server
import ipaddress
import os
import socket
import threading
import time

import pytest

from vsearch.core.fetch import FetchConfig, Fetcher, FetchError, Refused, address_is_global


class Recorder(http.server.ThreadingHTTPServer):
    """An HTTP server on a loopback address that records (path, Host header) of each request.
    ``routes``: path -> (status, headers, body) or a callable(handler)."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", routes: dict | None = None):
        self.seen: list[tuple[str, str]] = []
        self.routes = routes or {}
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                recorder.seen.append((self.path, self.headers.get("Host", "")))
                route = recorder.routes.get(self.path, (200, {}, b"IMAGE"))
                if callable(route):
                    return route(self)
                status, headers, body = route
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__((host, 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"

    @property
    def port(self) -> int:
        return self.server_address[1]


@pytest.fixture
def inside():
    """A server standing for something inside the network (127.0.0.1): nothing may reach it."""
    srv = Recorder("127.0.0.1")
    yield srv
    srv.shutdown()


@pytest.fixture
def outside():
    """A server standing for an allowed host: 127.0.0.2, the one network the fetchers allow."""
    srv = Recorder("127.0.0.2")
    yield srv
    srv.shutdown()


def guarded(**kwargs) -> Fetcher:
    cfg = dict(allow_networks=("127.0.0.2/32",), retries=0, connect_timeout=1, read_timeout=1,
               total_timeout=3)
    cfg.update(kwargs)
    return Fetcher(FetchConfig(**cfg))


@pytest.mark.parametrize("template", [
    "http://{inside}\\@{outside}/x.jpg",          # urlsplit reads the host after '@', urllib3 before '\'
    "http://{outside}@{inside}/x.jpg",            # user info
    "http://user:pw@{inside}/x.jpg",
    "http://{inside}%2f@{outside}/x.jpg",
    "http://{inside}/x.jpg",                       # plainly inside
    "http://localhost:{inside_port}/x.jpg",
    "http://[::ffff:127.0.0.1]:{inside_port}/x.jpg",
    "http://0x7f000001:{inside_port}/x.jpg",      # other spellings of 127.0.0.1 that resolvers accept
    "http://2130706433:{inside_port}/x.jpg",
    "http://127.1:{inside_port}/x.jpg",
])
def test_ssrf_tricks_never_reach_the_inside_server(template, inside, outside):
    url = template.format(inside=f"127.0.0.1:{inside.port}", outside=f"127.0.0.2:{outside.port}",
                          inside_port=inside.port)
    with guarded() as f:
        with pytest.raises(FetchError) as exc:
            f.fetch(url)
    assert inside.seen == [], f"{url} reached the inside server"
    assert "127.0.0.1" not in exc.value.public and "answered" not in exc.value.public


def test_the_allowed_host_is_fetched_with_its_name_in_the_host_header(outside):
    with guarded() as f:
        assert f.fetch(f"{outside.url}/ok.jpg") == b"IMAGE"
    assert outside.seen == [("/ok.jpg", f"127.0.0.2:{outside.port}")]


def test_the_name_is_resolved_once_and_the_checked_address_is_the_one_connected(monkeypatch, inside, outside):
    """DNS rebinding: the first answer is allowed (127.0.0.2), every later one points inside
    (127.0.0.1). The fetcher asks once and connects to the address it checked."""
    real = socket.getaddrinfo
    calls = []

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.test":
            calls.append(host)
            addr = "127.0.0.2" if len(calls) == 1 else "127.0.0.1"
            return real(addr, port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with guarded() as f:
        assert f.fetch(f"http://rebind.test:{outside.port}/a.jpg") == b"IMAGE"
        assert len(calls) == 1                       # one resolution for the whole fetch
        with pytest.raises(Refused):                 # the next fetch resolves anew: now inside
            f.fetch(f"http://rebind.test:{inside.port}/b.jpg")
    assert outside.seen == [("/a.jpg", f"rebind.test:{outside.port}")]
    assert inside.seen == []


def test_a_name_with_any_inside_address_is_refused(monkeypatch, inside):
    real = socket.getaddrinfo

    def two_answers(host, port, *args, **kwargs):
        if host == "mixed.test":
            return real("127.0.0.2", port, *args, **kwargs) + real("127.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", two_answers)
    with guarded() as f, pytest.raises(Refused, match="not a public address"):
        f.fetch(f"http://mixed.test:{inside.port}/x.jpg")
    assert inside.seen == []


def test_every_redirect_hop_is_checked(inside, outside):
    outside.routes["/to-inside"] = (302, {"Location": f"{inside.url}/secret"}, b"")
    outside.routes["/to-file"] = (302, {"Location": "file:///etc/passwd"}, b"")
    outside.routes["/to-userinfo"] = (307, {"Location": f"http://a@127.0.0.2:{outside.port}/ok"}, b"")
    outside.routes["/hop"] = (301, {"Location": "/ok"}, b"")
    with guarded() as f:
        for path in ("/to-inside", "/to-file", "/to-userinfo"):
            with pytest.raises(FetchError):
                f.fetch(outside.url + path)
        assert f.fetch(outside.url + "/hop") == b"IMAGE"
    with guarded(max_redirects=0) as f, pytest.raises(FetchError, match="redirects are not followed"):
        f.fetch(outside.url + "/hop")
    assert inside.seen == []


def test_proxy_variables_are_ignored(monkeypatch, inside, outside):
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(var, inside.url)
    with guarded() as f:
        assert f.fetch(f"{outside.url}/ok.jpg") == b"IMAGE"
    assert inside.seen == []


def test_a_host_that_trickles_is_cut_off_at_the_total_deadline(outside):
    def trickle(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        try:
            for _ in range(1000):
                handler.wfile.write(b"x")
                handler.wfile.flush()
                time.sleep(0.2)          # always within the read timeout, never done
        except OSError:
            pass

    def slow_headers(handler):
        try:
            handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for i in range(1000):
                handler.wfile.write(f"X-{i}: y\r\n".encode())
                handler.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass

    outside.routes["/trickle"] = trickle
    outside.routes["/slow-headers"] = slow_headers
    with guarded(total_timeout=1.5) as f:
        for path in ("/trickle", "/slow-headers"):
            start = time.monotonic()
            with pytest.raises(FetchError, match="longer than") as exc:
                f.fetch(outside.url + path)
            assert exc.value.transient
            assert time.monotonic() - start < 3.0


def test_a_resolver_that_hangs_is_abandoned_at_the_total_deadline(monkeypatch, outside):
    """getaddrinfo cannot be interrupted: the lookup is given up at the deadline and the fetch
    fails as transient. The fake resolver answers only after the fetch has returned, with an
    address that would be refused, so an unbounded lookup would fail this test with another
    reason (after 30 s), not pass it."""
    released = threading.Event()
    real = socket.getaddrinfo

    def hanging(host, *args, **kwargs):
        if host == "hangs.example":
            released.wait(30)
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    try:
        with guarded(total_timeout=0.5) as f:
            with pytest.raises(FetchError, match="did not resolve within") as exc:
                f.fetch("http://hangs.example/x.jpg")
            assert exc.value.transient
            assert f.fetch(f"{outside.url}/ok.jpg") == b"IMAGE"   # the next fetch is served
    finally:
        released.set()


def test_the_size_limit_holds_whatever_the_headers_say(outside):
    def lying(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "10")
        handler.end_headers()
        handler.wfile.write(b"x" * 5000)

    def chunked(handler):
        handler.protocol_version = "HTTP/1.1"
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for _ in range(10):
            handler.wfile.write(b"400\r\n" + b"y" * 1024 + b"\r\n")
        handler.wfile.write(b"0\r\n\r\n")

    outside.routes["/lying"] = lying
    outside.routes["/chunked"] = chunked
    outside.routes["/gzip"] = (200, {"Content-Encoding": "gzip"}, b"\x1f\x8b" + b"\0" * 20)
    with guarded(max_bytes=2000) as f:
        assert f.fetch(outside.url + "/lying") == b"x" * 10         # what was declared, no more
        with pytest.raises(FetchError, match="limit") as exc:
            f.fetch(outside.url + "/chunked")
        assert exc.value.too_large
        with pytest.raises(FetchError, match="identity"):
            f.fetch(outside.url + "/gzip")


def test_what_answered_inside_is_not_in_the_public_message(inside):
    inside.routes["/admin"] = (403, {}, b"forbidden: internal admin")
    with Fetcher(FetchConfig(allow_private=True, retries=0)) as f, pytest.raises(FetchError) as exc:
        f.fetch(f"{inside.url}/admin")
    assert "403" in str(exc.value)                 # for the operator's log
    assert "403" not in exc.value.public and "127.0.0.1" not in exc.value.public


@pytest.mark.parametrize("address, is_global", [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("100.64.0.1", False), ("100.127.255.254", False),
    ("224.0.0.1", False), ("0.0.0.0", False), ("240.0.0.1", False), ("169.254.169.254", False),
    ("64:ff9b::7f00:1", False), ("64:ff9b::808:808", True), ("2002:7f00:1::", False),
    ("::ffff:10.0.0.1", False), ("fe80::1", False), ("fd00::1", False), ("::1", False)])
def test_address_classes(address, is_global):
    assert address_is_global(ipaddress.ip_address(address)) is is_global


@pytest.mark.parametrize("url, match", [
    ("http://" + "a" * 64 + ".example.com/x.jpg", "not a valid host name"),      # label over 63
    ("http://exa\ud800mple.com/x.jpg", "U\\+D800"),
    ("http://example.com/a\nb.jpg", "U\\+000A"),
    ("file:///tmp/a%00b.jpg", "not an absolute file path"),
    ("http://[::1/x", "not a valid URL"),
    ("http://:80/x", "authority|valid"),
])
def test_malformed_uris_are_fetch_errors(url, match):
    with guarded() as f, pytest.raises(FetchError, match=match):
        f.fetch(url)


# --- file:// --------------------------------------------------------------------------------

def test_file_reads_stay_under_the_roots(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.jpg").write_bytes(b"OK")
    (tmp_path / "secret.jpg").write_bytes(b"SECRET")
    (root / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "inside-link.jpg").symlink_to(root / "ok.jpg")
    os.mkfifo(root / "fifo.jpg")
    (root / "big.jpg").write_bytes(b"x" * 3000)
    with Fetcher(FetchConfig(file_roots=(root,), max_bytes=2000)) as f:
        assert f.fetch((root / "ok.jpg").as_uri()) == b"OK"
        assert f.fetch((root / "inside-link.jpg").as_uri()) == b"OK"
        for name, match in (("escape.jpg", "outside"), ("fifo.jpg", "not a regular file"),
                            ("big.jpg", "limit")):
            with pytest.raises(FetchError, match=match):
                f.fetch((root / name).as_uri())
        for uri in ((tmp_path / "secret.jpg").as_uri(), "file:///dev/zero", "file:///proc/self/environ",
                    (root / ".." / "secret.jpg").as_uri().replace("/root/", "/root/../"),
                    "file://otherhost/etc/passwd"):
            with pytest.raises(Refused):
                f.fetch(uri)
    with Fetcher(FetchConfig(file_roots=())) as f, pytest.raises(Refused, match="not read here"):
        f.fetch((root / "ok.jpg").as_uri())


def test_devices_and_fifos_are_refused_without_reading_even_with_no_roots(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with Fetcher(FetchConfig(file_roots=None)) as f:
        start = time.monotonic()
        for uri in ("file:///dev/zero", "file:///dev/urandom", (tmp_path / "fifo").as_uri(), tmp_path.as_uri()):
            with pytest.raises(Refused, match="not a regular file"):
                f.fetch(uri)
        assert time.monotonic() - start < 2


def test_fetch_many_isolates_every_failure(outside, tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"A")
    uris = [f"{outside.url}/ok.jpg", "http://" + "b" * 70 + ".test/", "file:///dev/zero",
            (tmp_path / "a.jpg").as_uri(), "http://x\udcff/", None]
    with guarded(file_roots=(tmp_path,)) as f:
        got = f.fetch_many(uris)
    assert got[0] == b"IMAGE" and got[3] == b"A"
    assert all(isinstance(g, FetchError) for i, g in enumerate(got) if i not in (0, 3))

