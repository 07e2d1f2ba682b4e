"""``vsearch quantize`` and the ``onnxruntime-int8`` runtime: the int8 graph is calibrated on
catalog photos, its quality loss measured on a labelled held-out split before anything is
written, and it is served only for the weights it was made from, within its budget, and close
to the PyTorch network. Real Caltech-101 photos from ../shared/data (skipped when absent)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vsearch.cli import main
from vsearch.local.samples import CALTECH, caltech_photos
from vsearch.predictor.inference import Embedder
from vsearch.predictor.model_dir import default_model_dir
from vsearch.predictor.runtimes import INT8, INT8_DIR, RuntimeUnavailable, weights_digest
from vsearch.predictor.zoo import init_model_dir
from vsearch.trainer.quantize import QuantizeRefused, quantize_model

pytestmark = pytest.mark.skipif(not CALTECH.is_dir(), reason=f"{CALTECH} is absent (Caltech-101 photos)")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """8 classes x 8 Caltech photos in class sub-folders."""
    root = tmp_path_factory.mktemp("labelled")
    for photo, label in caltech_photos(n_classes=8, per_class=8):
        (root / label).mkdir(exist_ok=True)
        shutil.copyfile(photo, root / label / photo.name)
    return root


def fresh_copy(tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(default_model_dir(), dest, ignore=shutil.ignore_patterns(INT8_DIR))
    return dest


def test_the_default_model_ships_an_int8_graph_of_its_own_weights_that_serves(photo_bytes):
    """models/default/int8 was made by `vsearch quantize` from these weights (the runtime checks
    the digest at load) and is within its 1 % budget on the Caltech held-out split."""
    emb = Embedder(default_model_dir(), runtime=INT8, threads=1)
    record = json.loads((default_model_dir() / INT8_DIR / "quantization.json").read_text())
    assert record["weights_sha256"] == weights_digest(emb.net)
    assert record["quality"]["images"] == 999 and record["quality"]["relative_loss"] <= 0.01
    got = emb.embed_bytes(photo_bytes)
    want = Embedder(default_model_dir(), runtime="eager").embed_bytes(photo_bytes)
    cos = (got * want).sum(axis=1)
    assert cos.min() >= 0.99                         # close to the float32 network ...
    assert float(np.abs(got - want).max()) > 1e-4    # ... and really quantized, not the float graph


def test_quantize_writes_the_graph_and_the_runtime_refuses_what_it_should(tmp_path, labelled, photo_bytes):
    model = fresh_copy(tmp_path)
    with pytest.raises(RuntimeUnavailable, match="no int8 graph: make it with `vsearch quantize"):
        Embedder(model, runtime=INT8)
    rc = main(["quantize", "--model-dir", str(model), "--calibration", str(labelled), "--evaluate",
               str(labelled), "--images", "32", "--threads", "1", "--max-loss", "0.05"])
    assert rc == 0
    record = json.loads((model / INT8_DIR / "quantization.json").read_text())
    assert record["calibration"]["images"] == 32            # from the training split of --evaluate
    assert 8 <= record["quality"]["images"] < 64 and record["quality"]["relative_loss"] <= 0.05
    assert Embedder(model, runtime=INT8, threads=1).embed_bytes(photo_bytes[:3]).shape[0] == 3

    # other weights under the same int8/: refused
    other = tmp_path / "other"
    init_model_dir("resnet-small", other, name="vsearch-default", version="x", image_size=64, seed=3)
    shutil.copytree(model / INT8_DIR, other / INT8_DIR)
    with pytest.raises(RuntimeUnavailable, match="made from other weights"):
        Embedder(other, runtime=INT8)
    # a record over its budget: refused
    record["quality"]["relative_loss"] = 0.06
    (model / INT8_DIR / "quantization.json").write_text(json.dumps(record))
    with pytest.raises(RuntimeUnavailable, match=r"quality loss \(0.06\) is not within its budget \(0.05\)"):
        Embedder(model, runtime=INT8)


def test_over_the_budget_nothing_is_written(tmp_path):
    """The full Caltech held-out split (999 photos) loses 0.23 % of mAP@R to int8: a budget of
    0.1 % refuses it and leaves the model directory as it was; the command exits 3."""
    model = fresh_copy(tmp_path)
    before = sorted(p.name for p in model.iterdir())
    with pytest.raises(QuantizeRefused, match=r"int8 loses 0\.\d+ % of mAP@R .* over the budget of 0.10 %"):
        quantize_model(model, CALTECH, CALTECH, images=256, max_loss=0.001, threads=2)
    assert sorted(p.name for p in model.iterdir()) == before
    assert main(["quantize", "--model-dir", str(model), "--calibration", str(CALTECH)]) == 2   # no --evaluate
