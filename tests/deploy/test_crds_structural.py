"""Every CRD the repository ships obeys the structural-schema rules a real kube-apiserver enforces
(apiextensions.k8s.io/v1): kmock, the suite's in-memory API, stores any CRD, so only this check
sees a schema that a cluster would refuse ("additionalProperties and properties are mutual
exclusive"). The rules are ../shared/tools/check-crds.py's (the workplace's offline checker, also
run by its stop hook), run here on the chart's crds/, manifests/ and operators/."""

from __future__ import annotations

import sys

import pytest
import yaml

from tests.deploy import k8s
from tests.deploy.k8s import CHART, MANIFESTS, REPO

CHECKER = REPO.parent / "shared" / "tools" / "check-crds.py"


def crd_files() -> list:
    candidates = sorted((CHART / "crds").glob("*.yaml")) + sorted(MANIFESTS.rglob("*.yaml")) \
        + sorted((REPO / "operators").glob("*.yaml"))
    return [p for p in candidates
            if any(isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition"
                   for d in yaml.safe_load_all(p.read_text()))]


def test_the_repository_ships_its_crd_in_three_places():
    names = {str(p.relative_to(REPO)) for p in crd_files()}
    assert {"charts/vsearch/crds/searchindex.yaml", "operators/searchindex.yaml",
            "manifests/base/customresourcedefinition-searchindexes.vsearch.io.yaml"} <= names, names


@pytest.mark.skipif(not CHECKER.exists(), reason=f"no {CHECKER} (../shared/tools beside the checkout): "
                                                 "the structural-schema rules cannot be run here")
def test_every_crd_is_structural():
    files = crd_files()
    res = k8s.run([sys.executable, CHECKER, *files], cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(files)} CRDs pass" in res.stdout, res.stdout
