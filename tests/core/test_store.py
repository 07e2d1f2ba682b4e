"""The Milvus access layer against real Milvus: Lite (file), ``milvus-lite server`` and the
2.3.5 standalone server. The same behaviour is expected of all three."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from vsearch.core.naming import collection_name
from vsearch.core.store import IndexConfig, MilvusStore, filter_expr
from vsearch.core.store_errors import StoreNotFound, StoreRefused, StoreUnavailable
from vsearch.local.services import free_port

DIM = 8


def unit(rng, n, dim=DIM):
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def row(i, vec, ts=1, vis="public", **meta):
    return {"id": f"img-{i}", "embedding": vec, "uri": f"file:///photos/{i}.jpg",
            "metadata": {"n": i, **meta}, "visibility": vis, "updated_at": ts}


@pytest.fixture(params=["lite", "server", "standalone"])
def store(request):
    uri = request.getfixturevalue({"lite": "milvus_lite_uri", "server": "milvus_server_uri",
                                   "standalone": "milvus_standalone_uri"}[request.param])
    s = MilvusStore(uri, timeout=20)
    yield s
    s.close()


@pytest.fixture
def coll(store):
    name = collection_name("test model", uuid.uuid4().hex[:8])
    assert store.ensure_collection(name, DIM) is True
    yield name
    for alias in store.list_aliases(name):
        store.drop_alias(alias)
    store.drop_collection(name)


def test_collection_name_is_sanitised():
    assert collection_name("ResNet-18", "1.2") == "images__resnet_18__1_2"
    assert collection_name("9lives", "v1") == "images__m_9lives__v1"
    with pytest.raises(ValueError):
        collection_name("", "1")


def test_index_config_validates_and_bounds_search_params():
    cfg = IndexConfig.from_values("diskann", "ip", None, '{"search_list": 20}')
    assert (cfg.index_type, cfg.metric) == ("DISKANN", "IP")
    assert cfg.search_params_for(50) == {"search_list": 50}
    assert IndexConfig().search_params_for(5) == {"ef": 64}
    with pytest.raises(ValueError, match="index type"):
        IndexConfig("ANNOY")
    with pytest.raises(ValueError, match="metric"):
        IndexConfig(metric="L2")
    with pytest.raises(ValueError, match="JSON"):
        IndexConfig.from_values("HNSW", "COSINE", "{not json", None)


def test_uri_guard():
    with pytest.raises(ValueError, match="neither"):
        MilvusStore("localhost:19530")


def test_ensure_collection_is_idempotent_and_checks_dim(store, coll):
    assert store.ensure_collection(coll, DIM) is False
    assert store.dim(coll) == DIM
    with pytest.raises(ValueError, match="dimension 8, not 16"):
        store.ensure_collection(coll, 16)
    assert coll in store.list_collections()
    assert not any(n.endswith("__tombstones") for n in store.list_collections())


def test_upsert_get_count_delete(store, coll):
    rng = np.random.default_rng(0)
    v = unit(rng, 6)
    assert store.upsert(coll, [row(i, v[i], ts=10) for i in range(5)]) == 5
    assert store.count(coll) == 5
    # same id twice in one batch: the newest updated_at wins, then the later one
    n = store.upsert(coll, [row(1, v[5], ts=30, tag="new"), row(1, v[1], ts=20, tag="old"),
                            row(2, v[2], ts=40, tag="a"), row(2, v[3], ts=40, tag="b")])
    assert n == 2
    got = store.get(coll, ["img-1", "img-2", "img-404"], ("uri", "metadata", "visibility", "updated_at", "embedding"))
    assert set(got) == {"img-1", "img-2"}
    assert got["img-1"]["metadata"] == {"n": 1, "tag": "new"} and got["img-1"]["updated_at"] == 30
    assert np.allclose(got["img-1"]["embedding"], v[5], atol=1e-6)
    assert got["img-2"]["metadata"]["tag"] == "b"
    assert store.count(coll) == 5
    assert store.delete(coll, {"img-0": 50, "img-404": 51}) == 2
    assert store.count(coll) == 4
    assert store.versions(coll, ["img-0", "img-1", "img-404", "img-3"]) == {
        "img-0": 50, "img-1": 30, "img-404": 51, "img-3": 10}


def test_search_filter_and_alias(store, coll):
    rng = np.random.default_rng(1)
    v = unit(rng, 20)
    store.upsert(coll, [row(i, v[i], vis="private" if i % 2 else "public") for i in range(20)])
    hits = store.search(coll, v[:2], k=5, consistency="Strong")
    assert [h["id"] for h in (hits[0][0], hits[1][0])] == ["img-0", "img-1"]
    assert hits[0][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert hits[0][0]["uri"] == "file:///photos/0.jpg" and hits[0][0]["metadata"] == {"n": 0}
    scores = [h["score"] for h in hits[0]]
    assert scores == sorted(scores, reverse=True)
    pub = store.search(coll, v[1], k=20, filter='visibility == "public"', consistency="Strong")[0]
    assert pub and all(h["visibility"] == "public" for h in pub) and len(pub) == 10

    alias = "a_" + uuid.uuid4().hex[:8]
    assert store.describe_alias(alias) is None
    assert store.ensure_alias(alias, coll) is True
    assert store.ensure_alias(alias, coll) is False
    assert store.describe_alias(alias) == coll
    assert store.search(alias, v[3], k=1, consistency="Strong")[0][0]["id"] == "img-3"
    with pytest.raises(ValueError, match="still served"):
        store.drop_collection(coll)

    green = collection_name("test model", "green" + uuid.uuid4().hex[:6])
    store.ensure_collection(green, DIM)
    try:
        store.upsert(green, [row(100, v[3])])
        assert store.switch_alias(alias, green) == coll
        assert store.describe_alias(alias) == green
        assert store.search(alias, v[3], k=1, consistency="Strong")[0][0]["id"] == "img-100"
        assert store.switch_alias(alias, coll) == green
    finally:
        store.drop_alias(alias)
        store.drop_collection(green)
    assert store.describe_alias(alias) is None


def test_filters_of_several_values_match_any_of_them_on_every_server(store, coll):
    """Issue 18: a filter with several values of a key (``{"label": ["a", "b"]}``) was sent as
    ``in [...]``, which Milvus Lite refuses on a JSON field; the store's one builder writes it
    in a form all three servers take, text and numbers alike, quotes and non-ASCII included."""
    rng = np.random.default_rng(7)
    v = unit(rng, 8)
    labels = ["cat", "dog", 'say "hi"', "猫", "cat", "dog", "bird", "cat"]
    store.upsert(coll, [row(i, v[i], vis="private" if i == 7 else "public", label=labels[i], size=i % 3)
                        for i in range(8)])

    def ids(match, visible_only=True):
        hits = store.search(coll, v[0], k=20, filter=filter_expr(match, visible_only=visible_only),
                            consistency="Strong")[0]
        return sorted(h["id"] for h in hits)

    assert ids({"label": ["cat", "dog"]}) == ["img-0", "img-1", "img-4", "img-5"]      # img-7 is private
    assert ids({"label": ["cat", "dog"]}, visible_only=False) == ["img-0", "img-1", "img-4", "img-5", "img-7"]
    assert ids({"label": ['say "hi"', "猫"]}) == ["img-2", "img-3"]
    assert ids({"label": ["cat"], "size": [1, 2]}) == ["img-4"]
    assert ids({"size": [0, 2]}) == ["img-0", "img-2", "img-3", "img-5", "img-6"]
    assert ids({"label": "bird"}) == ["img-6"]
    assert ids({"label": ["fish", "cow"]}) == []
    assert store.count(coll, filter=filter_expr({"label": ["cat", "bird"]})) == 4
    assert filter_expr() == "" and filter_expr(visible_only=True) == 'visibility != "private"'
    with pytest.raises(ValueError, match="at least one value"):
        filter_expr({"label": []})


def test_scan_returns_every_row(store, coll):
    rng = np.random.default_rng(2)
    v = unit(rng, 30)
    store.upsert(coll, [row(i, v[i]) for i in range(30)])
    rows = list(store.scan(coll, ("uri",), batch_size=7))
    assert sorted(r["id"] for r in rows) == sorted(f"img-{i}" for i in range(30))


@pytest.mark.slow
def test_scan_of_freshly_written_rows_past_16384_returns_each_once(store, coll):
    """pymilvus 2.6's query iterator misses the newest rows of a 2.3.5 server (it reads at a
    client-side time stamp), and that server's offset paging stops at 16,384 rows: scan still
    returns every row exactly once, right after the writes, on all three kinds of Milvus."""
    n = 16_385
    v = unit(np.random.default_rng(4), n)
    for start in range(0, n, 4096):
        store.upsert(coll, [row(i, v[i]) for i in range(start, min(n, start + 4096))])
    ids = [r["id"] for r in store.scan(coll, ("uri",), batch_size=5000)]
    assert len(ids) == n and len(set(ids)) == n


def test_errors_come_by_kind(store, coll):
    assert store.describe_alias("no_such_alias") is None
    with pytest.raises(StoreNotFound):
        store.count("no_such_collection")
    with pytest.raises(StoreRefused):
        store.count(coll, filter="id === 'x'")              # not an expression Milvus parses


def test_bad_input_is_refused_before_sending(store, coll):
    v = unit(np.random.default_rng(3), 1)[0]
    with pytest.raises(ValueError, match="visibility"):
        store.upsert(coll, [row(1, v, vis="hidden")])
    with pytest.raises(ValueError, match="lacks"):
        store.upsert(coll, [{"id": "x", "embedding": v}])
    with pytest.raises(ValueError, match="finite"):
        store.upsert(coll, [row(1, np.full(DIM, np.nan))])
    with pytest.raises(ValueError, match="not a valid Milvus"):
        store.count("bad-name")
    with pytest.raises(ValueError, match="k must be"):
        store.search(coll, v, k=0)
    assert store.count(coll) == 0


def test_unreachable_server_raises_store_unavailable():
    s = MilvusStore(f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(StoreUnavailable):
        s.list_collections()
    assert s.ping() is False


def test_collection_properties_are_set_read_and_cleared_on_every_server(store, coll):
    """The online experiment's switch (``vsearch.experiment`` on the serving collection): set,
    read through an alias, cleared by writing "" (the 2.3.5 server cannot drop a property); the
    collection keeps serving meanwhile."""
    v = unit(np.random.default_rng(4), 1)[0]
    store.upsert(coll, [row(0, v)])
    alias = f"props_{uuid.uuid4().hex[:8]}"
    store.ensure_alias(alias, coll)
    assert "vsearch.experiment" not in store.collection_properties(coll)
    store.set_collection_property(coll, "vsearch.experiment", '{"id":"exp-1"}')
    assert store.collection_properties(alias)["vsearch.experiment"] == '{"id":"exp-1"}'
    assert store.search(alias, [v], k=1, consistency="Strong")[0][0]["id"] == "img-0"
    store.set_collection_property(coll, "vsearch.experiment", "")
    assert store.collection_properties(coll).get("vsearch.experiment", "") == ""
    with pytest.raises(StoreNotFound):
        store.set_collection_property("no_such_collection", "vsearch.experiment", "")
    with pytest.raises(ValueError, match="written once"):
        store.set_collection_property(coll, "vsearch.model", "{}")
    with pytest.raises(ValueError, match="property key"):
        store.set_collection_property(coll, "", "x")
