"""The search service's edges: /images reaches only what it should (file:// under
--image-roots only, regular files, no symlink escapes, http(s) fetched through the guarded
fetcher, never redirected), body limits on the bytes actually read, exact-route exemptions
from the key, filters in any script, errors without internal URIs."""

from __future__ import annotations

import base64
import http.server
import json
import os
import socket
import threading
import uuid

import httpx
import numpy as np
import pytest
import requests

from tests.fixtures.routes import walk_routes_without_the_key
from tests.fixtures.search import start_search_server
from vsearch.cli import main
from vsearch.core.store import MilvusStore, filter_expr
from vsearch.predictor.inference import Embedder
from vsearch.predictor.search.rerank import Candidate
from vsearch.predictor.search.service import SearchService
from vsearch.predictor.search.settings import SearchSettings

KEY = "hardening-key"


class Recorder(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, body: bytes):
        self.seen = []
        rec = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                rec.seen.append((self.path, dict(self.headers)))
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), H)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def hardened(tmp_path_factory, tiny_model_dir, milvus_server_uri, photo_bytes):
    """A search server (key, small upload limit, --image-roots) over a catalog of items that
    point where /images must not go."""
    root = tmp_path_factory.mktemp("hardened")
    served = root / "served"
    served.mkdir()
    (served / "ok.jpg").write_bytes(photo_bytes[0])
    (root / "secret.jpg").write_bytes(photo_bytes[1])
    (served / "escape.jpg").symlink_to(root / "secret.jpg")
    os.mkfifo(served / "fifo.jpg")
    inside = Recorder(photo_bytes[2])
    uris = {"ok": (served / "ok.jpg").as_uri(), "escape": (served / "escape.jpg").as_uri(),
            "fifo": (served / "fifo.jpg").as_uri(), "outside": (root / "secret.jpg").as_uri(),
            "zero": "file:///dev/zero", "inside-http": f"http://127.0.0.1:{inside.server_address[1]}/a.jpg",
            "cafe": (served / "ok.jpg").as_uri(), "cjk": (served / "ok.jpg").as_uri(),
            "emoji": (served / "ok.jpg").as_uri()}
    labels = {"cafe": "café", "cjk": "猫", "emoji": "🐱"}
    emb = Embedder(tiny_model_dir)
    vec = emb.embed_bytes([photo_bytes[0]])[0]
    coll, alias = f"c_hard_{uuid.uuid4().hex[:8]}", f"a_hard_{uuid.uuid4().hex[:8]}"
    with MilvusStore(milvus_server_uri, timeout=30) as store:
        store.ensure_collection(coll, emb.dim)
        store.upsert(coll, [{"id": i, "embedding": vec, "uri": u, "metadata": {"label": labels.get(i, "x")},
                             "visibility": "public", "updated_at": 1} for i, u in uris.items()])
        store.switch_alias(alias, coll)
    svc = start_search_server(milvus_uri=milvus_server_uri, alias=alias, model_dir=tiny_model_dir,
                              log_path=root / "search.log",
                              extra=("--api-key", KEY, "--image-roots", str(served), "--max-upload-bytes", "100000",
                                     "--dedup-distance", "0"))
    yield svc, inside, photo_bytes
    svc.stop()
    inside.shutdown()


def get(svc, path, key=True):
    return requests.get(svc.url + path, headers={"X-API-Key": KEY} if key else {}, timeout=20)


def test_images_serve_only_regular_files_under_the_roots_and_no_inside_hosts(hardened):
    svc, inside, photos = hardened
    ok = get(svc, "/images/ok")
    assert ok.status_code == 200 and ok.content == photos[0]
    assert ok.headers["x-content-type-options"] == "nosniff"
    for item in ("escape", "fifo", "outside", "zero", "inside-http"):
        r = get(svc, f"/images/{item}")
        assert r.status_code == 404, (item, r.status_code)
        assert "/" not in r.json()["error"].split("cannot be served")[-1], r.text     # no path, no URI
        assert "127.0.0.1" not in r.text and "secret" not in r.text
    assert inside.seen == []


def test_images_fetch_http_catalog_images_through_the_fetcher_without_the_key(tmp_path, photo_bytes):
    """With private addresses allowed (an internal CDN), /images fetches the image itself: the
    browser is never redirected, and the API key never leaves this server."""
    cdn = Recorder(photo_bytes[3])

    class Index:
        def get(self, item_id):
            return Candidate(id=item_id, score=0.0, uri=f"http://127.0.0.1:{cdn.server_address[1]}/i.jpg",
                             metadata={}, visibility="public", content_hash=None, vector=None)

    for allow, code in ((True, 200), (False, 404)):
        svc = SearchService(None, Index(), SearchSettings(allow_private_image_urls=allow, query_store=None))
        try:
            if code == 200:
                data, media = svc.catalog_image("x")
                assert data == photo_bytes[3] and media == "image/jpeg"
            else:
                with pytest.raises(Exception, match="cannot be served"):
                    svc.catalog_image("x")
        finally:
            svc.close()
    assert len(cdn.seen) == 1 and not any(k.lower() in ("x-api-key", "authorization") for k in cdn.seen[0][1])
    cdn.shutdown()


def test_only_the_exact_health_routes_are_open(hardened):
    svc, _, _ = hardened
    for path in ("/images/x/ready", "/images/v2/health/ready", "/v2/models/visual-search", "/api/config"):
        assert get(svc, path, key=False).status_code == 401, path
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/visual-search/ready"):
        assert get(svc, path, key=False).status_code == 200, path


def _raw(url: str, request: bytes) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < 10:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]


def test_body_limits_hold_for_chunked_and_multipart_uploads(hardened):
    svc, _, photos = hardened
    limit = 100000 * 4 // 3 + 256 * 1024
    # chunked, no Content-Length: counted as read
    head = (b"POST /search HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode() +
            b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b" " * 60000
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(limit // 60000 + 2)) + b"0\r\n\r\n"
    status, reply = _raw(svc.url, head + body)
    assert status == 413 and b"limit" in reply
    # multipart through httpx with a streamed (chunked) body
    boundary = "b0undary"

    def parts():
        yield f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n".encode()
        for _ in range(limit // 65536 + 2):
            yield b"\xff" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    r = httpx.post(f"{svc.url}/search", content=parts(), timeout=30,
                   headers={"X-API-Key": KEY, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text
    # an upload under the body limit but over the image limit is still a 413 with the reason
    big = requests.post(f"{svc.url}/search", files={"image": ("a.jpg", b"\xff" * 150_000)},
                        headers={"X-API-Key": KEY}, timeout=30)
    assert big.status_code == 413 and "limit" in big.json()["error"]
    # and the server is fine afterwards
    ok = requests.post(f"{svc.url}/search", files={"image": ("a.jpg", photos[0])}, headers={"X-API-Key": KEY},
                       timeout=60)
    assert ok.status_code == 200


@pytest.mark.parametrize("label, item", [("café", "cafe"), ("猫", "cjk"), ("🐱", "emoji")])
def test_filters_in_any_script(hardened, label, item):
    svc, _, photos = hardened
    r = requests.post(f"{svc.url}/search", timeout=60, headers={"X-API-Key": KEY},
                      json={"image_b64": base64.b64encode(photos[0]).decode(), "k": 5, "filter": {"label": label}})
    assert r.status_code == 200, r.text
    assert [h["id"] for h in r.json()["results"]] == [item]


def test_unparseable_filters_are_400s(hardened):
    svc, _, photos = hardened
    for flt in ({"label": "\ud800"}, {"label": 2**70}, {"label": {"$ne": 1}}):
        r = requests.post(f"{svc.url}/search", timeout=60, headers={"X-API-Key": KEY, "Content-Type": "application/json"},
                          data=('{"image_b64": "%s", "filter": %s}' % (base64.b64encode(photos[0]).decode(),
                                                                       _json(flt))).encode())
        assert r.status_code == 400, (flt, r.text)


def _json(v) -> str:
    return json.dumps(v)


def test_filter_literals_on_the_milvus_standalone_server(milvus_standalone_uri):
    vals = ["café", "猫", "🐱", 'a"b', "back\\slash"]
    with MilvusStore(milvus_standalone_uri, timeout=30) as store:
        coll = f"c_lit_{uuid.uuid4().hex[:8]}"
        store.ensure_collection(coll, 4)
        store.upsert(coll, [{"id": f"i{n}", "embedding": np.ones(4) / 2, "uri": "", "metadata": {"label": v},
                             "visibility": "public", "updated_at": 1} for n, v in enumerate(vals)])
        try:
            for n, v in enumerate(vals):
                hits = store.search(coll, np.ones(4) / 2, k=10, filter=filter_expr({"label": [v]}),
                                    consistency="Strong")[0]
                assert [h["id"] for h in hits] == [f"i{n}"], v
        finally:
            store.drop_collection(coll)


def test_help_never_prints_secret_values(monkeypatch, capsys):
    monkeypatch.setenv("VSEARCH_SEARCH_API_KEY", "s3cr3t-key")
    monkeypatch.setenv("VSEARCH_MILVUS_TOKEN", "root:s3cr3t-token")
    monkeypatch.setenv("VSEARCH_EMBEDDER_API_KEY", "s3cr3t-emb")
    monkeypatch.setenv("VSEARCH_INGEST_EMBEDDER_API_KEY", "s3cr3t-ing")
    for argv in (["serve", "search", "--help"], ["serve", "embedder", "--help"], ["ingest", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "s3cr3t" not in out and "set]" in out


def test_every_route_of_the_search_app_needs_the_key_and_no_repository_route_is_left(hardened):
    """Walks every route of the search app's OpenAPI document (fetched with the key): without
    the key each answers 401 unless it is one of the exact open routes; the document and its
    page need the key; KServe's repository routes are gone (404 with the key too) and the
    model stays ready."""
    svc, _, _ = hardened
    for path in ("/openapi.json", "/docs"):
        assert get(svc, path, key=False).status_code == 401, path
    paths = get(svc, "/openapi.json").json()["paths"]
    assert "/search" in paths and "/events" in paths and not [p for p in paths if "repository" in p]
    assert walk_routes_without_the_key(svc.url, paths, "visual-search") >= len(paths)
    for path in ("/v2/repository/models/visual-search/unload", "/v2/repository/index"):
        assert requests.post(svc.url + path, headers={"X-API-Key": KEY}, timeout=20).status_code == 404
    assert get(svc, "/v2/models/visual-search/ready", key=False).status_code == 200


def test_errors_about_unknown_fields_stay_short(hardened):
    """A request naming 2,000 unknown fields (about 100 KB) gets an error of a few hundred bytes."""
    svc, _, photos = hardened
    many = {f"field-{i:05d}-" + "x" * 40: 1 for i in range(2_000)}
    for path, body in (("/events", {"type": "click", "token": "t", **many}),
                       ("/search", {"image_b64": base64.b64encode(photos[0]).decode(), **many}),
                       ("/v1/models/visual-search:predict", {"instances": [{"image": {"b64": "x"}, **many}]})):
        r = requests.post(svc.url + path, json=body, headers={"X-API-Key": KEY}, timeout=30)
        assert r.status_code == 400 and "unknown" in r.text and "more" in r.text, (path, r.text[:300])
        assert len(r.content) < 800, (path, len(r.content))
