"""On the real Milvus Lite server: the gate samples a large collection without reading it whole,
and never reads a local file a golden set names; a SearchIndex never switches, adopts or drops
what another index owns (the rollout's own steps, with workloads that do nothing)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.operators import unique
from vsearch.core.store import MilvusStore
from vsearch.operators import gate as gate_mod
from vsearch.operators import rollout
from vsearch.operators.spec import IndexSpec, ModelRef, VersionRef
from vsearch.operators.trust import Trust
from vsearch.operators.workloads import Workloads, WorkloadState

DIM = 8


def rows(n: int, prefix: str = "item"):
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return [{"id": f"{prefix}-{i:06d}", "embedding": vecs[i], "uri": f"https://img.example.com/{i}.jpg",
             "metadata": {}, "visibility": "private" if i % 10 == 0 else "public", "updated_at": 1}
            for i in range(n)]


class Counting:
    """A MilvusStore that counts the rows its reads return and refuses full scans of big collections."""

    def __init__(self, store: MilvusStore):
        self.store, self.rows_read, self.scans = store, 0, 0

    def __getattr__(self, name):
        return getattr(self.store, name)

    def scan(self, *a, **kw):
        self.scans += 1
        for r in self.store.scan(*a, **kw):
            self.rows_read += 1
            yield r

    def search(self, *a, **kw):
        out = self.store.search(*a, **kw)
        self.rows_read += sum(len(h) for h in out)
        return out


@pytest.fixture(scope="module")
def store(milvus_server_uri):
    with MilvusStore(milvus_server_uri, timeout=60) as s:
        yield s


def test_the_sample_of_a_large_collection_reads_a_bounded_number_of_rows(store):
    coll = unique("big_")
    store.ensure_collection(coll, DIM)
    store.upsert(coll, rows(6000))
    counting = Counting(store)
    sample = gate_mod.sample_items(counting, coll, 50, seed="s")
    assert counting.scans == 0 and counting.rows_read <= 50 * gate_mod.NEAREST, counting.rows_read
    ids = [r["id"] for r in sample]
    assert len(ids) == len(set(ids)) >= 40                 # distinct items, from across the collection
    assert all(int(i.split("-")[1]) % 10 for i in ids)     # private items are never sampled
    assert len({int(i.split("-")[1]) // 1000 for i in ids}) >= 5
    assert gate_mod.sample_items(store, coll, 50, seed="s") == sample          # deterministic

    small = unique("small_")
    store.ensure_collection(small, DIM)
    store.upsert(small, rows(40, "s"))
    got = gate_mod.sample_items(store, small, 50, seed="s")
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows(40, "s") if r["visibility"] == "public")


class NoFetch:
    def __init__(self):
        self.asked = []

    def fetch(self, uri):
        self.asked.append(uri)
        raise AssertionError(f"fetched {uri}")


@pytest.mark.parametrize("query", ["file:///var/run/secrets/kubernetes.io/serviceaccount/token", "/etc/hostname",
                                   "FILE:///proc/self/environ", "s3://bucket/key", "hostname"])
def test_a_golden_query_naming_a_local_file_is_refused_before_anything_is_read(query):
    fetcher = NoFetch()
    with pytest.raises(gate_mod.GoldenSetError, match="reads no local files"):
        gate_mod.ranked_lists(None, gate_mod.VersionPath("2", "c", None), ["catalog:a", query], fetcher, fetcher)
    assert fetcher.asked == []


# --------------------------------------------------------------------------- ownership


class Idle(Workloads):
    def ensure_embedder(self, spec, v):
        return WorkloadState(ready=True, url="http://127.0.0.1:1")

    def ensure_ingest(self, spec, v, embedder_url):
        return WorkloadState(ready=True)

    def delete_version(self, spec, v):
        return True


class Groups:
    def __init__(self):
        self.deleted = []

    def delete(self, group):
        self.deleted.append(group)
        return True


def index_body(name: str, alias: str, uri: str, status: dict) -> dict:
    return {"metadata": {"name": name, "namespace": "vs", "generation": 1},
            "spec": {"catalog": {"bootstrap": "k:1"}, "milvus": {"uri": uri, "alias": alias},
                     "model": {"name": "m", "version": "1", "uri": "/m"}},
            "status": status}


def version_status(v: VersionRef) -> dict:
    return {**v.to_status(), "embedderUrl": "http://127.0.0.1:1", "dim": DIM}


def test_an_index_never_switches_drops_or_adopts_what_another_index_owns(store, milvus_server_uri):
    alias = unique("shared_")
    theirs = VersionRef.of("theirs", "vs", ModelRef("m", "1", "/m"))
    store.ensure_model_collection(theirs.collection, DIM, {"model": "m", "version": "1", "searchindex": "vs/theirs"})
    store.switch_alias(alias, theirs.collection)
    env = rollout.Env(workloads=Idle(), store=store, groups=Groups(), embedder=None, fetcher=NoFetch(),
                      query_fetcher=NoFetch(), trust=Trust(milvus_hosts=("127.0.0.1",)))

    # "mine" names the same alias: its switch is refused, the alias still names their collection
    mine = VersionRef.of("mine", "vs", ModelRef("m", "1", "/m"))
    assert mine.collection != theirs.collection
    store.ensure_model_collection(mine.collection, DIM, {"model": "m", "version": "1", "searchindex": "vs/mine"})
    body = index_body("mine", alias, milvus_server_uri, {"phase": "Switching", "candidate": version_status(mine)})
    out = rollout.reconcile("mine", "vs", body, env)
    assert out.status["phase"] == "Failed" and out.status["reason"] == "AliasTaken", out.status
    assert "vs/theirs owns" in out.status["message"]
    assert store.describe_alias(alias) == theirs.collection

    # a status that names their collection (written by hand, or a name collision): never adopted ...
    body = index_body("mine", unique("own_"), milvus_server_uri,
                      {"phase": "Deploying", "candidate": {**version_status(mine), "collection": theirs.collection}})
    out = rollout.reconcile("mine", "vs", body, env)
    assert out.status["reason"] == "CollectionTaken", out.status
    # ... and never dropped, neither by a retirement nor by deleting the index
    spec = IndexSpec.from_dict(body["spec"], namespace="vs", index="mine")
    step = rollout.Step("mine", "vs", body, env)
    step.spec, step.owner = spec, "vs/mine"
    assert step.retire(VersionRef.from_status("mine", "vs", {**version_status(mine), "collection": theirs.collection}))
    body["status"] = {"serving": {**version_status(mine), "collection": theirs.collection}}
    done, _ = rollout.cleanup("mine", "vs", {**body, "spec": {**body["spec"], "milvus": {"uri": milvus_server_uri,
                                                                                      "alias": alias}}}, env)
    assert done and store.has_collection(theirs.collection) and store.describe_alias(alias) == theirs.collection

    # its own collection it does drop
    body["status"] = {"serving": version_status(mine)}
    assert rollout.cleanup("mine", "vs", body, env)[0] and not store.has_collection(mine.collection)
