"""Search never mixes model versions: every query resolves alias -> collection -> the model that
built it (recorded in the collection) -> that model's embedder, and searches that collection.
Real parts: the session's ``milvus-lite server``, ``vsearch serve search`` and ``vsearch serve
embedder`` processes, real photos, two tiny models of different embedding sizes."""

from __future__ import annotations

import base64
import time
import uuid

import requests

from tests.fixtures.search import start_search_server
from vsearch.core import search_events
from vsearch.core.naming import collection_name
from vsearch.core.store import MilvusStore
from vsearch.local.samples import TINY
from vsearch.local.services import free_port, start_embedder
from vsearch.predictor.inference import Embedder
from vsearch.predictor.model_dir import read_meta
from vsearch.predictor.zoo import init_model_dir


def build(uri: str, model_dir, photos: dict[str, bytes], root, embedder_url: str) -> str:
    meta = read_meta(model_dir)
    emb = Embedder(model_dir)
    name = collection_name(f"mv_{uuid.uuid4().hex[:6]}_{meta.name}", meta.version)
    with MilvusStore(uri, timeout=30) as store:
        store.ensure_model_collection(name, emb.dim, {"model": meta.name, "version": meta.version,
                                                      "embedder_url": embedder_url})
        rows = []
        for i, (item, data) in enumerate(photos.items()):
            path = root / f"{item}.jpg"
            path.write_bytes(data)
            rows.append({"id": item, "embedding": emb.embed_bytes([data])[0], "uri": path.as_uri(),
                         "metadata": {}, "visibility": "public", "updated_at": i + 1})
        store.upsert(name, rows)
    emb.close()
    return name


def test_each_query_is_embedded_by_the_model_of_the_collection_it_searches(
        tmp_path, milvus_server_uri, tiny_model_dir, photo_bytes, broker):
    vit = tmp_path / "vit"
    init_model_dir("vit-small", vit, name="tiny-vit", version="7", **TINY["vit-small"])
    photos = {f"p{i}": b for i, b in enumerate(photo_bytes[:6])}
    a_emb = start_embedder(tiny_model_dir, log_path=tmp_path / "a.log", extra=("--threads", "1"))
    b_emb = start_embedder(vit, log_path=tmp_path / "b.log", extra=("--threads", "1"))
    alias = f"mv_{uuid.uuid4().hex[:6]}"
    a = build(milvus_server_uri, tiny_model_dir, photos, tmp_path, a_emb.url)
    b = build(milvus_server_uri, vit, photos, tmp_path, b_emb.url)
    dead_url = f"http://127.0.0.1:{free_port()}"
    dead = build(milvus_server_uri, vit, photos, tmp_path, dead_url)
    # a record is written by whoever made the collection: its embedder must be allowed by the service
    rogue = build(milvus_server_uri, vit, photos, tmp_path, f"http://127.0.0.1:{free_port()}")
    store = MilvusStore(milvus_server_uri)
    store.switch_alias(alias, a)
    remote = start_search_server(milvus_uri=milvus_server_uri, alias=alias, embedder_url=a_emb.url,
                                 bootstrap=broker, log_path=tmp_path / "remote.log",
                                 extra=("--allowed-embedder-urls", f"{b_emb.url},{dead_url}"))
    local = start_search_server(milvus_uri=milvus_server_uri, alias=alias, model_dir=tiny_model_dir,
                                log_path=tmp_path / "local.log")
    q = photos["p2"]

    def ask(url):
        return requests.post(f"{url}/search", files={"image": ("q.jpg", q, "image/jpeg")}, data={"k": "2"},
                             timeout=60)
    try:
        r = ask(remote.url).json()
        assert (r["collection"], r["model_version"]) == (a, "tiny_resnet18__1")
        assert r["results"][0]["id"] == "p2" and r["results"][0]["score"] > 0.999
        store.switch_alias(alias, b)                          # another model, another dimension
        time.sleep(1.2)                                       # the resolve cache (1 s)
        r = ask(remote.url).json()
        assert (r["collection"], r["model_version"]) == (b, "tiny_vit__7"), r
        assert r["results"][0]["id"] == "p2" and r["results"][0]["score"] > 0.999
        v1 = requests.post(f"{remote.url}/v1/models/visual-search:predict", timeout=60, json={
            "instances": [{"image": {"b64": base64.b64encode(q).decode()}, "k": 1}]}).json()["predictions"][0]
        assert (v1["collection"], v1["model_version"]) == (b, "tiny_vit__7")
        v2 = requests.post(f"{remote.url}/v2/models/visual-search/infer", timeout=60, json={"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(q).decode()]}]}).json()
        assert v2["parameters"]["collection"] == b and v2["parameters"]["model_version"] == "tiny_vit__7"
        # the in-process server embeds with the ResNet: it refuses the ViT's collection
        refused = ask(local.url)
        assert refused.status_code == 503, refused.text
        assert "built by model tiny-vit version 7" in refused.json()["error"]
        assert "refusing to mix" in refused.json()["error"]
        # a version whose embedder cannot be reached: 503 with the reason, no mixed answer
        store.switch_alias(alias, dead)
        time.sleep(1.2)
        down = ask(remote.url)
        assert down.status_code == 503 and "unreachable" in down.json()["error"], down.text
        assert dead in down.json()["error"] and "tiny_vit__7" in down.json()["error"]
        store.switch_alias(alias, rogue)
        time.sleep(1.2)
        refused = ask(remote.url)
        assert refused.status_code == 503 and "not --embedder-url nor in --allowed-embedder-urls" in \
            refused.json()["error"], refused.text
        store.switch_alias(alias, a)
        time.sleep(1.2)
        assert ask(local.url).json()["collection"] == a        # its own model's collection: served
        events = [e for e in search_events.read_all(broker, idle_s=2.0) if not isinstance(e, Exception)
                  and e.get("type") == "impression" and e.get("collection") in (a, b)]
        assert {(e["collection"], e["model_version"]) for e in events} >= {(a, "tiny_resnet18__1"),
                                                                           (b, "tiny_vit__7")}
    finally:
        for s in (remote, local, a_emb, b_emb):
            s.stop()
        for c in (a, b, dead, rogue):
            store.drop_alias(alias) if store.describe_alias(alias) == c else None
            store.drop_collection(c)
        store.close()
