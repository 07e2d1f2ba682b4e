"""The chart's `helm test` pod, its script run here against a real search service (`vsearch serve
search` on Milvus Lite, with an API key): right after install, with nothing indexed, it checks
what can be checked (live, ready, the key enforced) and says that the catalog must be published
first, passing by default and failing with tests.requireIndex=true; a service that is not there
fails with the reason. (Here, not in a cluster: no cluster was available.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vsearch.local import services

KEY = "k" * 40


def helm_test_pod(tools, *sets) -> tuple[str, dict]:
    objs = tools.render("minimal", set_values=list(sets))
    (pod,) = [o for o in objs if (o["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["python", "-c"]
    return c["args"][0], {e["name"]: e.get("value") for e in c["env"]}


def run_script(script: str, env: dict, url: str, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, **{k: v for k, v in env.items() if v is not None}, "SEARCH_URL": url,
           "API_KEY": KEY, "WAIT_S": "30", "INDEX_WAIT_S": "0"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def empty_search(tmp_path_factory):
    root = tmp_path_factory.mktemp("helm-test")
    env = {**os.environ, "VSEARCH_MILVUS_URI": str(root / "milvus.db"), "VSEARCH_SEARCH_API_KEY": KEY,
           "VSEARCH_SEARCH_QUERY_STORE": str(root / "queries")}
    svc = services.start_search(log_path=root / "search.log", env=env, timeout=180)
    try:
        yield svc
    finally:
        svc.stop()


@pytest.mark.slow
def test_helm_test_on_an_empty_catalog_says_what_is_missing(tools, empty_search):
    script, env = helm_test_pod(tools)
    res = run_script(script, env, empty_search.url)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "ok: a search without the API key is refused (401)" in out
    assert "NOTE: the search service, its model and its key work, but nothing is indexed yet" in out
    assert "vsearch publish" in out and "kubectl get searchindex" in out

    script, env = helm_test_pod(tools, "tests.requireIndex=true")
    res = run_script(script, env, empty_search.url)
    assert res.returncode != 0
    assert "FAILED: the search service, its model and its key work, but nothing is indexed yet" in res.stderr


def test_helm_test_without_a_service_fails_with_the_reason(tools):
    script, env = helm_test_pod(tools)
    port = services.free_port()
    res = run_script(script, {**env, "WAIT_S": "1"}, f"http://127.0.0.1:{port}")
    assert res.returncode != 0
    assert f"FAILED: http://127.0.0.1:{port} is live (/v2/health/live)" in res.stderr, res.stderr
