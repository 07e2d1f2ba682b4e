"""The gate's offline-verdict check (``rollout.gate.requireOfflineVerdict``) against real
embedder ModelServers: each serves a copy of the repository's default model whose
``vsearch_model.json`` says it beats its baselines, says it does not, or carries no evaluation;
the gate reads what the embedder reports over HTTP (``GET /vsearch/v1/model``)."""

from __future__ import annotations

import pytest
import requests

from tests.fixtures.operators import model_copy
from vsearch.local.services import start_embedder
from vsearch.operators.gate import VersionPath, run_gate
from vsearch.operators.spec import Gate
from vsearch.predictor.client import EmbedderClient
from vsearch.predictor.model_dir import default_model_dir, read_meta
from vsearch.predictor.zoo import init_model_dir

REPO_MODEL = default_model_dir()


def losing(meta):
    v = meta.evaluation["verdict"]
    v["beats_baselines"] = v["beats_all"] = False
    v["against"]["raw-pixels 32x32"]["beats"] = False
    v["text"] = f"vsearch-default:{meta.version} DOES NOT BEAT raw-pixels 32x32 (map@r 0.0300 vs 0.0409)"


def never_evaluated(meta):
    meta.evaluation = None


@pytest.fixture(scope="module")
def embedders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verdicts")
    dirs = {tag: model_copy(REPO_MODEL, tmp / tag, tag, change)
            for tag, change in (("good", None), ("losing", losing), ("unevaluated", never_evaluated))}
    init_model_dir("resnet-tiny", tmp / "random", name="vsearch-default", version="random", seed=7)
    dirs["random"] = tmp / "random"
    started = {}
    try:
        for tag, d in dirs.items():
            started[tag] = start_embedder(d, log_path=tmp / f"{tag}.log", extra=("--threads", "1"))
        yield {tag: svc.url for tag, svc in started.items()}
    finally:
        for svc in started.values():
            svc.stop()


def gate_of(url: str, version: str, **kwargs) -> dict:
    gate = Gate(sample_size=0, **kwargs)          # this check alone: no store, no golden set
    return run_gate(None, VersionPath(version, f"images__default__{version}", EmbedderClient(url)), None, gate,
                    fetcher=None)


def test_the_embedder_reports_its_model_and_evaluation(embedders):
    r = requests.get(f"{embedders['good']}/vsearch/v1/model", timeout=30)
    assert r.status_code == 200, r.text
    info = r.json()
    meta = read_meta(REPO_MODEL)
    assert (info["name"], info["version"], info["embedding_dim"]) == (meta.name, "good", meta.embedding_dim)
    assert info["evaluation"]["verdict"]["beats_baselines"] is True
    assert requests.get(f"{embedders['unevaluated']}/vsearch/v1/model", timeout=30).json()["evaluation"] is None


def test_a_model_that_beats_its_baselines_passes_with_its_figures(embedders):
    result = gate_of(embedders["good"], "good", require_offline_verdict=True)
    assert result["verdict"] == "Passed" and result["reasons"] == []
    off = result["offline"]
    ev = read_meta(REPO_MODEL).evaluation
    assert off["model"] == "vsearch-default:good" and off["beatsBaselines"] is True
    assert off["metrics"]["map@r"] == round(ev["metrics"]["map@r"], 4)
    assert off["against"] == sorted(ev["verdict"]["against"]) and off["data"] == ev["data"]["source"]


def test_a_model_that_loses_to_a_baseline_is_refused_with_the_evaluations_words(embedders):
    result = gate_of(embedders["losing"], "losing", require_offline_verdict=True)
    assert result["verdict"] == "Failed" and result["offline"]["beatsBaselines"] is False
    (reason,) = result["reasons"]
    assert reason == "offline verdict: vsearch-default:losing DOES NOT BEAT raw-pixels 32x32 (map@r 0.0300 vs 0.0409)"


def test_a_model_never_evaluated_is_refused_and_says_how_to_evaluate_it(embedders):
    result = gate_of(embedders["unevaluated"], "unevaluated", require_offline_verdict=True)
    assert result["verdict"] == "Failed"
    (reason,) = result["reasons"]
    assert "vsearch-default:unevaluated was never evaluated" in reason and "--write-meta" in reason


def test_the_default_gate_refuses_a_random_initialised_model_and_passes_the_trained_default(embedders):
    """Self-consistency cannot tell an untrained model (an identical image finds itself with any
    model), so the default gate asks for the model's own offline verdict."""
    assert Gate().require_offline_verdict is True
    refused = gate_of(embedders["random"], "random")
    assert refused["verdict"] == "Failed" and "vsearch-default:random was never evaluated" in refused["reasons"][0]
    assert gate_of(embedders["good"], "good")["verdict"] == "Passed"


def test_with_the_setting_off_the_verdict_is_not_consulted(embedders):
    result = gate_of(embedders["losing"], "losing", require_offline_verdict=False)
    assert result["verdict"] == "Passed" and "offline" not in result
