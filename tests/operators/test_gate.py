"""The quality gate and manual approval, on the real Milvus 2.3.5 standalone server: a
random-initialised candidate against a golden set ends Failed with blue serving and the figures
in the status; a good candidate with ``requireApproval`` waits for the annotation; an invalid
object (which kmock, unlike an API server, accepts) is reported, never acted on."""

from __future__ import annotations

import pytest

from tests.fixtures.catalog import publish
from tests.fixtures.cluster import searchindex
from tests.fixtures.operators import catalog_files, golden_csv, model_copy, unique, upsert_record
from vsearch.core.store import MilvusStore
from vsearch.operators.spec import ModelRef, VersionRef
from vsearch.predictor.model_dir import default_model_dir
from vsearch.predictor.zoo import init_model_dir

BASE_TS = 1_700_000_000_000
REPO_MODEL = default_model_dir()


def collection(version: str) -> str:
    return VersionRef.of("gated", "vs", ModelRef("default", version, "")).collection


# several minutes on a loaded 2-core machine (421 s and 290 s measured at load 8)
@pytest.mark.timeout(900)
def test_gate_refuses_a_random_model_then_approval_switches_a_good_one(tmp_path, cluster, broker,
                                                                       milvus_standalone_uri):
    topic, alias, name = unique("catalog-gate-"), unique("gate_"), "gated"
    items = catalog_files(tmp_path / "photos", n_classes=5, per_class=4)
    publish(broker, topic, [upsert_record(i, p, lbl, BASE_TS + n) for n, (i, p, lbl) in enumerate(items)],
            partitions=1)
    # golden set: each of ten items should find the other photos of its class
    golden = golden_csv([(i, lbl) for i, _, lbl in items], every=2)
    cluster.api.create("configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "golden"},
                                      "data": {"judgments.csv": golden}})
    random_dir, good_dir = tmp_path / "random", tmp_path / "good"
    init_model_dir("resnet-tiny", random_dir, name="default", version="2", seed=7)
    model_copy(REPO_MODEL, good_dir, "3")

    # the default gate (requireOfflineVerdict on) plus a golden set: the repository's model and its
    # copies carry a passing offline evaluation, the random candidate none
    gate = {"sampleSize": 20, "golden": {"configMapRef": {"name": "golden"}, "margin": 0.0}}
    cluster.start_operator()
    cluster.api.create("searchindexes", searchindex(
        name, bootstrap=broker, topic=topic, milvus_uri=milvus_standalone_uri, alias=alias, model="default",
        version="1", uri=str(REPO_MODEL), gate=gate))
    st = cluster.wait_phase(name, "Ready", 240, version="1")["status"]
    assert st["gate"]["golden"]["candidate"]["ndcg@10"] is not None

    cluster.api.patch("searchindexes", name, {"spec": {"model": {"version": "2", "uri": str(random_dir)}}})
    st = cluster.wait_phase(name, "Failed", 240)["status"]
    assert st["reason"] == "GateFailed" and "golden set" in st["message"], st["message"]
    assert "offline verdict" in st["message"] and "never evaluated" in st["message"], st["message"]
    g = st["gate"]["golden"]
    assert g["candidate"]["ndcg@10"] < g["serving"]["ndcg@10"], g
    assert st["serving"]["version"] == "1" and st["failed"]["version"] == "2"
    with MilvusStore(milvus_standalone_uri) as store:
        assert store.describe_alias(alias) == collection("1")              # blue still serves
    degraded = {c["type"]: c for c in st["conditions"]}["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "GateFailed"
    # the failed candidate is cleaned up; the failed target is not retried
    st = cluster.wait_for(name, lambda s: not s.get("candidate"), 60, "candidate cleaned up")["status"]
    assert st["phase"] == "Failed"

    cluster.api.patch("searchindexes", name, {"spec": {"model": {"version": "3", "uri": str(good_dir)},
                                                       "rollout": {"requireApproval": True}}})
    st = cluster.wait_phase(name, "AwaitingApproval", 240, version="3")["status"]
    assert st["gate"]["verdict"] == "Passed" and "vsearch.io/approve=3" in st["message"]
    with MilvusStore(milvus_standalone_uri) as store:
        assert store.describe_alias(alias) == collection("1")
    cluster.api.patch("searchindexes", name, {"metadata": {"annotations": {"vsearch.io/approve": "3"}}})
    st = cluster.wait_phase(name, "Ready", 60, version="3")["status"]
    assert st["serving"]["version"] == "3" and st["previous"]["version"] == "1"
    with MilvusStore(milvus_standalone_uri) as store:
        assert store.describe_alias(alias) == collection("3")
    assert "Approved" in [e.get("reason") for e in cluster.events(name)]

    # an object the API server would refuse: kmock stores it; the operator reports, does nothing
    bad = searchindex("broken", bootstrap=broker, topic=topic, milvus_uri=milvus_standalone_uri, alias=alias,
                      model="default", version="9", uri=str(good_dir))
    bad["spec"]["milvus"]["index"]["type"] = "ANNOY"
    bad["spec"]["rollout"]["retentionSeconds"] = -5
    cluster.api.create("searchindexes", bad)
    st = cluster.wait_for("broken", lambda s: s.get("reason") == "InvalidSpec", 30, "InvalidSpec")["status"]
    assert "spec.milvus.index.type: Unsupported value: 'ANNOY'" in st["message"], st["message"]
    assert "spec.rollout.retentionSeconds: Invalid value: -5" in st["message"]
    assert cluster.api.list("inferenceservices") and not any(
        o["metadata"]["name"].startswith("broken") for o in cluster.api.list("inferenceservices"))
    cluster.api.delete("searchindexes", "broken")          # it made nothing: gone at once
    cluster.wait_for("broken", lambda s: not s, 30, "deleted")
    assert cluster.api.get("searchindexes", "broken") is None
