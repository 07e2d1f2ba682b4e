"""charts/vsearch with the real helm v4: lint, every profile rendered and validated (built-in
kinds for the oldest and newest Kubernetes the chart claims, custom resources against their
CRDs, the SearchIndex against the operator's), the values schema, production hygiene on every
pod, and the configuration contract. The operator's part (CRD, RBAC, SearchIndex, a run of the
real operator on the chart's output) is in test_chart_operator.py."""

from __future__ import annotations

import json
import re
import sys

import pytest
import yaml

from tests.deploy import k8s
from tests.deploy.k8s import CHART, PROFILES, REPO, STATIC_PROFILES, profile_file
from vsearch.cli import build_parser

# Variables the chart sets that the command does not accept yet: the flags are being added in
# main (the configuration-prefix change). When one lands, test_pending_flags_still_missing says
# to remove it from here.
PENDING_FLAGS: dict[tuple, set] = {
}
# Routes of the probes, per component (the services' real health routes).
PROBES = {
    "search": {"readinessProbe": "/v2/models/visual-search/ready", "livenessProbe": "/v2/health/live"},
    "embedder": {"readinessProbe": "/v2/models/embedder/ready", "livenessProbe": "/v2/health/live"},
    "ingest": {"readinessProbe": "/metrics", "livenessProbe": "/metrics"},
    "operator": {"readinessProbe": "/healthz", "livenessProbe": "/healthz"},
}
STANDARD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                   "app.kubernetes.io/managed-by", "app.kubernetes.io/part-of")
OPERATOR_PROFILES = tuple(p for p in PROFILES if p not in STATIC_PROFILES)


def kube_versions() -> list[str]:
    """The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest one that
    kubernetes-validate has schemas for."""
    claim = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    m = k8s.SEMVER_RANGE_LOW.search(claim)
    assert m, f"kubeVersion {claim!r} has no lower bound"
    oldest = f"{m[1]}.{m[2]}"
    known = k8s.supported_versions()
    assert any(v.startswith(oldest + ".") or v == oldest for v in known), \
        f"kubernetes-validate has no schemas for {oldest} (has {known[0]}..{known[-1]})"
    return [oldest, known[-1].rsplit(".", 1)[0] if known[-1].count(".") == 2 else known[-1]]


@pytest.fixture(scope="module")
def rendered(tools):
    return {p: tools.render(p) for p in PROFILES}


ALL_RENDERS = PROFILES


# --------------------------------------------------------------------------- lint, generated files

@pytest.mark.parametrize("profile", PROFILES)
def test_helm_lint_strict(tools, profile):
    res = k8s.run([tools.helm, "lint", "--strict", CHART, "-f", profile_file(profile)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 chart(s) failed" in res.stdout


def test_helm_is_v4(tools):
    res = k8s.run([tools.helm, "version", "--short"])
    assert res.stdout.startswith("v4."), res.stdout


def test_values_schema_and_readme_table_are_generated_from_values_yaml():
    res = k8s.run([sys.executable, REPO / ".ci" / "chart_values.py", CHART, "--check"])
    assert res.returncode == 0, res.stderr


def test_every_value_is_documented_in_the_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, path):
        if path:
            assert node.get("description"), f"{'.'.join(path)} has no description"
        for key, sub in node.get("properties", {}).items():
            walk(sub, path + [key])
    walk(schema, [])


# --------------------------------------------------------------------------- rendering and validation

def test_every_profile_renders_the_workloads(rendered):
    """With the operator (the default): the search service, the operator and a SearchIndex, and
    not the chart's own embedder and consumer (the operator creates them per model version);
    without it: those two instead."""
    for profile in PROFILES:
        kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered[profile]}
        assert ("InferenceService", "vsearch-search") in kinds, profile
        assert ("Pod", "vsearch-test-search") in kinds, profile
        static = {("InferenceService", "vsearch-embedder"), ("Deployment", "vsearch-ingest")}
        operator = {("Deployment", "vsearch-operator"), ("SearchIndex", "vsearch"), ("Role", "vsearch-operator"),
                    ("RoleBinding", "vsearch-operator"), ("ServiceAccount", "vsearch-operator")}
        if profile in STATIC_PROFILES:
            assert static <= kinds and not operator & kinds, profile
        else:
            assert operator <= kinds and not static & kinds, profile


def test_operator_profiles_set_no_value_the_operator_ignores():
    """A profile with the operator that sets a value documented "without the operator" (the
    chart's own embedder and consumer only) says something that does not happen."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    ignored = set()

    def walk(node, path):
        props = node.get("properties") or {}
        if not props and "without the operator" in node.get("description", "").lower():
            ignored.add(path)
        for key, sub in props.items():
            walk(sub, path + (key,))
    walk(schema, ())
    ignored -= {("operator", "enabled"), ("model", "storageUri")}
    assert ("embedder", "maxBatch") in ignored and ("embedder", "maxReplicas") in ignored

    def leaves(node, path=()):
        if isinstance(node, dict) and node:
            for key, sub in node.items():
                yield from leaves(sub, path + (key,))
        else:
            yield path
    for profile in OPERATOR_PROFILES:
        values = yaml.safe_load(profile_file(profile).read_text())
        wrong = [".".join(p) for p in leaves(values) if p in ignored]
        assert not wrong, f"ci/{profile}-values.yaml sets {wrong}, which the operator ignores"


def test_the_default_milvus_is_the_version_the_store_layer_runs_against():
    """The chart's Milvus image is the server version the suite's Milvus tests start (the `milvus`
    package of the test extra), not one never run here."""
    pin = re.search(r'"milvus==([0-9.]+)"', (REPO / "pyproject.toml").read_text())[1]
    image = yaml.safe_load((CHART / "values.yaml").read_text())["milvus"]["cluster"]["image"]
    assert image == f"milvusdb/milvus:v{pin}", image


def test_operator_and_searchindex_are_on_by_default():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["operator"]["enabled"] is True and values["searchIndex"]["create"] is True


@pytest.mark.parametrize("version", kube_versions())
@pytest.mark.parametrize("profile", ALL_RENDERS)
def test_builtin_objects_are_valid(rendered, profile, version):
    builtin = [o for o in rendered[profile] if k8s.is_builtin(o)]
    assert builtin
    for obj in builtin:
        try:
            k8s.validate_builtin(obj, version)
        except Exception as exc:  # noqa: BLE001  (kubernetes_validate's errors carry the reason)
            pytest.fail(f"{profile}: {obj['kind']}/{obj['metadata']['name']} is not valid for "
                        f"Kubernetes {version}: {exc}")


@pytest.mark.parametrize("version", kube_versions())
@pytest.mark.parametrize("profile", ALL_RENDERS)
def test_inferenceservice_pods_are_valid_pod_specs(rendered, profile, version):
    """KServe turns the predictor into a pod: what the chart puts there must be a valid pod spec."""
    for obj in rendered[profile]:
        if obj["kind"] != "InferenceService":
            continue
        for where, spec, labels in k8s.pod_specs(obj):
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "labels": labels},
                   "spec": spec}
            try:
                k8s.validate_builtin(pod, version)
            except Exception as exc:  # noqa: BLE001
                pytest.fail(f"{profile}: {where} is no valid pod spec for {version}: {exc}")


@pytest.mark.parametrize("profile", ALL_RENDERS)
def test_custom_resources_are_valid_against_their_crds(rendered, crd_schemas, profile):
    custom = [o for o in rendered[profile] if not k8s.is_builtin(o)]
    assert custom
    for obj in custom:
        key = (k8s.split_api(obj["apiVersion"])[0], obj["kind"])
        assert k8s.has_crd(*key), f"{obj['kind']} ({obj['apiVersion']}) has no CRD schema here"
        errors = k8s.validate_custom(obj)
        assert not errors, f"{profile}: {obj['kind']}/{obj['metadata']['name']}:\n" + "\n".join(errors)


def test_crd_validation_catches_an_unknown_field(crd_schemas, rendered):
    """The CRD check is strict: a misspelt field is an error, as with the API server's strict
    field validation."""
    isvc = next(o for o in rendered["full"] if o["kind"] == "InferenceService")
    bad = json.loads(json.dumps(isvc))
    bad["spec"]["predictor"]["minReplica"] = 1
    assert any("minReplica" in e for e in k8s.validate_custom(bad))
    milvus = next(o for o in rendered["full"] if o["kind"] == "Milvus")
    bad = json.loads(json.dumps(milvus))
    bad["spec"]["mode"] = "distributed"
    assert any("distributed" in e for e in k8s.validate_custom(bad))


# --------------------------------------------------------------------------- hygiene on every pod

def workloads(objs):
    for obj in objs:
        for where, spec, labels in k8s.pod_specs(obj):
            yield obj, where, spec, labels


def is_test_hook(obj) -> bool:
    return (obj["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"


def runs_to_completion(obj, labels) -> bool:
    """A Helm hook, or the training pods of the TrainingRuntime (a training run ends: no probes,
    no disruption budget)."""
    return is_hook(obj) or labels.get("app.kubernetes.io/component") == "training"


def is_hook(obj) -> bool:
    """A Helm hook (the test Pod, the pre-delete Job): it runs to completion, serves nothing."""
    return bool((obj["metadata"].get("annotations") or {}).get("helm.sh/hook"))


@pytest.mark.parametrize("profile", ALL_RENDERS)
def test_every_pod_is_hardened(rendered, profile):
    seen = 0
    for obj, where, spec, labels in workloads(rendered[profile]):
        seen += 1
        psc = spec.get("securityContext") or {}
        assert psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot"
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccomp"
        assert spec.get("terminationGracePeriodSeconds"), f"{where}: terminationGracePeriodSeconds"
        for c in spec.get("initContainers", []) + spec["containers"]:
            cw = f"{where} container {c['name']}"
            sc = c.get("securityContext") or {}
            assert sc.get("readOnlyRootFilesystem") is True, f"{cw}: read-only root"
            assert sc.get("allowPrivilegeEscalation") is False, f"{cw}: privilege escalation"
            assert sc.get("privileged") in (None, False), f"{cw}: privileged"
            assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), f"{cw}: capabilities"
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{cw}: non-root"
            assert (sc.get("runAsUser") or psc.get("runAsUser") or 0) > 0, f"{cw}: a non-zero uid"
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    assert r in (res.get(part) or {}), f"{cw}: resources.{part}.{r}"
            tag = k8s.image_tag(c["image"])
            assert "@sha256:" in c["image"] or (tag and tag != "latest"), f"{cw}: image {c['image']} not pinned"
            if not runs_to_completion(obj, labels):
                component = labels.get("app.kubernetes.io/component")
                for probe, path in PROBES[component].items():
                    assert c.get(probe, {}).get("httpGet", {}).get("path") == path, \
                        f"{cw}: {probe} must be GET {path}"
                port = c["readinessProbe"]["httpGet"]["port"]
                assert port in {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}, \
                    f"{cw}: probe port {port} is not a container port"
    assert seen >= 2


@pytest.mark.parametrize("profile", STATIC_PROFILES)
def test_the_consumer_has_time_to_commit(rendered, profile):
    ingest = next(o for o in rendered[profile] if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-ingest"))
    spec = ingest["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert spec["terminationGracePeriodSeconds"] >= float(env["VSEARCH_INGEST_STOP_GRACE_S"]) + 10


@pytest.mark.parametrize("profile", ALL_RENDERS)
def test_standard_labels_everywhere(rendered, profile):
    for obj in rendered[profile]:
        labels = obj["metadata"].get("labels") or {}
        for key in STANDARD_LABELS:
            assert key in labels, f"{obj['kind']}/{obj['metadata']['name']}: label {key}"
        assert labels["app.kubernetes.io/version"] == yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    for _obj, where, _spec, labels in workloads(rendered[profile]):
        for key in STANDARD_LABELS + ("app.kubernetes.io/component",):
            assert key in labels, f"{where}: pod label {key}"


@pytest.mark.parametrize("profile", ALL_RENDERS)
def test_every_long_running_workload_has_a_disruption_budget(rendered, profile):
    pdbs = [o for o in rendered[profile] if o["kind"] == "PodDisruptionBudget"]
    for obj, where, _spec, labels in workloads(rendered[profile]):
        if runs_to_completion(obj, labels) or labels.get("app.kubernetes.io/component") == "operator":
            continue   # the operator is one Recreate replica: a budget would block node drains
        matching = [p for p in pdbs if all(labels.get(k) == v for k, v in p["spec"]["selector"]["matchLabels"].items())]
        assert len(matching) == 1, f"{where}: {len(matching)} PodDisruptionBudgets select it"


@pytest.mark.parametrize("profile", ALL_RENDERS)
def test_secrets_only_by_reference(rendered, profile):
    """No secret comes from the values: the one Secret the chart may render is the search API
    key it generates when none is named (a random key, kept on upgrades)."""
    for obj in rendered[profile]:
        assert obj["kind"] != "ConfigMap", "the chart renders a ConfigMap"
        if obj["kind"] == "Secret":
            assert obj["metadata"]["name"] == "vsearch-api-key" and set(obj["data"]) == {"api-key"}, obj["metadata"]
    for _obj, where, spec, _labels in workloads(rendered[profile]):
        for c in spec["containers"]:
            for e in c.get("env", []):
                # (the operator's allow-list of Secret *names* is no secret)
                if re.search(r"TOKEN|API_KEY|PASSWORD|SECRET$", e["name"]) and e["name"] != "VSEARCH_OPERATOR_ALLOWED_SECRETS":
                    assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), \
                        f"{where}: {e['name']} must come from a Secret"


# --------------------------------------------------------------------------- the configuration contract

def vsearch_containers(objs):
    """Containers that run the vsearch entrypoint: ``args`` are the vsearch command line. The
    workloads of a SearchIndex count too: the operator runs ``vsearch`` with their ``env`` (and
    its own flags before their ``args``)."""
    for _obj, where, spec, _labels in workloads(objs):
        for c in spec["containers"]:
            if not c.get("command"):
                yield where, c
    for obj in objs:
        if obj["kind"] == "SearchIndex":
            for part, words in k8s.SEARCHINDEX_COMMANDS.items():
                w = obj["spec"].get(part) or {}
                yield f"SearchIndex/{obj['metadata']['name']}.spec.{part}", {"args": words + w.get("args", []),
                                                                             "env": w.get("env", [])}


@pytest.mark.parametrize("profile", ALL_RENDERS)
def test_the_chart_sets_only_variables_the_command_accepts(rendered, profile):
    checked = set()
    for where, c in vsearch_containers(rendered[profile]):
        args = c.get("args") or []
        accepted = k8s.accepted_env(args)
        assert accepted is not None, f"{where}: there is no command `vsearch {' '.join(args)}`"
        words = tuple(k8s.find_command(build_parser(), args)[1])
        pending = PENDING_FLAGS.get(words, set())
        names = {e["name"] for e in c.get("env", []) if e["name"].startswith("VSEARCH_")}
        unknown = names - accepted - pending
        assert not unknown, (f"{where}: `vsearch {' '.join(args)}` accepts no {sorted(unknown)} "
                             f"(it reads {sorted(accepted)})")
        checked.add(words)
    # every command the profile runs was checked
    if profile in STATIC_PROFILES:
        assert checked == {("serve", "search"), ("serve", "embedder"), ("ingest",)}, checked
    else:
        hooked = {("delete-index",)} if any(is_hook(o) and o["kind"] == "Job" for o in rendered[profile]) else set()
        assert checked == {("serve", "search"), ("operator",), ("serve", "embedder"), ("ingest",)} | hooked, checked


def test_the_contract_check_sees_a_variable_the_operator_does_not_accept(rendered):
    """The check above is not blind to the operator: the Milvus variable the draft once set is
    refused, in its Deployment and in the SearchIndex's embedder."""
    assert "VSEARCH_MILVUS_URI" not in k8s.accepted_env(["operator"])
    assert "VSEARCH_MILVUS_URI" not in k8s.accepted_env(["serve", "embedder"])
    assert "VSEARCH_OPERATOR_NAMESPACES" in k8s.accepted_env(["operator"])


def test_pending_flags_still_missing():
    """Each variable in PENDING_FLAGS is one the command does not accept yet; once it does,
    remove it from the list so that the check above covers it."""
    for words, names in PENDING_FLAGS.items():
        accepted = k8s.accepted_env(list(words))
        assert accepted is not None, words
        landed = names & accepted
        assert not landed, f"`vsearch {' '.join(words)}` accepts {sorted(landed)} now: remove them from PENDING_FLAGS"


def test_the_contract_function_reads_the_real_parsers():
    search = k8s.accepted_env(["serve", "search"])
    assert {"VSEARCH_SEARCH_HTTP_PORT", "VSEARCH_SEARCH_API_KEY", "VSEARCH_MILVUS_URI"} <= search
    assert "VSEARCH_BATCH_SIZE" not in search
    assert "VSEARCH_INGEST_BATCH_SIZE" in k8s.accepted_env(["ingest"])
    assert "VSEARCH_EMBEDDER_MODEL_DIR" in k8s.accepted_env(["serve", "embedder"])


# --------------------------------------------------------------------------- what each profile adds

def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def test_minimal_uses_the_existing_milvus_and_kafka(rendered):
    objs = rendered["minimal"]
    assert not by_kind(objs, "Milvus") and not by_kind(objs, "KafkaTopic")
    assert not by_kind(objs, "ServiceMonitor")
    search = next(o for o in by_kind(objs, "InferenceService") if o["metadata"]["name"] == "vsearch-search")
    env = {e["name"]: e.get("value") for e in search["spec"]["predictor"]["containers"][0]["env"]}
    assert env["VSEARCH_MILVUS_URI"] == "http://milvus.milvus.svc:19530"
    assert env["VSEARCH_KAFKA_BOOTSTRAP"] == "kafka-bootstrap.kafka.svc:9092"
    assert env["VSEARCH_INDEX_TYPE"] == "HNSW"
    assert json.loads(env["VSEARCH_INDEX_PARAMS"]) == {"M": 16, "efConstruction": 200}
    assert json.loads(env["VSEARCH_SEARCH_PARAMS"]) == {"ef": 64}
    assert search["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert search["spec"]["predictor"]["containers"][0]["args"] == ["serve", "search"]


def test_full_creates_a_diskann_milvus_cluster_and_strimzi_topics(rendered):
    objs = rendered["full"]
    (milvus,) = by_kind(objs, "Milvus")
    assert milvus["spec"]["mode"] == "cluster"
    assert milvus["spec"]["config"]["queryNode"]["enableDisk"] is True
    qn = milvus["spec"]["components"]["queryNode"]
    assert {"mountPath": "/var/lib/milvus/data", "name": "local-disk"} in qn["volumeMounts"]
    assert any("emptyDir" in v for v in qn["volumes"])
    search = next(o for o in by_kind(objs, "InferenceService") if o["metadata"]["name"] == "vsearch-search")
    env = {e["name"]: e for e in search["spec"]["predictor"]["containers"][0]["env"]}
    assert env["VSEARCH_MILVUS_URI"]["value"] == "http://vsearch-milvus.vsearch.svc:19530"
    assert env["VSEARCH_INDEX_TYPE"]["value"] == "DISKANN"
    assert json.loads(env["VSEARCH_SEARCH_PARAMS"]["value"]) == {"search_list": 100}
    assert env["VSEARCH_MILVUS_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "milvus-root-token"
    topics = {t["spec"]["topicName"]: t for t in by_kind(objs, "KafkaTopic")}
    assert set(topics) == {"catalog.images", "catalog.images.dlq", "search.events"}
    assert topics["catalog.images"]["spec"]["config"]["cleanup.policy"] == "compact"
    assert topics["catalog.images"]["spec"]["partitions"] == 12
    assert all(t["metadata"]["labels"]["strimzi.io/cluster"] == "events" for t in topics.values())
    monitors = by_kind(objs, "ServiceMonitor")
    # the operator, and the consumers it runs (one Service for all model versions)
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors} == {"search", "operator", "ingest"}
    services = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    for m in monitors:
        sel = m["spec"]["selector"]["matchLabels"]
        assert [s for s in services.values() if all(s["metadata"]["labels"].get(k) == v for k, v in sel.items())], m
    policies = {p["metadata"]["name"]: p for p in by_kind(objs, "NetworkPolicy")}
    assert set(policies) == {"vsearch-search", "vsearch-operator", "vsearch-operator-embedders",
                             "vsearch-operator-ingest"}
    operator_from = policies["vsearch-operator"]["spec"]["ingress"][0]
    assert operator_from["ports"] == [{"port": 9090, "protocol": "TCP"}]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in operator_from["from"]
    search_from = policies["vsearch-search"]["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}} in search_from
    test_pod = next(o for o in objs if is_test_hook(o))
    assert any(all(test_pod["metadata"]["labels"].get(k) == v for k, v in p.get("podSelector", {}).get("matchLabels", {"x": "y"}).items())
               for p in search_from), "the helm test pod cannot reach the search API"


def test_full_search_replicas_share_a_click_secret_and_an_s3_query_store(rendered):
    search = next(o for o in by_kind(rendered["full"], "InferenceService")
                  if o["metadata"]["name"] == "vsearch-search")
    container = search["spec"]["predictor"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["VSEARCH_SEARCH_CLICK_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "vsearch-click-secret", "key": "click-secret"}
    assert env["VSEARCH_SEARCH_QUERY_STORE"]["value"] == "s3://vsearch-queries/search"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio.svc:9000"
    assert container["envFrom"] == [{"secretRef": {"name": "vsearch-s3"}}]


def test_notes_warn_about_replicas_without_a_click_secret(tools):
    res = k8s.run([tools.helm, "install", "vsearch", CHART, "-n", "vsearch", "--dry-run=client",
                   "-f", profile_file("minimal")])
    notes = res.stdout.split("NOTES:", 1)[1]
    assert "without search.clickSecret.existingSecret" in notes and "s3://bucket/prefix" in notes
    res = k8s.run([tools.helm, "install", "vsearch", CHART, "-n", "vsearch", "--dry-run=client",
                   "-f", profile_file("full")])
    assert "clickSecret" not in res.stdout.split("NOTES:", 1)[1]


def test_search_params_default_per_index_type(tools):
    """Helm merges maps, so the defaults live in the template: a values file's searchParams
    replace them instead of being sent along with them."""
    def params(*sets):
        objs = k8s.load_all(tools.template(profile_file("minimal"), set_values=sets).stdout)
        search = next(o for o in objs if o["kind"] == "InferenceService" and o["metadata"]["name"] == "vsearch-search")
        env = {e["name"]: e.get("value") for e in search["spec"]["predictor"]["containers"][0]["env"]}
        return json.loads(env["VSEARCH_SEARCH_PARAMS"]) if "VSEARCH_SEARCH_PARAMS" in env else None
    assert params("milvus.index.searchParams=null") == {"ef": 64}
    assert params("milvus.index.searchParams=null", "milvus.index.type=DISKANN") == {"search_list": 100}
    assert params("milvus.index.searchParams=null", "milvus.index.type=FLAT") is None
    assert params("milvus.index.searchParams.ef=128") == {"ef": 128}


def test_the_memory_bound_profile_indexes_with_sq8(tools):
    """values-memory-bound.yaml over a profile: the SearchIndex and the search service both
    build and search IVF_SQ8 with its nlist/nprobe (the bench.index choice)."""
    objs = k8s.load_all(tools.template(CHART / "values-memory-bound.yaml", set_values=(
        "milvus.uri=http://milvus:19530", "kafka.bootstrap=kafka:9092")).stdout)
    (index,) = by_kind(objs, "SearchIndex")
    assert index["spec"]["milvus"]["index"] == {"type": "IVF_SQ8", "metric": "COSINE",
                                               "params": {"nlist": 4096}, "searchParams": {"nprobe": 64}}
    search = next(o for o in objs if o["kind"] == "InferenceService" and o["metadata"]["name"] == "vsearch-search")
    env = {e["name"]: e.get("value") for e in search["spec"]["predictor"]["containers"][0]["env"]}
    assert env["VSEARCH_INDEX_TYPE"] == "IVF_SQ8" and json.loads(env["VSEARCH_SEARCH_PARAMS"]) == {"nprobe": 64}


def test_gpu_schedules_the_operators_embedders_on_a_gpu(rendered):
    (index,) = by_kind(rendered["gpu"], "SearchIndex")
    emb = index["spec"]["embedder"]
    assert emb["image"].endswith(":0.1.0-cuda")
    assert emb["resources"]["limits"]["nvidia.com/gpu"] == "1" and emb["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert {"name": "VSEARCH_EMBEDDER_DEVICE", "value": "cuda"} in emb["env"]
    assert emb["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert emb["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert not index["spec"]["ingest"]["image"].endswith("-cuda")
    search = next(o for o in by_kind(rendered["gpu"], "InferenceService") if o["metadata"]["name"] == "vsearch-search")
    assert not search["spec"]["predictor"]["containers"][0]["image"].endswith("-cuda")


def test_gpu_without_the_operator_schedules_the_charts_embedder_on_a_gpu(tools):
    objs = tools.render("gpu", profile_file("no-operator"), set_values=["embedder.gpu.runtimeClassName=nvidia"])
    emb = next(o for o in by_kind(objs, "InferenceService") if o["metadata"]["name"] == "vsearch-embedder")
    pred = emb["spec"]["predictor"]
    c = pred["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["image"].endswith(":0.1.0-cuda")
    assert {"name": "VSEARCH_EMBEDDER_DEVICE", "value": "cuda"} in c["env"]
    assert pred["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pred["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pred["runtimeClassName"] == "nvidia"


def test_helm_test_hook_sends_an_image_to_search(rendered):
    (pod,) = [o for o in rendered["minimal"] if is_test_hook(o)]
    c = pod["spec"]["containers"][0]
    assert "/search" in c["args"][0] and "files=" in c["args"][0]
    assert {"name": "SEARCH_URL", "value": "http://vsearch-search-predictor.vsearch.svc"} in c["env"]


def test_notes_tell_how_to_reach_the_search_api(tools):
    res = k8s.run([tools.helm, "install", "vsearch", CHART, "-n", "vsearch", "--dry-run=client",
                   "-f", profile_file("minimal")])
    assert res.returncode == 0, res.stderr
    notes = res.stdout.split("NOTES:", 1)[1]
    assert "port-forward service/vsearch-search-predictor 8000:80" in notes
    assert "curl -F image=@photo.jpg" in notes and "/search" in notes
    assert '-H "X-API-Key: $API_KEY"' in notes and "get secret vsearch-api-key" in notes
    assert "WARNING" not in notes.split("WARNING: 2 search replicas")[0]     # key and policies on
    assert "helm test vsearch" in notes


# --------------------------------------------------------------------------- refusals

SCHEMA_REFUSALS = [
    ("wrong type", "search:\n  minReplicas: two\n", "at '/search/minReplicas': got string, want integer"),
    ("unknown key", "search:\n  replicas: 3\n", "at '/search': additional properties 'replicas' not allowed"),
    ("unknown top-level key", "milvsu:\n  uri: http://x:19530\n", "additional properties 'milvsu' not allowed"),
    ("below the minimum", "search:\n  minReplicas: 0\n", "at '/search/minReplicas': minimum: got 0, want 1"),
    ("above the maximum", "kafka:\n  topics:\n    catalog:\n      partitions: 5000\n",
     "at '/kafka/topics/catalog/partitions': maximum: got 5,000, want 1,000"),
    ("not in the enum", "milvus:\n  index:\n    type: ANNOY\n",
     "at '/milvus/index/type': value must be one of 'DISKANN', 'HNSW', 'IVF_SQ8', 'IVF_PQ', 'IVF_FLAT', 'FLAT'"),
    ("an unpinned image", "image:\n  tag: latest\n",
     "at '/image/tag': value must be 'a pinned tag, not latest (latest moves under a running release)'"),
    ("a secret in values", "milvus:\n  auth:\n    token: root:Milvus\n",
     "at '/milvus/auth': additional properties 'token' not allowed"),
    ("resources without limits", "search:\n  resources:\n    limits: null\n",
     "at '/search/resources': missing property 'limits'"),
    ("a bad quantity", "search:\n  resources:\n    requests: {cpu: lots, memory: 1Gi}\n    limits: {cpu: 1, memory: 1Gi}\n",
     "at '/search/resources/requests/cpu'"),
]


@pytest.mark.parametrize("case,values,message", SCHEMA_REFUSALS, ids=[c[0] for c in SCHEMA_REFUSALS])
def test_values_schema_refuses_bad_values(tools, tmp_path, case, values, message):
    bad = tmp_path / "bad-values.yaml"
    bad.write_text(values)
    res = tools.template(profile_file("minimal"), bad, check=False)
    assert res.returncode != 0, f"{case}: accepted"
    assert "values don't meet the specifications of the schema" in res.stderr
    assert message in res.stderr, res.stderr


def test_schema_refusals_say_why():
    """helm prints a failed `not` as "'not' failed", with no reason: the schema uses none (a
    refused value is an if/then const, whose message names what is wanted)."""
    def walk(node, path):
        if isinstance(node, dict):
            assert "not" not in node, f"{path}: 'not' in values.schema.json"
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")
    walk(json.loads((CHART / "values.schema.json").read_text()), "")


TEMPLATE_REFUSALS = [
    ("no-operator", ["ingest.terminationGracePeriodSeconds=20"], "must be at least ingest.stopGraceSeconds + 10"),
    ("minimal", ["search.minReplicas=5", "search.maxReplicas=2"], "search.minReplicas must not exceed search.maxReplicas"),
    ("minimal", ["milvus.uri="], "milvus.uri is required unless milvus.create=true"),
    ("minimal", ["kafka.bootstrap="], "kafka.bootstrap is required"),
    ("minimal", ["milvus.create=true", "milvus.cluster.mode=standalone", "milvus.index.type=DISKANN"],
     "DISKANN needs milvus.cluster.mode=cluster"),
    ("minimal", ["kafka.strimzi.createTopics=true"], "kafka.strimzi.cluster is required"),
    ("minimal", ["operator.enabled=false"], "searchIndex.create needs operator.enabled"),
    ("no-operator", ["embedder.gpu.enabled=true", "image.digest=sha256:" + "0" * 64], "embedder.gpu.imageDigest is required"),
    ("minimal", ["embedder.gpu.enabled=true", "image.digest=sha256:" + "0" * 64], "embedder.gpu.imageDigest is required"),
    # what the SearchIndex cannot carry is refused rather than dropped
    ("minimal", ["model.storageUri=hf://org/model"], "hf:// and oci:// only work with operator.enabled=false"),
    ("minimal", ["ingest.stopGraceSeconds=55"], "ingest.stopGraceSeconds must be at most 50 with the operator"),
    ("minimal", ["searchIndex.rollout.gate.golden.configMap=golden", "searchIndex.rollout.gate.golden.uri=https://eval.example/g.csv"],
     "give configMap or uri, not both"),
    ("minimal", ["operator.metricsPort=8080"], "operator.healthPort and operator.metricsPort must differ"),
]


@pytest.mark.parametrize("profile,sets,message", TEMPLATE_REFUSALS, ids=[f"{p}: {m}" for p, _, m in TEMPLATE_REFUSALS])
def test_templates_refuse_inconsistent_values(tools, profile, sets, message):
    res = tools.template(profile_file(profile), set_values=sets, check=False)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr


def test_without_the_operator_hf_model_uris_still_work(tools):
    objs = tools.render("no-operator", set_values=["model.storageUri=hf://org/model"])
    emb = next(o for o in by_kind(objs, "InferenceService") if o["metadata"]["name"] == "vsearch-embedder")
    assert {"name": "STORAGE_URI", "value": "hf://org/model"} in emb["spec"]["predictor"]["containers"][0]["env"]
