"""The one image fetcher (ingest, URL queries, trainer) against real files and a real local
HTTP server."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from vsearch.core.fetch import FetchConfig, Fetcher, FetchError, Refused
from vsearch.local.services import free_port


class Handler(http.server.BaseHTTPRequestHandler):
    calls: dict[str, int] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        n = Handler.calls[self.path] = Handler.calls.get(self.path, 0) + 1
        if self.path == "/ok.jpg":
            self._send(200, b"JPEGBYTES")
        elif self.path == "/missing.jpg":
            self._send(404, b"no")
        elif self.path == "/flaky.jpg":       # two 503s, then the image
            self._send(503, b"busy") if n <= 2 else self._send(200, b"FLAKY")
        elif self.path == "/down.jpg":
            self._send(500, b"broken")
        elif self.path == "/big.jpg":
            self._send(200, b"x" * 5000)
        elif self.path == "/slow.jpg":
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            time.sleep(1.5)
            self.wfile.write(b"0123456789")

    def _send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def http_url():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture
def fetcher():
    f = Fetcher(FetchConfig(connect_timeout=1, read_timeout=0.5, max_bytes=1000, retries=2, backoff=0.05,
                            allow_private=True))
    yield f
    f.close()


def test_file_uris(tmp_path, fetcher):
    p = tmp_path / "a b.jpg"
    p.write_bytes(b"IMG")
    assert fetcher.fetch(p.as_uri()) == b"IMG"
    with pytest.raises(FetchError, match="no such file") as e:
        fetcher.fetch((tmp_path / "nope.jpg").as_uri())
    assert not e.value.transient
    (tmp_path / "big.jpg").write_bytes(b"x" * 2000)
    with pytest.raises(FetchError, match="limit"):
        fetcher.fetch((tmp_path / "big.jpg").as_uri())
    with pytest.raises(FetchError, match="not a regular file"):
        fetcher.fetch(tmp_path.as_uri())


def test_http_success_permanent_and_transient_errors(http_url, fetcher):
    assert fetcher.fetch(f"{http_url}/ok.jpg") == b"JPEGBYTES"
    with pytest.raises(FetchError, match="404") as e:
        fetcher.fetch(f"{http_url}/missing.jpg")
    assert not e.value.transient and Handler.calls["/missing.jpg"] == 1      # not retried
    assert fetcher.fetch(f"{http_url}/flaky.jpg") == b"FLAKY"                 # retried twice
    assert Handler.calls["/flaky.jpg"] == 3
    with pytest.raises(FetchError, match="gave up after 3 attempts") as e:
        fetcher.fetch(f"{http_url}/down.jpg")
    assert e.value.transient
    with pytest.raises(FetchError, match="limit"):
        fetcher.fetch(f"{http_url}/big.jpg")
    with pytest.raises(FetchError, match="failed") as e:
        fetcher.fetch(f"{http_url}/slow.jpg")
    assert e.value.transient


def test_fetch_many_keeps_order_and_reports_each_failure(http_url, fetcher, tmp_path):
    (tmp_path / "f.jpg").write_bytes(b"F")
    (tmp_path / "g.jpg").write_bytes(b"G")
    got = fetcher.fetch_many([f"{http_url}/ok.jpg", f"{http_url}/missing.jpg", (tmp_path / "f.jpg").as_uri()])
    assert got[0] == b"JPEGBYTES" and isinstance(got[1], FetchError) and got[2] == b"F"
    # local files are read on the calling thread, the rest on the pool: the answers still come
    # back in the order asked, each failure in its place
    mixed = [(tmp_path / "g.jpg").as_uri(), f"{http_url}/ok.jpg", (tmp_path / "gone.jpg").as_uri(),
             "FILE://" + str(tmp_path / "f.jpg"), f"{http_url}/missing.jpg", "gopher://x/y.jpg",
             (tmp_path / "g.jpg").as_uri()]
    got = fetcher.fetch_many(mixed)
    assert [g if isinstance(g, bytes) else type(g) for g in got] == [
        b"G", b"JPEGBYTES", FetchError, b"F", FetchError, Refused, b"G"]
    assert isinstance(got[5], FetchError) and "unsupported URI scheme" in str(got[5])
    assert "no such file" in str(got[2])


def test_unreachable_host_is_transient(fetcher):
    with pytest.raises(FetchError, match="failed to connect") as e:
        fetcher.fetch(f"http://127.0.0.1:{free_port()}/x.jpg")
    assert e.value.transient


@pytest.mark.parametrize("url", ["http://127.0.0.1/a.jpg", "http://localhost:8000/x.png",
                                 "http://10.1.2.3/a.jpg", "http://169.254.169.254/latest/meta-data",
                                 "http://[::1]/a.jpg", "http://192.168.0.1/a.jpg", "http://100.64.0.1/a.jpg"])
def test_public_only_fetchers_refuse_private_loopback_link_local_and_shared_addresses(url):
    f = Fetcher(FetchConfig(schemes=("http", "https"), allow_private=False, retries=0))
    with pytest.raises(FetchError, match="not a public address"):
        f.fetch(url)


def test_a_fetcher_reads_only_its_schemes():
    f = Fetcher(FetchConfig(schemes=("http", "https"), allow_private=False, retries=0))
    for url in ("file:///etc/passwd", "ftp://example.com/a.jpg", "not a url"):
        with pytest.raises(FetchError, match="unsupported URI scheme"):
            f.fetch(url)
