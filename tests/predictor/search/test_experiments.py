"""Online experiments as the search service runs them: two real ``vsearch serve search`` replicas
sharing one click secret, on the session's broker and ``milvus-lite server``, a serving and a
candidate collection built by two different tiny models, each with its own real embedder. The
operator's switch is the serving collection's ``vsearch.experiment`` property, written here
through the store as the operator writes it."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.fixtures.search import start_search_server
from tests.fixtures.waiting import wait_until
from vsearch.core.experiment import EXPERIMENT_KEY, assign, new_experiment, unit_id
from vsearch.core.naming import collection_name
from vsearch.core.store import MilvusStore
from vsearch.local.services import Service, free_port, start_embedder
from vsearch.local.simusers import ClickModel, SimulatedUsers, summarize
from vsearch.predictor.inference import Embedder
from vsearch.predictor.model_dir import read_meta
from vsearch.predictor.search.ctr import read_events

TTL = 1.2          # the search service's resolve cache (1 s), and a little


def build(store: MilvusStore, model_dir, photos: dict[str, bytes], prefix: str, embedder_url: str) -> str:
    """A collection of ``photos`` (ids ``<prefix>-<name>``) built by ``model_dir``, recording it."""
    meta = read_meta(model_dir)
    emb = Embedder(model_dir)
    name = collection_name(f"exp_{uuid.uuid4().hex[:6]}_{meta.name}", meta.version)
    store.ensure_model_collection(name, emb.dim, {"model": meta.name, "version": meta.version,
                                                  "embedder_url": embedder_url})
    vecs = emb.embed_bytes(list(photos.values()))
    store.upsert(name, [{"id": f"{prefix}-{k}", "embedding": v, "uri": f"file:///nowhere/{k}.jpg",
                         "metadata": {"label": k, "content_hash": hashlib.sha256(b).hexdigest()},
                         "visibility": "public", "updated_at": 1}
                        for (k, b), v in zip(photos.items(), vecs)])
    emb.close()
    return name


@dataclass
class Rig:
    replicas: list[str]                   # the two search replicas' URLs
    vit: Service                          # the candidate's embedder
    store: MilvusStore
    serving: str
    candidate: str
    root: Path                            # a scratch folder


@contextlib.contextmanager
def rig(tmp_path, milvus_uri: str, broker: str, serving_embedder: str, model_dirs, photos) -> Iterator[Rig]:
    """The serving collection (tiny ResNet, ids ``s-*``, behind a fresh alias), the candidate
    collection (tiny ViT with its own embedder, ids ``c-*``) and two search replicas with one
    click secret; the processes start while the collections are built. Stopped and dropped after."""
    alias = f"exp_{uuid.uuid4().hex[:6]}"
    vit_port = free_port()
    vit_url = f"http://127.0.0.1:{vit_port}"
    pool = ThreadPoolExecutor(3)
    starting = [pool.submit(start_embedder, model_dirs["vit-small"], port=vit_port,
                            log_path=tmp_path / "vit.log", extra=("--threads", "1"))]
    starting += [pool.submit(start_search_server, milvus_uri=milvus_uri, alias=alias, embedder_url=serving_embedder,
                             bootstrap=broker, log_path=tmp_path / f"search-{i}.log",
                             extra=("--click-secret", "one-secret", "--allowed-embedder-urls", vit_url))
                 for i in range(2)]
    store = MilvusStore(milvus_uri, timeout=30)
    made = []
    try:
        made.append(build(store, model_dirs["resnet18"], photos, "s", serving_embedder))
        made.append(build(store, model_dirs["vit-small"], photos, "c", vit_url))
        store.switch_alias(alias, made[0])
        vit, *replicas = [f.result() for f in starting]
        yield Rig([r.url for r in replicas], vit, store, *made, tmp_path)
    finally:
        for f in starting:
            if f.exception() is None:
                f.result().stop()
        pool.shutdown()
        if store.describe_alias(alias):
            store.drop_alias(alias)
        for c in made:
            store.drop_collection(c)
        store.close()


def test_two_replicas_run_ab_then_interleaving_then_end_it(
        tmp_path, milvus_server_uri, broker, embedder_service, model_dirs, photo_bytes):
    photos = {f"p{i}": b for i, b in enumerate(photo_bytes[:8])}
    with rig(tmp_path, milvus_server_uri, broker, embedder_service.url, model_dirs, photos) as r:
        run_experiments(r, photos, broker)


def run_experiments(rig: Rig, photos: dict[str, bytes], broker: str) -> None:
    a, b = rig.replicas
    store, serving, candidate, vit = rig.store, rig.serving, rig.candidate, rig.vit
    ab = new_experiment("ab", 0.5, candidate, serving, now_ms=int(time.time() * 1000))
    store.set_collection_property(serving, EXPERIMENT_KEY, ab.to_json())

    def ask(url, photo="p3", user=None, cookie=None, k=6):
        return requests.post(f"{url}/search", files={"image": ("q.jpg", photos[photo], "image/jpeg")},
                             data={"k": str(k)}, timeout=60, headers={"X-User-Id": user} if user else {},
                             cookies={"vsearch_uid": cookie} if cookie else {})

    def click(url, body, item):
        r = requests.post(f"{url}/events", json={"type": "click", "token": body["token"], "item_id": item}, timeout=30)
        assert r.status_code == 200, r.text

    # A/B: every unit keeps its arm on both replicas, the arm the salted hash says
    users = [f"user-{i}" for i in range(10)]
    arms = {}
    for u in users:
        x, y = ask(a, user=u).json(), ask(b, user=u, cookie="ignored-the-header-wins").json()
        assert x["experiment"] == y["experiment"] == {"id": ab.id, "arm": assign(ab, u)}, (x, y)
        arms[u] = x["experiment"]["arm"]
        # one arm end to end: its embedder, its collection, nothing of the other
        prefix, coll = ("c-", candidate) if arms[u] == "candidate" else ("s-", serving)
        for ans in (x, y):
            assert ans["collection"] == coll and all(r["id"].startswith(prefix) for r in ans["results"]), ans
            assert ans["results"][0]["id"] == prefix + "p3" and ans["results"][0]["score"] > 0.999
    assert set(arms.values()) == {"serving", "candidate"}, arms
    assert ask(a, cookie="user-1").json()["experiment"]["arm"] == arms["user-1"]   # the page's cookie
    anon = ask(b, photo="p5").json()     # no id: the query image is the unit
    assert anon["experiment"]["arm"] == assign(ab, "image:" + hashlib.sha256(photos["p5"]).hexdigest())
    bad = ask(a, user="x" * 201)
    assert bad.status_code == 400 and "X-User-Id must be a user or session id" in bad.json()["error"]
    odd = ask(a, photo="p5", cookie="y" * 201).json()       # a cookie nobody could fix: ignored
    assert odd["experiment"] == anon["experiment"]
    # simulated users (vsearch.local.simusers) search and click through the same HTTP API
    items = []
    for i, (name, data) in enumerate(photos.items()):
        (tmp := rig.root / f"{name}.jpg").write_bytes(data)
        items.append({"id": f"s-{name}", "path": str(tmp), "metadata": {"label": f"g{i // 3}"}})
    sim = SimulatedUsers(b, items, n_users=6, k=4, seed=3, model=ClickModel(relevant=0.9, irrelevant=0.3))
    sessions = [sim.session(i) for i in range(12)]
    assert all(x.error is None and x.arm == assign(ab, x.user) and x.results == 4 for x in sessions), sessions
    summary = summarize(sessions)
    assert summary["clicks"] > 0 and sum(v["sessions"] for v in summary["by_arm"].values()) == 12, summary
    cand_user = next(u for u in users if arms[u] == "candidate")
    cand = ask(a, user=cand_user).json()
    v1 = requests.post(f"{b}/v1/models/visual-search:predict", headers={"X-User-Id": cand_user}, timeout=60,
                       json={"instances": [{"image": {"b64": base64.b64encode(photos["p2"]).decode()}, "k": 2}]})
    assert v1.json()["predictions"][0]["experiment"] == {"id": ab.id, "arm": "candidate"}, v1.text
    assert v1.json()["predictions"][0]["collection"] == candidate
    click(b, cand, cand["results"][1]["id"])          # the other replica logs the click

    # interleaving (share 1: every unit): both versions answer, merged by team draft
    inter = new_experiment("interleave", 1.0, candidate, serving, now_ms=int(time.time() * 1000))
    store.set_collection_property(serving, EXPERIMENT_KEY, inter.to_json())
    time.sleep(TTL)
    mixed = ask(b, user="user-0").json()
    assert mixed["experiment"] == {"id": inter.id, "arm": "interleaved"}
    ids = [r["id"] for r in mixed["results"]]
    assert len(ids) == 6 and {i[:2] for i in ids} == {"s-", "c-"}
    assert len({i[2:] for i in ids}) == 6             # one of each photo (same content: one item)
    assert all("team" not in r for r in mixed["results"])       # the teams stay in events and token
    click(a, mixed, ids[0])
    click(a, mixed, ids[1])
    # the candidate's embedder goes down: serving answers alone; the error is the candidate's
    vit.stop()
    alone = ask(a, user="user-0", photo="p4").json()
    assert alone["experiment"]["arm"] == "interleaved" and all(r["id"].startswith("s-") for r in alone["results"])
    # ending it (property ""): plain serving answers within the resolve TTL
    store.set_collection_property(serving, EXPERIMENT_KEY, "")
    time.sleep(TTL)
    plain = ask(a, user=cand_user).json()
    assert "experiment" not in plain and plain["collection"] == serving

    # what the log says: the arm/team on every impression and click, the error as an event
    want = {("impression", cand["query_id"]), ("click", cand["query_id"]), ("impression", mixed["query_id"]),
            ("impression", alone["query_id"]), ("error", alone["query_id"])}

    def arrived():
        evs = [r for r in read_events(broker, idle_timeout=1.0)
               if (r.get("experiment") or {}).get("id") in (ab.id, inter.id)]
        keys = [(e["type"], e["query_id"]) for e in evs]
        return evs if want <= set(keys) and keys.count(("click", mixed["query_id"])) == 2 else None
    events = wait_until(arrived, 30, 0.5, "the experiment's events did not all arrive on search.events")
    by_q = {}
    for e in events:
        by_q.setdefault((e["type"], e["query_id"]), []).append(e)
    imp = by_q[("impression", cand["query_id"])][0]
    assert imp["experiment"] == {"id": ab.id, "design": "ab", "arm": "candidate",
                                 "unit": unit_id(cand_user, ab.salt)}
    assert imp["collection"] == candidate and imp["model_version"] == "tiny_vit_small__1"
    assert imp["error"] is False and imp["took_ms"] > 0
    cl = by_q[("click", cand["query_id"])][0]
    assert cl["experiment"] == imp["experiment"] and cl["collection"] == candidate
    imp = by_q[("impression", mixed["query_id"])][0]
    assert imp["experiment"]["arm"] == "interleaved" and set(imp["experiment"]["arm_ms"]) == {"serving", "candidate"}
    assert [r["id"] for r in imp["results"]] == ids
    assert all(r["team"] == ("serving" if r["id"].startswith("s-") else "candidate") for r in imp["results"])
    teams = {c["item_id"]: c["experiment"]["team"] for c in by_q[("click", mixed["query_id"])]}
    assert teams == {i: ("serving" if i.startswith("s-") else "candidate") for i in ids[:2]}
    err = by_q[("error", alone["query_id"])][0]
    assert err["experiment"]["arm"] == "candidate" and err["status"] == 503 and err["collection"] == candidate
    assert by_q[("impression", alone["query_id"])][0]["experiment"]["fallback"] is True
    assert not any(e["query_id"] == plain["query_id"] for e in events)
    metrics = requests.get(f"{a}/metrics", timeout=10).text
    assert f'vsearch_experiment_errors_total{{arm="candidate",experiment="{inter.id}"}} 1.0' in metrics
    assert f'vsearch_experiment_search_seconds_count{{arm="interleaved",experiment="{inter.id}"}}' in metrics
