"""``vsearch operator`` on the kmock cluster refuses what writing a SearchIndex does not grant
(the operator's allow-lists, not the object's) and never reads a local file a golden set names:
the reason is in the status, and nothing is created for such an object."""

from __future__ import annotations

from tests.fixtures.cluster import searchindex
from tests.fixtures.operators import unique


def test_what_the_configuration_does_not_grant_is_refused_with_the_reason(cluster, broker, milvus_server_uri):
    cluster.api.create("secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "admin"},
                                   "data": {"token": "cm9vdDpNaWx2dXM="}})
    cluster.start_operator(allow={"--allowed-secrets": "milvus-token"})
    obj = searchindex("thief", bootstrap=broker, topic=unique("t-"), milvus_uri="http://recorder.example.com:19530",
                      alias=unique("a_"), model="m", version="1", uri="/m")
    obj["spec"]["milvus"]["tokenSecretRef"] = {"name": "admin"}
    obj["spec"]["embedder"].update(image="attacker.example.com/exfil:1", serviceAccountName="vsearch-operator",
                                   env=[{"name": "T", "valueFrom": {"secretKeyRef": {"name": "admin", "key": "token"}}}])
    cluster.api.create("searchindexes", obj)
    st = cluster.wait_for("thief", lambda s: s.get("reason") == "NotAllowed", 30, "NotAllowed")["status"]
    msg = st["message"]
    for part in ("spec.milvus.tokenSecretRef: Secret 'admin' is not in the operator's --allowed-secrets",
                 "spec.milvus.uri: http://recorder.example.com:19530 is not in the operator's --allowed-milvus-hosts",
                 "spec.embedder.image: 'attacker.example.com/exfil:1' is not under the operator's --allowed-images",
                 "spec.embedder.serviceAccountName: 'vsearch-operator' is not in",
                 "spec.embedder.env[0].valueFrom.secretKeyRef: Secret 'admin'"):
        assert part in msg, msg
    assert st["phase"] == "Failed"
    assert {c["type"]: c for c in st["conditions"]}["Degraded"]["reason"] == "NotAllowed"
    assert "NotAllowed" in [e.get("reason") for e in cluster.events("thief")]
    assert cluster.api.list("inferenceservices") == [] and cluster.api.list("deployments") == []


def test_a_golden_set_naming_a_local_file_is_refused_before_anything_is_deployed(cluster, broker,
                                                                                 milvus_server_uri):
    cluster.api.create("configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "golden"},
                                      "data": {"judgments.csv": "query,candidate,grade\n"
                                               "catalog:a,b,1\n"
                                               "file:///var/run/secrets/kubernetes.io/serviceaccount/token,b,1\n"}})
    cluster.start_operator()
    cluster.api.create("searchindexes", searchindex(
        "golden", bootstrap=broker, topic=unique("t-"), milvus_uri=milvus_server_uri, alias=unique("a_"),
        model="m", version="1", uri="/m", gate={"golden": {"configMapRef": {"name": "golden"}}}))
    st = cluster.wait_for("golden", lambda s: s.get("reason") == "GoldenSetRefused", 60, "GoldenSetRefused")["status"]
    assert st["phase"] == "Failed" and "reads no local files" in st["message"], st
    assert "file:///var/run/secrets" in st["message"] and st["failed"]["version"] == "1"
    assert cluster.api.list("inferenceservices") == [] and cluster.api.list("deployments") == []
