"""The operator end to end: ``vsearch operator`` (kopf) against kmock's Kubernetes API over
HTTP, the test kubelet running the InferenceServices and Deployments it creates as real
``vsearch serve embedder`` / ``vsearch ingest`` processes, the real Tansu broker, real Milvus
(``milvus-lite server`` here, the 2.3.5 standalone server in test_gate.py), two real model
directories of different embedding sizes, and ``vsearch serve search`` answering throughout."""

from __future__ import annotations

import time

import pytest

from tests.fixtures.catalog import publish
from tests.fixtures.cluster import searchindex
from tests.fixtures.operators import SearchLoop, catalog_files, delete_record, unique, upsert_record
from tests.fixtures.waiting import wait_until
from vsearch.core.store import MilvusStore
from vsearch.local import services
from vsearch.operators.kafka_groups import KafkaGroups
from vsearch.operators.spec import ModelRef, VersionRef

BASE_TS = 1_700_000_000_000


def names(version: str) -> VersionRef:
    """What the operator derives for SearchIndex vs/shop, model tiny-a ``version``."""
    return VersionRef.of("shop", "vs", ModelRef("tiny-a", version, ""))


V1, V2 = names("1"), names("2")
C1, C2 = V1.collection, V2.collection


# several minutes on a loaded 2-core machine (421 s and 290 s measured at load 8)
@pytest.mark.timeout(900)
def test_blue_green_rollout_kill_restart_rollback_and_delete(tmp_path, cluster, broker, milvus_server_uri,
                                                            rollout_models):
    topic, alias, name = unique("catalog-ro-"), unique("ro_"), "shop"
    items = catalog_files(tmp_path / "photos", n_classes=4, per_class=4)        # 16 distinct photos
    publish(broker, topic, [upsert_record(i, p, lbl, BASE_TS + n) for n, (i, p, lbl) in enumerate(items)],
            partitions=2)
    cluster.start_operator()
    cluster.api.create("searchindexes", searchindex(
        name, bootstrap=broker, topic=topic, milvus_uri=milvus_server_uri, alias=alias, model="tiny-a",
        version="1", uri=str(rollout_models["1"])))
    st = cluster.wait_phase(name, "Ready", 180, version="1")["status"]
    assert st["serving"]["collection"] == C1 and st["serving"]["dim"] == 16
    assert st["gate"]["verdict"] == "Passed" and st["gate"]["selfConsistency"]["found"] == 16
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Progressing"]["status"] == "False"
    assert conds["Ready"]["observedGeneration"] == 1 == st["observedGeneration"]

    # the search service, embedding with whichever version built the collection the alias names
    search = services.start_search(
        "--embedder-url", st["serving"]["embedderUrl"], "--milvus-uri", milvus_server_uri, "--alias", alias,
        "--query-store", "", "--dedup-distance", "0",
        "--allowed-embedder-urls", "http://127.0.0.1:*", log_path=tmp_path / "search.log")
    stable = [(i, p.read_bytes()) for i, p, _ in items[2:12]]
    loop = SearchLoop(search.url, stable, threads=3).start()
    try:
        time.sleep(2)
        # v2 (another architecture and embedding size): a new rollout
        cluster.api.patch("searchindexes", name, {"spec": {"model": {"version": "2", "uri": str(rollout_models["2"])}}})
        st = cluster.wait_phase(name, "Backfilling", 120, version="2")["status"]
        assert st["serving"]["version"] == "1" and st["candidate"]["collection"] == C2
        # live catalog changes during the backfill: two new items, two deleted
        extra = [(f"new-{k}", p, lbl) for k, (_, p, lbl) in enumerate(items[12:14])]
        publish(broker, topic, [upsert_record(i, p, lbl, BASE_TS + 1000 + n) for n, (i, p, lbl) in enumerate(extra)]
                + [delete_record(items[0][0], BASE_TS + 2000), delete_record(items[1][0], BASE_TS + 2001)],
                partitions=2)
        cluster.kill_operator()                                  # SIGKILL in Backfilling
        time.sleep(1)
        # restart; it dies again (SIGKILL) right after the alias switch, before writing the status
        first = cluster.start_operator(failpoints="after-alias-switch")
        wait_until(lambda: not first.alive(), 180, 0.2, "the operator never reached the switch")
        with MilvusStore(milvus_server_uri) as store:
            assert store.describe_alias(alias) == C2       # switched ...
        assert cluster.index(name)["status"]["phase"] == "Switching"    # ... but not recorded
        cluster.start_operator()
        st = cluster.wait_phase(name, "Ready", 120, version="2")["status"]
        assert st["previous"]["version"] == "1" and st["previous"]["collection"] == C1
        assert [h["to"] for h in st["history"]] == ["1", "2"], st["history"]       # one switch each
        assert st["gate"]["candidate"] == "2" and st["gate"]["verdict"] == "Passed"
        assert st["observedGeneration"] == 2
        # two operator crashes, no duplicated work: one embedder and one ingest process per version
        assert sorted(cluster.kubelet.starts.items()) == sorted([
            (V1.embedder_name, 1), (V1.ingest_name, 1), (V2.embedder_name, 1), (V2.ingest_name, 1)]), \
            cluster.kubelet.starts

        # both collections hold the catalog with the changes made during the backfill
        want = {i for i, _, _ in items[2:]} | {i for i, _, _ in extra}
        with MilvusStore(milvus_server_uri) as store:
            got: dict = {}

            def both_hold_the_catalog() -> bool:
                got.update({c: {r["id"] for r in store.scan(c, ())} for c in (C1, C2)})
                return all(v == want for v in got.values())

            wait_until(both_hold_the_catalog, 60, 0.5, message=None)
            assert got[C1] == want and got[C2] == want
            assert store.model_record(C2)["dim"] == 32

        time.sleep(2)
        # rollback after the switch: the annotation moves the alias back to the retained v1
        cluster.api.patch("searchindexes", name, {"metadata": {"annotations": {"vsearch.io/rollback": "r1"}}})
        st = cluster.wait_for(name, lambda s: (s.get("serving") or {}).get("version") == "1"
                              and s.get("phase") == "Ready", 60, "rolled back to 1")["status"]
        assert st["previous"]["version"] == "2" and st["history"][-1]["action"] == "rollback"
        assert {c["type"]: c["status"] for c in st["conditions"]}["Degraded"] == "True"
        with MilvusStore(milvus_server_uri) as store:
            assert store.describe_alias(alias) == C1
        time.sleep(2)
    finally:
        loop.stop()
        search.stop()
    assert loop.answered > 30
    assert not loop.failed, loop.failed[:5]
    assert not loop.mixed, loop.mixed[:5]
    assert set(loop.collections) == {C1, C2}, loop.collections
    reasons = [e.get("reason") for e in cluster.events(name)]
    for r in ("Deploying", "Backfilling", "Verifying", "Switching", "Switched", "RollingBack", "RolledBack"):
        assert r in reasons, reasons

    # deleting the SearchIndex removes everything it made, Milvus and Kafka included
    cluster.api.delete("searchindexes", name)
    wait_until(lambda: cluster.api.get("searchindexes", name) is None, 90, 0.3,
               lambda: cluster.operator.log_tail(40))
    assert cluster.api.list("inferenceservices") == [] and cluster.api.list("deployments") == []
    with MilvusStore(milvus_server_uri) as store:
        assert store.describe_alias(alias) is None
        assert not {C1, C2} & set(store.list_collections(include_tombstones=True))
    groups = KafkaGroups(broker)
    assert groups.committed(st["serving"]["consumerGroup"]) == {}
    assert groups.committed(st["previous"]["consumerGroup"]) == {}
    # the kubelet stops the processes (SIGTERM, grace)
    wait_until(lambda: not cluster.kubelet.pods, 40, 0.3, lambda: f"pods left: {cluster.kubelet.pods}")
