"""manifests/: the kustomize base and overlays, built with the real kubectl, validated like the
chart's output, and equal to the chart's output for each overlay's values."""

from __future__ import annotations

import sys

import pytest

from tests.deploy import k8s
from tests.deploy import test_chart as chart_checks
from tests.deploy.k8s import MANIFESTS, REPO

OVERLAYS = ("dev", "prod")


@pytest.fixture(scope="module")
def built(tools):
    out = {}
    for overlay in OVERLAYS:
        res = k8s.run([tools.kubectl, "kustomize", MANIFESTS / "overlays" / overlay])
        assert res.returncode == 0, res.stderr
        out[overlay] = k8s.load_all(res.stdout)
    return out


def test_manifests_are_generated_from_the_chart(tools):
    res = k8s.run([sys.executable, REPO / ".ci" / "chart_manifests.py", "--check", "--helm", tools.helm])
    assert res.returncode == 0, res.stderr


def test_base_builds(tools):
    res = k8s.run([tools.kubectl, "kustomize", MANIFESTS / "base"])
    assert res.returncode == 0, res.stderr
    kinds = {(o["kind"], o["metadata"]["name"]) for o in k8s.load_all(res.stdout)}
    assert ("InferenceService", "vsearch-search") in kinds and ("Namespace", "vsearch") in kinds


def normalised_chart(tools, overlay) -> list[dict]:
    sys.path.insert(0, str(REPO / ".ci"))
    import chart_manifests
    return chart_manifests.render(str(tools.helm), MANIFESTS / "overlays" / overlay / "chart-values.yaml")


def key(obj):
    return (obj["apiVersion"], obj["kind"], obj["metadata"]["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_equals_the_charts_output(tools, built, overlay):
    plain = {key(o): o for o in built[overlay] if o["kind"] != "Namespace"}
    chart = {key(o): o for o in normalised_chart(tools, overlay)}
    assert set(plain) == set(chart)
    for k in chart:
        assert plain[k] == chart[k], f"{overlay}: {k} differs from the chart's"


def test_dev_is_a_milvus_standalone_and_prod_a_diskann_cluster(built):
    (dev,) = [o for o in built["dev"] if o["kind"] == "Milvus"]
    (prod,) = [o for o in built["prod"] if o["kind"] == "Milvus"]
    assert dev["spec"]["mode"] == "standalone" and prod["spec"]["mode"] == "cluster"
    env = {o["metadata"]["name"]: {e["name"]: e.get("value") for e in o["spec"]["predictor"]["containers"][0]["env"]}
           for o in built["prod"] if o["kind"] == "InferenceService"}
    assert env["vsearch-search"]["VSEARCH_INDEX_TYPE"] == "DISKANN"
    dev_env = {e["name"]: e.get("value") for o in built["dev"] if o["kind"] == "InferenceService" and o["metadata"]["name"] == "vsearch-search"
               for e in o["spec"]["predictor"]["containers"][0]["env"]}
    assert dev_env["VSEARCH_INDEX_TYPE"] == "HNSW"


@pytest.mark.parametrize("version", chart_checks.kube_versions())
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builtin_objects_are_valid(built, overlay, version):
    chart_checks.test_builtin_objects_are_valid(built, overlay, version)
    chart_checks.test_inferenceservice_pods_are_valid_pod_specs(built, overlay, version)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_custom_resources_are_valid(built, crd_schemas, overlay):
    chart_checks.test_custom_resources_are_valid_against_their_crds(built, crd_schemas, overlay)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_hygiene(built, overlay):
    chart_checks.test_every_pod_is_hardened(built, overlay)
    chart_checks.test_every_long_running_workload_has_a_disruption_budget(built, overlay)
    chart_checks.test_secrets_only_by_reference(built, overlay)
    chart_checks.test_the_chart_sets_only_variables_the_command_accepts(built, overlay)


def test_namespace_enforces_the_restricted_pod_security_standard(built):
    (ns,) = [o for o in built["prod"] if o["kind"] == "Namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
