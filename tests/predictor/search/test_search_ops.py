"""Operations: embedding through the embedder service, Milvus outages (503 with a reason, then
recovery without a restart), the API key and CORS."""

from __future__ import annotations

import hashlib

import pytest
import requests

from tests.fixtures.search import start_search_server, wait_for_events
from tests.fixtures.waiting import wait_until
from vsearch.core.naming import collection_name
from vsearch.core.store import MilvusStore
from vsearch.local.services import free_port, start_milvus_lite_server
from vsearch.predictor.inference import Embedder
from vsearch.predictor.model_dir import read_meta

KEY = "s3cret-key"


def index_catalog(uri: str, alias: str, catalog, dim_source) -> None:
    emb = Embedder(dim_source)
    ids = [i for i in catalog.photos if i.startswith("photo-0")][:6]
    vectors = emb.embed_bytes([catalog.photos[i] for i in ids])
    store = MilvusStore(uri, timeout=30)
    name = collection_name("opstest", read_meta(dim_source).version)
    store.ensure_collection(name, dim=emb.dim)
    store.upsert(name, [{"id": i, "embedding": v, "uri": catalog.files[i].resolve().as_uri(),
                         "metadata": {"label": catalog.labels[i],
                                      "content_hash": hashlib.sha256(catalog.photos[i]).hexdigest()},
                         "visibility": "public", "updated_at": 1} for i, v in zip(ids, vectors)])
    store.switch_alias(alias, name)
    store.close()


@pytest.mark.slow
def test_milvus_outage_gives_503_and_the_server_recovers(search_catalog, embedder_url, tiny_model_dir,
                                                         tmp_path):
    port = free_port()
    milvus_uri = f"http://127.0.0.1:{port}"                  # nothing listens there yet
    svc = start_search_server(milvus_uri=milvus_uri, alias="images", embedder_url=embedder_url,
                              log_path=tmp_path / "search.log",
                              extra=("--milvus-timeout", "3", "--api-key", KEY,
                                     "--cors-origins", "http://shop.example"))
    headers = {"X-API-Key": KEY}
    photo = search_catalog.photos["photo-03"]

    def search():
        return requests.post(f"{svc.url}/search", files={"image": ("q.jpg", photo, "image/jpeg")},
                             data={"k": "3"}, headers=headers, timeout=60)
    try:
        down = search()
        assert down.status_code == 503 and "Milvus" in down.json()["error"], down.text
        assert requests.get(f"{svc.url}/v2/models/visual-search/ready", timeout=5).status_code == 200

        milvus = start_milvus_lite_server(tmp_path / "milvus", port=port, log_path=tmp_path / "milvus.log")
        try:
            empty = search()
            assert empty.status_code == 503 and "nothing to search yet" in empty.json()["error"], empty.text
            index_catalog(milvus.uri, "images", search_catalog, tiny_model_dir)
            up = search()
            assert up.status_code == 200, up.text
            assert up.json()["results"][0]["id"] == "photo-03"    # embedded by the embedder service
            # not a client mistake either when the embedder is fine but the query is bad
            bad = requests.post(f"{svc.url}/search", headers=headers, timeout=30,
                                files={"image": ("q.jpg", b"garbage", "image/jpeg")})
            assert bad.status_code == 400 and "not an image" in bad.json()["error"]
        finally:
            milvus.stop()
        again_down = search()
        assert again_down.status_code == 503, again_down.text
        milvus = start_milvus_lite_server(tmp_path / "milvus", port=port, log_path=tmp_path / "milvus.log")
        try:
            r = wait_until(search, 30, 0.5, message=None)      # a Response is truthy when its status is OK
            assert r.status_code == 200 and r.json()["results"][0]["id"] == "photo-03", r.text
        finally:
            milvus.stop()
    finally:
        svc.stop()


def test_api_key_and_cors(search_catalog, tiny_model_dir, milvus_server_uri, tmp_path):
    svc = start_search_server(milvus_uri=milvus_server_uri, alias=search_catalog.alias,
                              model_dir=tiny_model_dir, log_path=tmp_path / "search.log",
                              extra=("--api-key", KEY, "--cors-origins", "http://shop.example"))
    try:
        photo = search_catalog.photos["photo-04"]
        files = {"image": ("q.jpg", photo, "image/jpeg")}
        no_key = requests.post(f"{svc.url}/search", files=files, timeout=30)
        assert no_key.status_code == 401 and "API key" in no_key.json()["error"]
        wrong = requests.post(f"{svc.url}/search", files=files, headers={"X-API-Key": "nope"}, timeout=30)
        assert wrong.status_code == 401
        ok = requests.post(f"{svc.url}/search", files=files, headers={"X-API-Key": KEY}, timeout=30)
        assert ok.status_code == 200 and ok.json()["results"][0]["id"] == "photo-04"
        bearer = requests.post(f"{svc.url}/search", files=files, timeout=30,
                               headers={"Authorization": f"Bearer {KEY}"})
        assert bearer.status_code == 200
        for path in ("/images/photo-04", "/api/config", "/metrics", "/v2/models/visual-search"):
            assert requests.get(f"{svc.url}{path}", timeout=10).status_code == 401, path
        assert requests.post(f"{svc.url}/v1/models/visual-search:predict", json={"instances": []},
                             timeout=10).status_code == 401
        # health and the static page stay open
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/visual-search/ready", "/",
                     "/web/app.js"):
            assert requests.get(f"{svc.url}{path}", timeout=10).status_code == 200, path
        # CORS: the configured origin may call, preflight included; others get no grant
        pre = requests.options(f"{svc.url}/search", timeout=10, headers={
            "Origin": "http://shop.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "http://shop.example"
        cross = requests.post(f"{svc.url}/search", files=files, timeout=30,
                              headers={"X-API-Key": KEY, "Origin": "http://shop.example"})
        assert cross.headers.get("access-control-allow-origin") == "http://shop.example"
        other = requests.post(f"{svc.url}/search", files=files, timeout=30,
                              headers={"X-API-Key": KEY, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        svc.stop()


def test_a_click_is_accepted_by_any_replica_that_shares_the_secret(search_catalog, tiny_model_dir,
                                                                   milvus_server_uri, broker, tmp_path):
    """Two replicas behind one Service keep no memory of searches: replica B logs the click on a
    search replica A answered, from the signed token; a replica with another secret refuses it."""

    def replica(name, secret):
        return start_search_server(milvus_uri=milvus_server_uri, alias=search_catalog.alias,
                                   model_dir=tiny_model_dir, bootstrap=broker, log_path=tmp_path / f"{name}.log",
                                   extra=("--click-secret", secret))
    a, b, other = replica("a", "shared-secret"), replica("b", "shared-secret"), replica("c", "another")
    try:
        photo = search_catalog.photos["photo-06"]
        body = requests.post(f"{a.url}/search", files={"image": ("q.jpg", photo, "image/jpeg")},
                             data={"k": "3"}, timeout=60).json()
        click = {"type": "click", "token": body["token"], "item_id": body["results"][1]["id"]}
        refused = requests.post(f"{other.url}/events", json=click, timeout=10)
        assert refused.status_code == 400 and "not issued by this service" in refused.json()["error"]
        accepted = requests.post(f"{b.url}/events", json=click, timeout=10)
        assert accepted.status_code == 200 and accepted.json()["events"][0]["accepted"] is True
        got = wait_for_events(broker, lambda r: r["query_id"] == body["query_id"] and r["type"] == "click")
        assert got[0]["item_id"] == click["item_id"] and got[0]["rank"] == 2
        assert got[0]["model_version"] == body["model_version"]
    finally:
        for svc in (a, b, other):
            svc.stop()


def test_without_the_near_duplicate_rerank_no_stored_vectors_are_asked_of_milvus(search_catalog, tiny_model_dir,
                                                                                milvus_server_uri):
    """``--dedup-distance 0``: the search asks Milvus for no vectors (a second query by primary
    key on Milvus 2.3); the same hits, in the same order, just without them."""
    from vsearch.predictor.search.index import CatalogIndex

    emb = Embedder(tiny_model_dir)
    [query] = emb.embed_bytes([search_catalog.photos["photo-03"]])
    store = MilvusStore(milvus_server_uri, timeout=30)
    try:
        full = CatalogIndex(store, search_catalog.alias).search(query, 8)
        lean_index = CatalogIndex(store, search_catalog.alias, vectors=False)
        assert "embedding" not in lean_index.output_fields
        lean = lean_index.search(query, 8)
    finally:
        store.close()
        emb.close()
    assert [c.id for c in lean] == [c.id for c in full] and full[0].id == "photo-03"
    assert all(c.vector is not None for c in full) and all(c.vector is None for c in lean)
    assert [c.uri for c in lean] == [c.uri for c in full]
