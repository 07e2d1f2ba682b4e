"""Names the operator derives cannot collide through joins or sanitising; what a SearchIndex may
ask for is what the operator's allow-lists grant; the workloads it creates are hardened."""

from __future__ import annotations

import itertools

import pytest

from tests.operators.test_crd import GOOD
from vsearch.operators.spec import IndexSpec, ModelRef, VersionRef, default_alias
from vsearch.operators.trust import Trust
from vsearch.operators.workloads import KubernetesWorkloads
from vsearch.predictor.search.service import embedder_url_allowed

# Each group reads alike once joined or sanitised; every derived name must still differ.
CLASHES = [
    [("ns", "shop", "m", "1.0"), ("ns", "shop", "m", "1-0"), ("ns", "shop", "m", "1_0")],
    [("team-a-b", "c", "m", "1"), ("team-a", "b-c", "m", "1")],
    [("ns", "a-b", "c", "1"), ("ns", "a", "b-c", "1"), ("ns", "a", "b", "c-1")],
    [("ns", "shop", "M", "1"), ("ns", "shop", "m", "1")],
]


def ref(ns, index, model, version) -> VersionRef:
    return VersionRef.of(index, ns, ModelRef(model, version, "s3://m"))


@pytest.mark.parametrize("group", CLASHES)
def test_names_never_collide(group):
    refs = [ref(*t) for t in group]
    for a, b in itertools.combinations(refs, 2):
        assert a.collection != b.collection and a.group != b.group
        if a.namespace == b.namespace:             # workloads live in their namespace
            assert a.embedder_name != b.embedder_name and a.ingest_name != b.ingest_name
    for r in refs:
        assert len(r.embedder_name) <= 45 and len(r.ingest_name) <= 63
        assert r.collection.startswith(f"images__{r.model.lower().replace('-', '_')}__")


def test_aliases_are_per_index_and_long_names_stay_valid():
    assert default_alias("team-a-b", "c") != default_alias("team-a", "b-c")
    long = ref("n" * 63, "i" * 63, "m" * 63, "v" * 40)
    assert len(long.collection) <= 255 - len("__tombstones") and len(long.embedder_name) <= 45
    assert len(default_alias("n" * 63, "i" * 253)) <= 255


def spec_with(**changes) -> IndexSpec:
    spec = {**GOOD["spec"], **changes}
    return IndexSpec.from_dict(spec, namespace="shop", index="catalog")


def test_a_spec_gets_only_what_the_operators_configuration_grants():
    trust = Trust(secrets=("milvus", "other/*"), milvus_hosts=("milvus", "db.example.com:443"),
                  images=("registry.example.com/vsearch:", "vsearch:"), service_accounts=("shop/vsearch-models",))
    assert trust.refusals("shop", spec_with()) == []
    asks = spec_with(milvus={"uri": "http://evil.example.com:19530", "tokenSecretRef": {"name": "admin"}},
                     embedder={"image": "evil.example.com/x:1", "serviceAccountName": "operator",
                               "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "admin", "key": "k"}}},
                                       {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
                     ingest={"image": "vsearch:1", "serviceAccountName": "vsearch-models"})
    refused = trust.refusals("shop", asks)
    assert refused == [
        "spec.milvus.tokenSecretRef: Secret 'admin' is not in the operator's --allowed-secrets",
        "spec.milvus.uri: http://evil.example.com:19530 is not in the operator's --allowed-milvus-hosts",
        "spec.embedder.image: 'evil.example.com/x:1' is not under the operator's --allowed-images "
        "(registry.example.com/vsearch:, vsearch:)",
        "spec.embedder.serviceAccountName: 'operator' is not in the operator's --allowed-service-accounts",
        "spec.embedder.env[0].valueFrom.secretKeyRef: Secret 'admin' is not in the operator's --allowed-secrets",
    ], refused
    assert trust.secret_allowed("other", "admin") and not trust.secret_allowed("shop", "admin")
    assert trust.service_account_allowed("shop", "vsearch-models")
    assert not trust.service_account_allowed("team-b", "vsearch-models")
    assert trust.milvus_allowed("https://db.example.com") and not trust.milvus_allowed("http://db.example.com:19530")
    assert not trust.milvus_allowed("http://user:pw@milvus:19530")
    # the defaults grant no Secret, no Milvus and no service account: nothing runs until configured
    assert len(Trust().refusals("shop", spec_with())) == 2


def test_operator_pods_have_a_read_only_root_filesystem_and_scratch_space():
    spec = spec_with()
    v = VersionRef.of("catalog", "shop", spec.model)
    w = KubernetesWorkloads.__new__(KubernetesWorkloads)
    w.owner = {"metadata": {"name": "catalog", "namespace": "shop", "uid": "u"}}
    isvc = w.embedder_body(spec, v)["spec"]["predictor"]
    dep = w.ingest_body(spec, v, "http://e")["spec"]["template"]["spec"]
    for pod in (isvc, dep):
        (c,) = pod["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp", "/var/lib/vsearch"}
        assert {v["name"]: v["emptyDir"] for v in pod["volumes"]}["tmp"] == {"sizeLimit": "1Gi"}
        assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("url,ok", [
    ("http://shop-m-1-1a2b3c4d-embedder-predictor.shop.svc", True),
    ("http://x-predictor.shop.svc.cluster.local", True),
    ("http://attacker.example.com/x-predictor.shop.svc", False),
    ("http://user@x-predictor.shop.svc", False),
    ("http://x-predictor.shop.svc.attacker.example.com", False),
    ("http://x-predictor.other.svc", False),
    ("http://x-predictor.shop.svc/v2?q=1", False),
])
def test_the_search_service_sends_queries_only_to_allowed_embedders(url, ok):
    """The other end of ownership: a collection's record names its embedder, but whoever made the
    collection wrote it; the chart allows its namespace's predictor Services only."""
    patterns = ("http://*-predictor.shop.svc", "http://*-predictor.shop.svc.cluster.local")
    assert embedder_url_allowed(url, patterns) is ok
