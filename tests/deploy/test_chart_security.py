"""The chart's defaults as a security review would sign them (issue 18): the search API needs a
key (an existing Secret, or one the chart generates on install and keeps on upgrades), the
NetworkPolicies are on and cover the embedders and consumers the operator creates, and the
operator's Role reads only the Secrets named in the values. Each default can be opened, and the
NOTES say when it is."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys

import pytest
import yaml

from tests.deploy import k8s
from tests.deploy.k8s import CHART, NAMESPACE, REPO, profile_file
from tests.deploy.test_chart_operator import operator_bodies
from tests.fixtures.cluster import KubeAPI
from vsearch.local import services


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind, name):
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def search_env(objs) -> dict:
    isvc = one(objs, "InferenceService", "vsearch-search")
    return {e["name"]: e for e in isvc["spec"]["predictor"]["containers"][0]["env"]}


def test_the_defaults_require_a_key_and_turn_the_policies_on():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["search"]["apiKey"]["required"] is True
    assert values["networkPolicy"]["enabled"] is True
    assert values["operator"]["allowedSecrets"] == []


# --------------------------------------------------------------------------- the API key

def test_without_a_secret_the_chart_generates_the_key(tools):
    objs = tools.render("minimal")
    secret = one(objs, "Secret", "vsearch-api-key")
    assert secret["type"] == "Opaque"
    key = base64.b64decode(secret["data"]["api-key"]).decode()
    assert len(key) == 40 and key.isalnum()
    ref = {"name": "vsearch-api-key", "key": "api-key"}
    assert search_env(objs)["VSEARCH_SEARCH_API_KEY"]["valueFrom"]["secretKeyRef"] == ref
    (test_pod,) = [o for o in objs if (o["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
    env = {e["name"]: e for e in test_pod["spec"]["containers"][0]["env"]}
    assert env["API_KEY"]["valueFrom"]["secretKeyRef"] == ref
    # a fresh random key per render without a cluster to read it back from
    again = base64.b64decode(one(tools.render("minimal"), "Secret", "vsearch-api-key")["data"]["api-key"]).decode()
    assert again != key


# kmock as helm's `--dry-run=server` needs it: a Kubernetes version the chart accepts, and the core
# group's discovery as client-go reads it (kmock answers "/v1" for "v1"; Secrets with their verbs).
KMOCK_FOR_HELM = """
import asyncio, sys
from kmock import ResourceInfo
from tests.fixtures import kmock_server as ks
class ForHelm(ks.FaithfulEmulator):
    async def _serve_server_version(self, request):
        return {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}
    async def _serve_version(self, request):
        out = await super()._serve_version(request)
        out["groupVersion"] = out["groupVersion"].lstrip("/")
        return out
ks.FaithfulEmulator = ForHelm
ks.RESOURCES["v1/secrets"] = ResourceInfo(kind="Secret", singular="secret", namespaced=True, verbs=ks.VERBS)
asyncio.run(ks.serve(int(sys.argv[1])))
"""


def test_upgrades_keep_the_generated_key(tools, tmp_path):
    """Helm's `lookup` against an API server (kmock, the suite's in-memory one): with no Secret
    the chart makes a new key; once the release's Secret exists, a render keeps its key. The
    chart is reduced to that template and the helpers (kmock serves too few kinds for the rest)."""
    script = tmp_path / "kmock_for_helm.py"
    script.write_text(KMOCK_FOR_HELM)
    port = services.free_port()
    kmock = services.Service("kmock", [sys.executable, str(script), str(port)], port=port,
                             env={**os.environ, "PYTHONPATH": str(REPO)},
                             log_path=tmp_path / "kmock.log").wait_ready(30)
    try:
        url = f"http://127.0.0.1:{port}"
        kubeconfig = tmp_path / "kubeconfig.yaml"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: kmock, cluster: {{server: '{url}'}}}}]\n"
            "users: [{name: tester, user: {token: test-token}}]\n"
            f"contexts: [{{name: test, context: {{cluster: kmock, user: tester, namespace: {NAMESPACE}}}}}]\n"
            "current-context: test\n")
        chart = tmp_path / "vsearch"
        shutil.copytree(CHART, chart)
        for p in (chart / "templates").rglob("*"):
            if p.is_file() and p.name not in ("_helpers.tpl", "search-apikey-secret.yaml"):
                p.unlink()

        def rendered_key() -> str:
            res = k8s.run([tools.helm, "template", "vsearch", chart, "-n", NAMESPACE, "--skip-crds",
                           "-f", profile_file("minimal"), "--dry-run=server", "--disable-openapi-validation",
                           "--kubeconfig", kubeconfig])
            assert res.returncode == 0, res.stderr
            (secret,) = k8s.load_all(res.stdout)
            return base64.b64decode(secret["data"]["api-key"]).decode()

        first = rendered_key()
        assert len(first) == 40 and rendered_key() != first        # no Secret yet: a new key each time
        kept = "K" * 40
        KubeAPI(url, NAMESPACE).create("secrets", {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "vsearch-api-key", "namespace": NAMESPACE,
                         "labels": {"app.kubernetes.io/managed-by": "Helm"},
                         "annotations": {"meta.helm.sh/release-name": "vsearch", "meta.helm.sh/release-namespace": NAMESPACE}},
            "data": {"api-key": base64.b64encode(kept.encode()).decode()}})
        assert rendered_key() == kept
    finally:
        kmock.stop()


def test_an_existing_secret_is_used_and_none_generated(tools):
    objs = tools.render("full")
    assert not by_kind(objs, "Secret")
    assert search_env(objs)["VSEARCH_SEARCH_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "vsearch-api-key", "key": "api-key"}


def test_opening_the_api_needs_saying_so_and_the_notes_warn(tools):
    objs = tools.render("minimal", set_values=["search.apiKey.required=false"])
    assert not by_kind(objs, "Secret") and "VSEARCH_SEARCH_API_KEY" not in search_env(objs)
    res = k8s.run([tools.helm, "install", "vsearch", CHART, "-n", NAMESPACE, "--dry-run=client",
                   "-f", profile_file("minimal"), "--set", "search.apiKey.required=false"])
    assert "WARNING: no API key is required (search.apiKey.required=false)" in res.stdout.split("NOTES:", 1)[1]


# --------------------------------------------------------------------------- the operator's Secrets

def role_secret_names(objs) -> list | None:
    role = one(objs, "Role", "vsearch-operator")
    rules = [r for r in role["rules"] if "secrets" in r["resources"]]
    if not rules:
        return None
    (rule,) = rules
    assert rule["verbs"] == ["get"] and rule["resources"] == ["secrets"]
    return rule["resourceNames"]


def operator_env(objs) -> dict:
    dep = one(objs, "Deployment", "vsearch-operator")
    return {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_the_operator_reads_only_the_named_secrets(tools):
    # no Milvus token, no allowed Secrets: no Secret at all
    objs = tools.render("minimal")
    assert role_secret_names(objs) is None
    assert operator_env(objs)["VSEARCH_OPERATOR_ALLOWED_SECRETS"] == ""
    # the Milvus token's Secret
    objs = tools.render("full")
    assert role_secret_names(objs) == ["milvus-root-token"]
    assert operator_env(objs)["VSEARCH_OPERATOR_ALLOWED_SECRETS"] == "milvus-root-token"
    # and more by name, in every watched namespace, the same list for the Role and the operator
    objs = tools.render("full", set_values=["operator.allowedSecrets={team-b-milvus,milvus-root-token}",
                                            "operator.watchNamespaces={shop,images}"])
    roles = [r for r in by_kind(objs, "Role") if r["metadata"]["name"] == "vsearch-operator"]
    assert {r["metadata"]["namespace"] for r in roles} == {"shop", "images"}
    for role in roles:
        (rule,) = [r for r in role["rules"] if "secrets" in r["resources"]]
        assert rule["resourceNames"] == ["milvus-root-token", "team-b-milvus"]
    assert operator_env(objs)["VSEARCH_OPERATOR_ALLOWED_SECRETS"] == "milvus-root-token,team-b-milvus"


def test_allowed_secret_names_are_checked(tools, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("operator:\n  allowedSecrets: ['*']\n")
    res = tools.template(profile_file("minimal"), bad, check=False)
    assert res.returncode != 0 and "/operator/allowedSecrets/0" in res.stderr, res.stderr


# --------------------------------------------------------------------------- NetworkPolicies

def selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels, matchExpressions with In/NotIn/Exists/DoesNotExist)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def admits(policy: dict, pod_labels: dict, pod_namespace: str, port: int) -> bool:
    """Whether one NetworkPolicy lets a pod (labels, namespace) connect on a port (namespaces
    carry their kubernetes.io/metadata.name label)."""
    ns_labels = {"kubernetes.io/metadata.name": pod_namespace}
    own_ns = policy["metadata"].get("namespace", NAMESPACE)
    for rule in policy["spec"].get("ingress") or []:
        if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
            continue
        peers = rule.get("from")
        if peers is None:
            return True
        for peer in peers:
            ns_ok = selects(peer["namespaceSelector"], ns_labels) if "namespaceSelector" in peer \
                else pod_namespace == own_ns
            pod_ok = selects(peer["podSelector"], pod_labels) if "podSelector" in peer else True
            if ns_ok and pod_ok and ("podSelector" in peer or "namespaceSelector" in peer):
                return True
    return False


def test_the_policies_select_the_operators_workloads_and_let_in_only_their_clients(tools):
    objs = tools.render("full")
    policies = by_kind(objs, "NetworkPolicy")
    isvc, deployment = operator_bodies(one(objs, "SearchIndex", "vsearch"))
    # KServe copies the InferenceService's labels onto its predictor pods
    embedder_pod = isvc["metadata"]["labels"]
    ingest_pod = deployment["spec"]["template"]["metadata"]["labels"]
    (emb_policy,) = [p for p in policies if selects(p["spec"]["podSelector"], embedder_pod)]
    (ing_policy,) = [p for p in policies if selects(p["spec"]["podSelector"], ingest_pod)]
    assert emb_policy["metadata"]["name"] == "vsearch-operator-embedders"
    assert ing_policy["metadata"]["name"] == "vsearch-operator-ingest"

    search_pod = one(objs, "InferenceService", "vsearch-search")["spec"]["predictor"]["labels"]
    operator_pod = one(objs, "Deployment", "vsearch-operator")["spec"]["template"]["metadata"]["labels"]
    monitoring = {"app": "prometheus"}
    for who, labels, ns in (("the search service", search_pod, NAMESPACE), ("the operator", operator_pod, NAMESPACE),
                            ("the consumers", ingest_pod, NAMESPACE), ("the scrapers", monitoring, "monitoring")):
        assert admits(emb_policy, labels, ns, 8080), f"{who} cannot reach the operator's embedders"
    for who, labels, ns in (("another pod", {"app": "shop"}, NAMESPACE), ("another namespace", search_pod, "shop")):
        assert not admits(emb_policy, labels, ns, 8080), f"{who} reaches the operator's embedders"
    assert admits(ing_policy, monitoring, "monitoring", 9100)
    assert not admits(ing_policy, search_pod, NAMESPACE, 9100)
    # the chart's own workloads are not selected by the operator's policies
    for p in (emb_policy, ing_policy):
        assert not selects(p["spec"]["podSelector"], search_pod)
        assert not selects(p["spec"]["podSelector"], operator_pod)


def test_minimal_policies_close_the_operators_consumers(tools):
    objs = tools.render("minimal")
    policies = {p["metadata"]["name"]: p for p in by_kind(objs, "NetworkPolicy")}
    assert policies["vsearch-operator-ingest"]["spec"]["ingress"] == []
    assert policies["vsearch-operator"]["spec"]["ingress"] == []
    # the search API: any source, on its port only
    assert policies["vsearch-search"]["spec"]["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}]}]


def test_a_policy_pair_per_watched_namespace_and_extra_embedder_peers(tools):
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "storefront"}}}
    objs = tools.render("minimal", set_values=["operator.watchNamespaces={shop,images}"])
    found = {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in by_kind(objs, "NetworkPolicy")
             if p["metadata"].get("namespace")}
    assert found == {(ns, n) for ns in ("shop", "images") for n in ("vsearch-operator-embedders", "vsearch-operator-ingest")}
    res = tools.template(profile_file("minimal"), extra=["--set-json", f"networkPolicy.embedderFrom=[{json.dumps(peer)}]"])
    emb = one(k8s.load_all(res.stdout), "NetworkPolicy", "vsearch-operator-embedders")
    assert peer in emb["spec"]["ingress"][0]["from"]


@pytest.mark.parametrize("version", ["1.29", "1.37"])
def test_the_policies_are_valid(tools, version):
    for profile in ("minimal", "full"):
        for p in by_kind(tools.render(profile), "NetworkPolicy"):
            k8s.validate_builtin(p, version)


def test_turning_the_policies_off_is_said_in_the_notes(tools):
    assert not by_kind(tools.render("minimal", set_values=["networkPolicy.enabled=false"]), "NetworkPolicy")
    res = k8s.run([tools.helm, "install", "vsearch", CHART, "-n", NAMESPACE, "--dry-run=client",
                   "-f", profile_file("minimal"), "--set", "networkPolicy.enabled=false"])
    assert "WARNING: networkPolicy.enabled=false" in res.stdout.split("NOTES:", 1)[1]


def test_serverless_with_the_policies_is_warned_about(tools):
    res = k8s.run([tools.helm, "install", "vsearch", CHART, "-n", NAMESPACE, "--dry-run=client",
                   "-f", profile_file("minimal"), "--set", "search.deploymentMode=Serverless"])
    assert "WARNING: search.deploymentMode=Serverless with networkPolicy.enabled" in res.stdout.split("NOTES:", 1)[1]
