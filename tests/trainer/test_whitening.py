"""The served PCA-whitening: fitted on catalog features, stored in the model directory, loaded
by the serving loader and applied by every path that embeds (eager, optimised, over HTTP)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from vsearch.predictor.inference import Embedder
from vsearch.predictor.model_dir import WHITENING_FILE, ModelDirError, read_meta
from vsearch.predictor.preprocess import decode_image
from vsearch.predictor.zoo import fit_whitening, load_model_dir, save_model_dir
from vsearch.trainer.evaluate import net_embedder
from vsearch.trainer.train import TrainConfig, train


@pytest.fixture(scope="module")
def whitened_dir(tiny_model_dir, photo_bytes, tmp_path_factory):
    net, meta = load_model_dir(tiny_model_dir)
    images = [decode_image(b) for b in photo_bytes]
    net.whitening = fit_whitening(net_embedder(net, meta.preprocess)(images), shrinkage=1.0)
    meta.whitening = {"fitted_on": "12 photos", "shrinkage": 1.0}
    return save_model_dir(net, meta, tmp_path_factory.mktemp("whitened") / "m")


def test_full_whitening_makes_the_catalog_covariance_the_identity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8)) + 3.0
    w = fit_whitening(x, shrinkage=0.0)
    y = w(torch.from_numpy(x)).double().numpy()
    assert np.allclose(y.mean(0), 0, atol=1e-5)
    assert np.allclose(np.cov(y.T), np.eye(8), atol=1e-3)
    shrunk = fit_whitening(x, shrinkage=1.0)(torch.from_numpy(x)).double().numpy()
    assert np.all(np.linalg.eigvalsh(np.cov(shrunk.T)) < 1.0)        # shrinkage damps every direction


def test_whitening_is_saved_loaded_and_served_by_every_path(whitened_dir, tiny_model_dir, photo_bytes):
    meta = read_meta(whitened_dir)
    assert meta.whitening["file"] == WHITENING_FILE and (whitened_dir / WHITENING_FILE).exists()
    net, _ = load_model_dir(whitened_dir)
    assert net.whitening is not None and net.whitening.proj.shape == (meta.embedding_dim,) * 2

    eager = Embedder(whitened_dir, optimize=False).embed_bytes(photo_bytes[:5])
    fast = Embedder(whitened_dir).embed_bytes(photo_bytes[:5])
    plain = Embedder(tiny_model_dir).embed_bytes(photo_bytes[:5])
    assert np.allclose(eager, fast, atol=1e-4)
    assert np.allclose(np.linalg.norm(fast, axis=1), 1, atol=1e-5)
    assert not np.allclose(fast, plain, atol=1e-2)                   # the whitening is applied


def test_a_model_without_its_whitening_file_is_refused(whitened_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(whitened_dir, broken)
    (broken / WHITENING_FILE).unlink()
    with pytest.raises(ModelDirError, match="whitening"):
        load_model_dir(broken)


def test_saving_a_network_without_whitening_drops_a_stale_file(whitened_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(whitened_dir, d)
    net, meta = load_model_dir(d)
    net.whitening = None
    save_model_dir(net, meta, d)
    assert not (d / WHITENING_FILE).exists() and read_meta(d).whitening is None
    assert load_model_dir(d)[0].whitening is None


def test_fine_tuning_never_carries_the_old_whitening_over(whitened_dir, photo_folder, tmp_path):
    kw = dict(data=str(photo_folder), init=str(whitened_dir), max_steps=1, batch_size=8, workers=0,
              progress=False, version="ft")
    plain = train(TrainConfig(out=str(tmp_path / "plain"), whiten=False, **kw))
    assert read_meta(plain).whitening is None and load_model_dir(plain)[0].whitening is None
    refit = train(TrainConfig(out=str(tmp_path / "refit"), **kw))
    old, new = load_model_dir(whitened_dir)[0].whitening, load_model_dir(refit)[0].whitening
    assert read_meta(refit).whitening == {"fitted_on": f"32 training images ({photo_folder})",
                                          "shrinkage": 3.0, "file": WHITENING_FILE}
    assert not torch.allclose(old.mean, new.mean)
