"""The committed default model: loads like any model directory, carries its metadata, its
evaluation and the training data's attribution, and is better than its baselines on the
held-out split it was never trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vsearch.local.samples import CALTECH
from vsearch.predictor.inference import Embedder
from vsearch.predictor.model_dir import read_meta
from vsearch.trainer.evaluate import evaluate_models

DEFAULT = Path(__file__).resolve().parents[2] / "models" / "default"

pytestmark = pytest.mark.skipif(not (DEFAULT / "config.json").exists(),
                                reason=f"{DEFAULT} has no trained model yet")


def test_default_model_directory_is_complete_and_small():
    meta = read_meta(DEFAULT)
    assert meta.training["method"] == "simclr-nt-xent"
    assert meta.evaluation["data"]["split"] == "held-out"
    assert {"raw-pixels", "random-init"} <= set(meta.evaluation["baselines"])
    assert meta.evaluation["verdict"]["beats_baselines"] is True           # what the rollout gate reads
    assert (DEFAULT / meta.whitening["file"]).exists()
    text = (DEFAULT / "vsearch_model.json").read_text() + (DEFAULT / "train_log.jsonl").read_text()
    assert '"/' not in text, "metadata and run log name relative paths only"
    readme = (DEFAULT / "README.md").read_text()
    assert "CC BY 4.0" in readme and "10.22002/D1.20086" in readme
    assert (DEFAULT / "evaluation" / "report.json").exists()
    assert (DEFAULT / "evaluation" / "report.png").exists()
    size = sum(p.stat().st_size for p in DEFAULT.rglob("*") if p.is_file())
    assert size < 16 * 1024 * 1024


def test_default_model_embeds(photo_bytes):
    emb = Embedder(DEFAULT)
    v = emb.embed_bytes(photo_bytes[:4])
    emb.close()
    assert v.shape == (4, emb.dim) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)


@pytest.mark.skipif(not (CALTECH / "labels.csv").exists(), reason=f"Caltech-101 subset absent at {CALTECH}")
@pytest.mark.slow
def test_default_model_beats_its_baselines_on_the_held_out_split():
    data = read_meta(DEFAULT).training["data"]
    report = evaluate_models([str(DEFAULT)], str(CALTECH), ks=(1, 10), split="held-out",
                             holdout=data["holdout"], split_seed=data["split_seed"],
                             baselines=["raw-pixels", "random-init"])
    m = {r["kind"]: r["metrics"] for r in report["results"]}
    assert report["results"][0]["queries"] == data["held_out_images"]
    assert m["model"]["map@r"] >= 2 * m["raw-pixels"]["map@r"]            # the goal
    assert m["model"]["map@r"] >= 2 * m["random-init"]["map@r"]
    assert m["model"]["recall@1"] > m["raw-pixels"]["recall@1"]
    assert m["model"]["ndcg@10"] > m["raw-pixels"]["ndcg@10"]
