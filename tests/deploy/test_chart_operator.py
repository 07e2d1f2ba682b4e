"""The chart's operator part: the SearchIndex CRD it ships (the operator's, byte for byte), the
operator's Deployment and RBAC against what the operator needs (operators/rbac.yaml,
``vsearch operator``'s flags), the SearchIndex made from the values against the CRD's schema,
the names the search service expects against the operator's own naming, the workloads the
operator would create from the chart's SearchIndex, and one end-to-end run: the chart rendered by
the real helm, its CRD and SearchIndex applied to kmock, the real operator started from the
chart's container spec, reconciling the chart's SearchIndex up to a served index that the
search service, started with the chart's environment, answers from."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time

import pytest
import requests
import yaml

from tests.deploy import k8s
from tests.deploy.k8s import CHART, NAMESPACE, REPO, STATIC_PROFILES, profile_file
from tests.fixtures.catalog import publish
from tests.fixtures.cluster import Cluster
from tests.fixtures.operators import catalog_files, unique, upsert_record
from vsearch.cli import build_parser
from vsearch.core.store import MilvusStore
from vsearch.local import services
from vsearch.local.samples import CALTECH
from vsearch.operators import crd as operator_crd
from vsearch.operators.spec import IndexSpec, ModelRef, VersionRef
from vsearch.operators.workloads import METRICS_PORT, KubernetesWorkloads
from vsearch.predictor.model_dir import default_model_dir, read_meta

OPERATOR_PROFILES = ("minimal", "full", "gpu")
CRD_FILE = CHART / "crds" / "searchindex.yaml"


@pytest.fixture(scope="module")
def rendered(tools):
    return {p: tools.render(p) for p in OPERATOR_PROFILES + STATIC_PROFILES}


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind, name=None):
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def env_of(container) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def operator_container(objs) -> dict:
    return one(objs, "Deployment", "vsearch-operator")["spec"]["template"]["spec"]["containers"][0]


def search_container(objs) -> dict:
    return one(objs, "InferenceService", "vsearch-search")["spec"]["predictor"]["containers"][0]


# --------------------------------------------------------------------------- the CRD

def test_the_charts_crd_is_the_operators_byte_for_byte():
    assert CRD_FILE.read_bytes() == (REPO / "operators" / "searchindex.yaml").read_bytes(), \
        "charts/vsearch/crds/searchindex.yaml differs from operators/searchindex.yaml: run `make chart-docs`"
    # nothing else in crds/ that Helm would install, and no template renders a CRD
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == ["README.md", "searchindex.yaml"]
    assert not any("CustomResourceDefinition" in p.read_text() for p in (CHART / "templates").rglob("*.yaml"))


def test_helm_installs_the_crd_from_crds(tools):
    """Helm takes it from crds/ (`helm show crds`, `--include-crds`), never from a template."""
    res = k8s.run([tools.helm, "show", "crds", CHART])
    assert res.returncode == 0, res.stderr
    assert k8s.load_all(res.stdout) == [operator_crd.crd()]
    with_crds = k8s.load_all(tools.template(profile_file("minimal"), extra=["--include-crds"]).stdout)
    assert [o for o in with_crds if o["kind"] == "CustomResourceDefinition"] == [operator_crd.crd()]
    without = k8s.load_all(tools.template(profile_file("minimal")).stdout)
    assert not by_kind(without, "CustomResourceDefinition")


@pytest.mark.parametrize("version", ["1.29", "1.37"])
def test_the_crd_is_a_valid_customresourcedefinition(version):
    k8s.validate_builtin(operator_crd.crd(), version)


# --------------------------------------------------------------------------- the SearchIndex

@pytest.mark.parametrize("profile", OPERATOR_PROFILES)
def test_the_searchindex_is_valid_against_the_crd(rendered, profile):
    index = one(rendered[profile], "SearchIndex")
    assert index["apiVersion"] == f"{operator_crd.GROUP}/{operator_crd.VERSION}"
    errors = k8s.validate_custom(index)
    assert not errors, "\n".join(errors)
    operator_crd.validate(index)          # the operator's own check before it acts


def test_the_crd_check_catches_a_bad_searchindex(rendered):
    index = one(rendered["full"], "SearchIndex")
    bad = copy.deepcopy(index)
    bad["spec"]["rollout"]["gate"]["margin"] = 0.02           # margin belongs to gate.golden
    assert any("margin" in e for e in k8s.validate_custom(bad))
    bad = copy.deepcopy(index)
    bad["spec"]["model"].pop("uri")
    assert any("uri" in e for e in k8s.validate_custom(bad))


def test_the_searchindex_carries_the_values(rendered):
    index = one(rendered["full"], "SearchIndex")
    spec = index["spec"]
    assert index["metadata"]["name"] == "vsearch"
    assert spec["catalog"] == {"bootstrap": "events-kafka-bootstrap.vsearch.svc:9092", "topic": "catalog.images"}
    assert spec["milvus"]["uri"] == "http://vsearch-milvus.vsearch.svc:19530"
    assert spec["milvus"]["tokenSecretRef"] == {"name": "milvus-root-token", "key": "token"}
    assert spec["milvus"]["alias"] == "images"
    assert spec["milvus"]["index"] == {"type": "DISKANN", "metric": "COSINE", "searchParams": {"search_list": 100}}
    # the image's default model, as a path: the operator uses it as the model directory
    assert spec["model"] == {"name": "vsearch-default", "version": "2", "uri": "/opt/vsearch/models/default"}
    image = "registry.internal.example/platform/vsearch:0.1.0"
    assert spec["embedder"]["image"] == spec["ingest"]["image"] == spec["search"]["image"] == image
    assert spec["ingest"]["replicas"] == 3 and spec["ingest"]["batchSize"] == 256
    assert {"name": "VSEARCH_INGEST_DLQ_TOPIC", "value": "catalog.images.dlq"} in spec["ingest"]["env"]
    assert spec["search"]["replicas"] == 3
    # the search service and the operator's collections use the same index settings
    env = env_of(search_container(rendered["full"]))
    assert yaml.safe_load(env["VSEARCH_SEARCH_PARAMS"]) == spec["milvus"]["index"]["searchParams"]
    assert env["VSEARCH_SEARCH_ALIAS"] == spec["milvus"]["alias"]
    assert env["VSEARCH_INDEX_TYPE"] == spec["milvus"]["index"]["type"]


def test_the_default_model_values_name_the_model_inside_the_image():
    """With no storageUri the chart serves the image's default model: its values must carry that
    model's own name and version, or collections and metrics would be labelled wrongly."""
    meta = read_meta(default_model_dir())
    values = yaml.safe_load((CHART / "values.yaml").read_text())["model"]
    assert not values["storageUri"]
    assert (values["name"], values["version"]) == (meta.name, meta.version)


def test_the_rollout_defaults_are_the_crds(rendered):
    """The chart writes every rollout setting; by default they are the CRD's own defaults (the
    operator's typed spec has the schema's defaults, tests/operators/test_crd.py)."""
    spec = one(rendered["minimal"], "SearchIndex")["spec"]
    assert set(spec["rollout"]) == {"requireApproval", "retentionSeconds", "maxRetries", "deployTimeoutSeconds",
                                    "backfill", "gate"}
    assert IndexSpec.from_dict(spec).policy == IndexSpec.from_dict({**spec, "rollout": {}}).policy


def test_rollout_values_reach_the_searchindex(tools):
    objs = k8s.load_all(tools.template(profile_file("minimal"), set_values=[
        "searchIndex.rollout.requireApproval=true", "searchIndex.rollout.retentionSeconds=600",
        "searchIndex.rollout.backfill.idleSeconds=5", "searchIndex.rollout.gate.sampleSize=200",
        "searchIndex.rollout.gate.golden.configMap=golden", "searchIndex.rollout.gate.requireOfflineVerdict=true",
        "searchIndex.rollout.experiment.enabled=true", "searchIndex.rollout.experiment.design=interleave",
        "searchIndex.rollout.experiment.minUnits=500", "searchIndex.rollout.experiment.onTimeout=promote"],
        extra=["--set-json", "searchIndex.rollout.gate.golden.margin=0.01",     # --set reads 0.01 as text
               "--set-json", "searchIndex.rollout.experiment.share=0.2"]).stdout)
    index = one(objs, "SearchIndex")
    policy = IndexSpec.from_dict(index["spec"]).policy
    assert policy.require_approval is True and policy.retention_s == 600 and policy.idle_s == 5
    assert policy.gate.sample_size == 200 and policy.gate.require_offline_verdict is True
    assert (policy.gate.golden.config_map, policy.gate.golden.config_map_key, policy.gate.golden.margin) == \
        ("golden", "judgments.csv", 0.01)
    x = policy.experiment
    assert (x.enabled, x.design, x.share, x.min_units, x.on_timeout, x.alpha, x.events_topic, x.max_p99_ratio) == \
        (True, "interleave", 0.2, 500, "promote", 0.05, "search.events", 1.5)
    assert not k8s.validate_custom(index)
    objs = tools.render("minimal", set_values=["searchIndex.rollout.gate.golden.uri=https://eval.example/g.csv"])
    golden = one(objs, "SearchIndex")["spec"]["rollout"]["gate"]["golden"]
    assert golden == {"uri": "https://eval.example/g.csv", "margin": 0.02}
    notes = k8s.run([tools.helm, "install", "vsearch", CHART, "-n", NAMESPACE, "--dry-run=client",
                     "-f", profile_file("minimal"), "--set", "searchIndex.rollout.requireApproval=true"])
    assert "annotate searchindex vsearch vsearch.io/approve=NEW" in notes.stdout.split("NOTES:", 1)[1]


def test_notes_tell_how_to_roll_out_and_uninstall(tools):
    res = k8s.run([tools.helm, "install", "vsearch", CHART, "-n", NAMESPACE, "--dry-run=client",
                   "-f", profile_file("minimal")])
    notes = res.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n vsearch get searchindex vsearch" in notes
    assert "--set-string model.version=NEW" in notes and "vsearch.io/approve" not in notes
    assert "`helm uninstall` first deletes the SearchIndex and waits up to 240 s" in notes
    off = k8s.run([tools.helm, "install", "vsearch", CHART, "-n", NAMESPACE, "--dry-run=client",
                   "-f", profile_file("minimal"), "--set", "searchIndex.deleteOnUninstall=false"])
    assert "kubectl -n vsearch delete searchindex vsearch --wait" in off.stdout.split("NOTES:", 1)[1]
    # what the notes and READMEs say about the version: --set-string works, a number is refused
    ok = tools.template(profile_file("minimal"), extra=["--set-string", "model.version=3"])
    assert one(k8s.load_all(ok.stdout), "SearchIndex")["spec"]["model"]["version"] == "3"
    refused = tools.template(profile_file("minimal"), set_values=["model.version=3"], check=False)
    assert refused.returncode != 0 and "at '/model/version': got number, want string" in refused.stderr


def test_without_the_operator_there_is_no_searchindex(rendered):
    for profile in STATIC_PROFILES:
        assert not by_kind(rendered[profile], "SearchIndex")
        assert not [o for o in rendered[profile] if o["metadata"]["name"].endswith("-operator")]


# --------------------------------------------------------------------------- RBAC

def rule_triples(rules) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


SECRETS_GET = ("", "secrets", "get")


def test_the_operators_role_is_exactly_rbac_yaml(rendered):
    """rbac.yaml's rules, but Secrets only by name: the Milvus token's and operator.allowedSecrets
    (none at all when there are none)."""
    needed = one(k8s.load_all((REPO / "operators" / "rbac.yaml").read_text()), "Role")["rules"]
    for profile in OPERATOR_PROFILES:
        objs = rendered[profile]
        assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")
        role = one(objs, "Role", "vsearch-operator")
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"wildcard in {field}: {rule}"
        index = one(objs, "SearchIndex")
        token = (index["spec"]["milvus"].get("tokenSecretRef") or {}).get("name")
        secret_rules = [r for r in role["rules"] if "secrets" in r["resources"]]
        if token:
            assert secret_rules == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [token],
                                     "verbs": ["get"]}], profile
        else:
            assert not secret_rules, profile
        assert rule_triples(role["rules"]) - {SECRETS_GET} == rule_triples(needed) - {SECRETS_GET}, profile
        assert role["metadata"]["namespace"] == NAMESPACE


def test_the_role_check_sees_a_missing_or_extra_rule():
    needed = one(k8s.load_all((REPO / "operators" / "rbac.yaml").read_text()), "Role")["rules"]
    fewer = copy.deepcopy(needed)
    fewer[0]["verbs"].remove("watch")
    more = copy.deepcopy(needed) + [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get"]}]
    assert rule_triples(fewer) != rule_triples(needed) != rule_triples(more)


def test_a_role_and_binding_per_watched_namespace(tools):
    objs = tools.render("minimal", set_values=["operator.watchNamespaces={shop,images}"])
    roles = {r["metadata"]["namespace"]: r for r in by_kind(objs, "Role") if r["metadata"]["name"] == "vsearch-operator"}
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(objs, "RoleBinding")
                if b["metadata"]["name"] == "vsearch-operator"}
    assert set(roles) == set(bindings) == {"shop", "images"}
    for ns, b in bindings.items():
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": roles[ns]["metadata"]["name"]}
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "vsearch-operator", "namespace": NAMESPACE}]
    pod = one(objs, "Deployment", "vsearch-operator")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "vsearch-operator" and pod["automountServiceAccountToken"] is True
    assert env_of(operator_container(objs))["VSEARCH_OPERATOR_NAMESPACES"] == "shop,images"


# --------------------------------------------------------------------------- the operator's container

def parsed(args: list[str], env: dict, monkeypatch):
    """``vsearch ARGS`` as the real parser reads it with ``env`` (flags read their variables
    when the parser is built)."""
    for name in [n for n in os.environ if n.startswith("VSEARCH_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if value is not None:
            monkeypatch.setenv(name, value)
    return build_parser().parse_args(args)


def test_the_operator_runs_with_the_charts_flags(rendered, monkeypatch):
    objs = rendered["full"]
    c = operator_container(objs)
    assert c["args"] == ["operator"] and "command" not in c
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    args = parsed(c["args"], env_of(c), monkeypatch)
    assert (args.health_port, args.metrics_port) == (ports["health"], ports["metrics"]) == (8080, 9090)
    assert args.namespaces == NAMESPACE and args.namespace is None      # never all namespaces
    assert args.interval == 5.0 and args.peering is False and args.kubeconfig is None
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    dep = one(objs, "Deployment", "vsearch-operator")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    # /metrics is scraped on the metrics port
    svc = one(objs, "Service", "vsearch-operator-metrics")
    assert svc["spec"]["ports"][0]["port"] == ports["metrics"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


# --------------------------------------------------------------------------- names the search service expects

@pytest.mark.parametrize("index,model,version", [
    ("", "vsearch-default", "1"),
    ("shop", "ResNet_50.v2", "2024.06-rc1"),
    ("catalogue-of-the-whole-store", "a-rather-long-model-name-for-images", "2024-06-01-build-7"),
])
def test_the_search_service_points_at_the_operators_embedder(tools, index, model, version):
    """The chart computes the operator's embedder name (operators/spec.py dns_name, shortened with
    a hash past 45 characters) for the search service's fallback URL."""
    sets = [f"model.name={model}"] + ([f"searchIndex.name={index}"] if index else [])
    objs = k8s.load_all(tools.template(profile_file("minimal"), set_values=sets,
                                       extra=["--set-string", f"model.version={version}"]).stdout)
    si = one(objs, "SearchIndex")
    spec = IndexSpec.from_dict(si["spec"])
    v = VersionRef.of(si["metadata"]["name"], NAMESPACE, spec.model)
    env = env_of(search_container(objs))
    assert env["VSEARCH_SEARCH_EMBEDDER_URL"] == f"http://{v.embedder_name}-predictor.{NAMESPACE}.svc"
    assert env["VSEARCH_SEARCH_EMBEDDER_NAME"] == "embedder"     # the operator's --model-name
    assert len(v.embedder_name) <= 45


# --------------------------------------------------------------------------- what the operator creates from it

def operator_bodies(index: dict) -> tuple[dict, dict]:
    spec = IndexSpec.from_dict(index["spec"])
    v = VersionRef.of(index["metadata"]["name"], NAMESPACE, ModelRef(spec.model.name, spec.model.version, spec.model.uri))
    owner = {**index, "metadata": {**index["metadata"], "namespace": NAMESPACE, "uid": "0000"}}
    w = KubernetesWorkloads(None, owner=owner)
    return w.embedder_body(spec, v), w.ingest_body(spec, v, "http://embedder.example")


def assert_restricted(where: str, pod: dict) -> None:
    """The `restricted` Pod Security Standard's checks that a pod spec can fail."""
    psc = pod.get("securityContext") or {}
    assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
    for c in pod["containers"]:
        sc = c.get("securityContext") or {}
        assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not sc.get("privileged"), where


HOOK = "vsearch-delete-index"


def hook_objects(objs) -> list[dict]:
    return [o for o in objs if (o["metadata"].get("annotations") or {}).get("helm.sh/hook") == "pre-delete"]


def test_uninstall_deletes_the_searchindex_first_with_a_hook_that_may_do_only_that(rendered, monkeypatch):
    """The pre-delete hook: its RBAC before its Job (weights), all removed once it succeeded,
    a Role that may only get and delete this release's SearchIndex, and a Job that runs
    `vsearch delete-index` on it in the release's namespace within its deadline."""
    for profile in OPERATOR_PROFILES:
        objs = rendered[profile]
        hooks = {(o["kind"], o["metadata"]["name"]): o for o in hook_objects(objs)}
        assert set(hooks) == {(k, HOOK) for k in ("ServiceAccount", "Role", "RoleBinding", "Job")}, profile
        weights = {k: int(o["metadata"]["annotations"]["helm.sh/hook-weight"]) for (k, _), o in hooks.items()}
        assert max(w for k, w in weights.items() if k != "Job") < weights["Job"], weights
        for o in hooks.values():
            assert o["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
            assert o["metadata"]["namespace"] == NAMESPACE
        index = one(objs, "SearchIndex")
        assert hooks[("Role", HOOK)]["rules"] == [{"apiGroups": ["vsearch.io"], "resources": ["searchindexes"],
                                                   "resourceNames": [index["metadata"]["name"]],
                                                   "verbs": ["get", "delete"]}]
        binding = hooks[("RoleBinding", HOOK)]
        assert binding["roleRef"]["name"] == HOOK and binding["subjects"][0]["name"] == HOOK
        job = hooks[("Job", HOOK)]
        pod = job["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == HOOK and pod["restartPolicy"] == "Never"
        (c,) = pod["containers"]
        args = parsed(c["args"], env_of(c), monkeypatch)
        assert args.handler.__name__ == "_delete_index"
        assert (args.name, args.namespace) == (index["metadata"]["name"], NAMESPACE)
        assert job["spec"]["activeDeadlineSeconds"] > args.timeout == 240.0 < 300   # helm's default --timeout
        for version in ("1.29", "1.37"):
            for o in hooks.values():
                k8s.validate_builtin(o, version)
    # off, or without a SearchIndex: no hook
    assert not hook_objects(rendered["no-operator"])


def test_the_hook_can_be_turned_off(tools):
    assert not hook_objects(tools.render("minimal", set_values=["searchIndex.deleteOnUninstall=false"]))


@pytest.mark.parametrize("profile", OPERATOR_PROFILES)
def test_the_operators_workloads_from_the_charts_searchindex_are_valid(rendered, crd_schemas, profile):
    index = one(rendered[profile], "SearchIndex")
    isvc, deployment = operator_bodies(index)
    assert not k8s.validate_custom(isvc), k8s.validate_custom(isvc)
    for version in ("1.29", "1.37"):
        k8s.validate_builtin(deployment, version)
        for _where, pod, labels in k8s.pod_specs(isvc):
            k8s.validate_builtin({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "labels": labels},
                                  "spec": pod}, version)
    for where, pod, _labels in k8s.pod_specs(isvc) + k8s.pod_specs(deployment):
        assert_restricted(f"{profile}: {where}", pod)
        c = pod["containers"][0]
        assert c["resources"] == (index["spec"]["embedder"] if "predictor" in where else index["spec"]["ingest"])["resources"]


def test_the_operators_pods_get_the_charts_account_pull_secrets_affinity_and_runtime_class(tools, crd_schemas):
    """What the chart's own embedder and consumer get, the operator's get too, through the
    SearchIndex: the chart's ServiceAccount, its pull secrets, each part's affinity and the GPU
    runtime class; valid against the CRD and, on the created objects, KServe's and 1.29/1.37's."""
    anti = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 50, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                          "labelSelector": {"matchLabels": {"vsearch.io/component": "ingest"}}}}]}}
    node = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu.example/class", "operator": "In", "values": ["h100", "h200"]}]}]}}}
    objs = k8s.load_all(tools.template(profile_file("gpu"), set_values=[
        "embedder.gpu.runtimeClassName=nvidia", "imagePullSecrets={registry-credentials}",
        "serviceAccount.name=vsearch-models"], extra=["--set-json", f"embedder.affinity={json.dumps(node)}",
                                                      "--set-json", f"ingest.affinity={json.dumps(anti)}"]).stdout)
    index = one(objs, "SearchIndex")
    assert not k8s.validate_custom(index), k8s.validate_custom(index)
    assert one(objs, "ServiceAccount", "vsearch-models")
    isvc, deployment = operator_bodies(index)
    embedder_pod = isvc["spec"]["predictor"]
    ingest_pod = deployment["spec"]["template"]["spec"]
    for pod in (embedder_pod, ingest_pod):
        assert pod["serviceAccountName"] == "vsearch-models"
        assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
        assert pod["automountServiceAccountToken"] is False
    assert embedder_pod["affinity"] == node and embedder_pod["runtimeClassName"] == "nvidia"
    assert ingest_pod["affinity"] == anti and "runtimeClassName" not in ingest_pod
    assert not k8s.validate_custom(isvc), k8s.validate_custom(isvc)
    for version in ("1.29", "1.37"):
        k8s.validate_builtin(deployment, version)
    # without GPUs the runtime class is not applied (as for the chart's own embedder)
    plain = one(k8s.load_all(tools.template(profile_file("minimal"), set_values=[
        "embedder.gpu.runtimeClassName=nvidia"]).stdout), "SearchIndex")
    assert "runtimeClassName" not in plain["spec"]["embedder"]


@pytest.mark.parametrize("profile", OPERATOR_PROFILES)
def test_no_variable_of_the_searchindex_is_overridden_by_the_operators_flags(rendered, profile, monkeypatch):
    """A flag on the command line wins over its variable: a variable the chart sets for a flag
    the operator already passes would be ignored. Each one must reach the running command."""
    index = one(rendered[profile], "SearchIndex")
    isvc, deployment = operator_bodies(index)
    for part, obj in (("embedder", isvc), ("ingest", deployment)):
        (_where, pod, _labels), = k8s.pod_specs(obj)
        c = pod["containers"][0]
        assert c["command"] == ["vsearch"]
        env = env_of(c)
        assert env_of(index["spec"][part]).items() <= env.items()
        env = {k: v for k, v in env_of(index["spec"][part]).items() if k.startswith("VSEARCH_")}
        assert env
        args = parsed(c["args"], env, monkeypatch)
        parser, _ = k8s.find_command(build_parser(), c["args"])
        by_var = {a.env_var: a for a in parser._actions if getattr(a, "env_var", None)}
        for name, value in env.items():
            action = by_var[name]
            assert not set(action.option_strings) & set(c["args"]), f"{name} is overridden by the operator's flags"
            got = getattr(args, action.dest)
            assert str(got) == value or (isinstance(got, (int, float)) and float(got) == float(value)), \
                f"{name}={value!r} reads as {got!r}"


def test_the_operators_consumers_are_scraped(rendered):
    objs = rendered["full"]
    _isvc, deployment = operator_bodies(one(objs, "SearchIndex"))
    svc = one(objs, "Service", "vsearch-ingest-metrics")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert "vsearch.io/model-version" not in svc["spec"]["selector"]       # every version's consumers
    assert svc["spec"]["ports"][0]["port"] == METRICS_PORT
    assert {"name": "metrics", "containerPort": METRICS_PORT} in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]


# --------------------------------------------------------------------------- end to end on kmock

@pytest.fixture
def kmock_cluster(tmp_path):
    """tests/operators's stand-in cluster (kmock over HTTP and the test kubelet) in the chart's
    namespace, serving SearchIndexes only once their CRD is applied."""
    c = Cluster(tmp_path / "cluster", namespace=NAMESPACE, searchindex_crd=False)
    try:
        yield c
    finally:
        c.close()


@pytest.mark.slow
def test_the_real_operator_reconciles_the_charts_searchindex(tools, tmp_path, kmock_cluster, broker,
                                                             milvus_server_uri):
    cluster = kmock_cluster
    model, topic, alias = unique("chart-e2e-"), unique("catalog-chart-"), unique("chart_")
    values = tmp_path / "e2e-values.yaml"
    values.write_text(yaml.safe_dump({
        "image": {"registry": "registry.example", "repository": "team/vsearch", "tag": "0.1.0-e2e"},
        "milvus": {"uri": milvus_server_uri, "alias": alias, "index": {"type": "HNSW"}},
        "kafka": {"bootstrap": broker, "topics": {"catalog": {"name": topic, "partitions": 2}}},
        "model": {"name": model, "version": "1"},
        # one replica: the test kubelet runs one process per Deployment; the catalog is local files
        "ingest": {"replicas": 1, "batchSize": 64, "extraArgs": ["--file-roots", "/"]},
        "operator": {"interval": 1.0},
        "searchIndex": {"rollout": {"backfill": {"idleSeconds": 3}, "gate": {"sampleSize": 6, "requireOfflineVerdict": True}}},
    }))
    t0 = time.monotonic()
    objs = k8s.load_all(tools.template(profile_file("minimal"), values, extra=["--include-crds"]).stdout)
    crd_obj = one(objs, "CustomResourceDefinition")
    index = one(objs, "SearchIndex")
    name = index["metadata"]["name"]

    # the API serves SearchIndexes once the chart's CRD is applied, not before
    assert requests.get(f"{cluster.url}/apis/vsearch.io/v1alpha1", timeout=10).status_code == 404
    r = cluster.api.http.post(f"{cluster.url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                              json=crd_obj, timeout=10)
    assert r.status_code in (200, 201), r.text
    assert requests.get(f"{cluster.url}/apis/vsearch.io/v1alpha1", timeout=10).status_code == 200

    items = catalog_files(tmp_path / "photos", n_classes=2, per_class=3)
    publish(broker, topic, [upsert_record(i, p, lbl, 1_700_000_000_000 + n) for n, (i, p, lbl) in enumerate(items)],
            partitions=2)

    # the operator as the chart's Deployment runs it (its args and environment), with free ports
    # and the test kubeconfig instead of the in-cluster service account
    c = operator_container(objs)
    health, metrics = services.free_port(), services.free_port()
    env = {**env_of(c), "VSEARCH_OPERATOR_HEALTH_PORT": str(health), "VSEARCH_OPERATOR_METRICS_PORT": str(metrics),
           # the gate reads the test's local catalog photos (none by default)
           "VSEARCH_OPERATOR_CATALOG_FILE_ROOTS": f"{tmp_path},{CALTECH}"}
    assert env["VSEARCH_OPERATOR_ALLOWED_IMAGES"] == "registry.example/team/vsearch:,registry.example/team/vsearch@"
    assert env["VSEARCH_OPERATOR_ALLOWED_MILVUS_HOSTS"] == milvus_server_uri.split("//")[1]
    cluster.operator = services.Service(
        "operator", services.vsearch_argv(*c["args"], "--kubeconfig", str(cluster.kubeconfig)), port=health,
        env=env, log_path=tmp_path / "operator.log",
        ready=lambda: services.http_ok(f"http://127.0.0.1:{health}{c['livenessProbe']['httpGet']['path']}")
    ).wait_ready(60)
    assert services.http_ok(f"http://127.0.0.1:{metrics}/metrics")

    cluster.api.create("searchindexes", index)
    st = cluster.wait_phase(name, "Ready", 180, version="1")["status"]
    took = time.monotonic() - t0

    spec = IndexSpec.from_dict(index["spec"])
    v = VersionRef.of(name, NAMESPACE, spec.model)
    assert st["serving"]["version"] == "1" and st["serving"]["collection"] == v.collection
    assert st["serving"]["consumerGroup"] == v.group
    assert st["gate"]["verdict"] == "Passed" and st["gate"]["selfConsistency"]["found"] == len(items)
    # the image's default model carries a passing offline verdict, read from its embedder
    assert st["gate"]["offline"]["beatsBaselines"] is True and st["gate"]["offline"]["model"].endswith(":2")
    conds = {cd["type"]: cd["status"] for cd in st["conditions"]}
    assert conds["Ready"] == "True" and st["observedGeneration"] == 1

    # what it created: the names the chart expects, the chart's images, settings and hardening
    (isvc,) = cluster.api.list("inferenceservices")
    (dep,) = cluster.api.list("deployments")
    assert isvc["metadata"]["name"] == v.embedder_name and dep["metadata"]["name"] == v.ingest_name
    search_env = env_of(search_container(objs))
    assert search_env["VSEARCH_SEARCH_EMBEDDER_URL"] == f"http://{v.embedder_name}-predictor.{NAMESPACE}.svc"
    ec = isvc["spec"]["predictor"]["containers"][0]
    ic = dep["spec"]["template"]["spec"]["containers"][0]
    assert ec["image"] == ic["image"] == "registry.example/team/vsearch:0.1.0-e2e"
    assert ec["args"][:4] == ["serve", "embedder", "--model-dir", "/opt/vsearch/models/default"]
    assert ic["args"][-2:] == ["--file-roots", "/"] and ["--topic", topic] == ic["args"][3:5]
    assert {"name": "VSEARCH_INGEST_DLQ_TOPIC", "value": f"{topic}.dlq"} in ic["env"]
    assert ec["resources"] == index["spec"]["embedder"]["resources"]
    assert_restricted("embedder", isvc["spec"]["predictor"])
    assert_restricted("ingest", dep["spec"]["template"]["spec"])
    reasons = [e.get("reason") for e in cluster.events(name)]
    assert {"Deploying", "Backfilling", "Verifying", "Switching"} <= set(reasons), reasons

    # the search service with the chart's environment (its URL for the embedder is a cluster name
    # that does not resolve here): it finds the operator's embedder through the collection
    port = services.free_port()
    env = {k: v for k, v in search_env.items() if v is not None}
    env.update(VSEARCH_SEARCH_HTTP_PORT=str(port), VSEARCH_SEARCH_QUERY_STORE=str(tmp_path / "queries"))
    # the chart allows its namespace's predictor Services; the test kubelet runs the operator's
    # embedders on local ports, which the collection's record names instead
    assert env["VSEARCH_SEARCH_ALLOWED_EMBEDDER_URLS"].startswith(f"http://*-predictor.{NAMESPACE}.svc")
    env["VSEARCH_SEARCH_ALLOWED_EMBEDDER_URLS"] += ",http://127.0.0.1:*"
    search = services.Service(
        "search", services.vsearch_argv(*search_container(objs)["args"]), port=port, env=env,
        log_path=tmp_path / "search.log",
        ready=lambda: services.http_ok(f"http://127.0.0.1:{port}/v2/models/visual-search/ready")).wait_ready(120)
    try:
        item_id, path, _ = items[0]
        r = requests.post(f"{search.url}/search", files={"image": ("q.jpg", path.read_bytes(), "image/jpeg")},
                          data={"k": "3"}, timeout=60)
        assert r.status_code == 200, r.text[:500]
        body = r.json()
        assert body["collection"] == v.collection
        assert body["results"][0]["id"] == item_id and body["results"][0]["score"] > 0.99
    finally:
        search.stop()
    print(f"chart -> Ready in {took:.1f}s")

    # `helm uninstall`: the pre-delete hook's command, as its Job runs it (the test kubeconfig
    # instead of its service account), deletes the SearchIndex and returns once the operator
    # has removed the workloads, the collection and the alias
    hook_job = one(hook_objects(objs), "Job")
    hc = hook_job["spec"]["template"]["spec"]["containers"][0]
    hook_argv = services.vsearch_argv(*hc["args"], "--kubeconfig", str(cluster.kubeconfig))
    res = subprocess.run(hook_argv, env={**os.environ, **env_of(hc)}, capture_output=True, text=True,
                         timeout=hook_job["spec"]["activeDeadlineSeconds"])
    assert res.returncode == 0, res.stdout + res.stderr + cluster.operator.log_tail(40)
    assert "gone" in res.stdout, res.stdout
    assert cluster.api.get("searchindexes", name) is None
    assert cluster.api.list("inferenceservices") == [] and cluster.api.list("deployments") == []
    with MilvusStore(milvus_server_uri) as store:
        assert store.describe_alias(alias) is None
        assert v.collection not in set(store.list_collections(include_tombstones=True))
    # run again (a retried Job): nothing left to delete is a success too
    again = subprocess.run(hook_argv, env={**os.environ, **env_of(hc)}, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "not there" in again.stdout, again.stdout + again.stderr
