"""The label-free validation signal on real images, and the trainer's use of it: the checkpoint
and whitening it picks, the starting model kept when nothing beats it, and the augmentation
fitted to the catalog."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vsearch.predictor.model_dir import read_meta
from vsearch.predictor.zoo import load_model_dir
from vsearch.trainer import validation
from vsearch.trainer.augment import AugmentConfig, augment_for, catalog_profile, training_image
from vsearch.trainer.train import TrainConfig, train

DEFAULT = Path(__file__).resolve().parents[2] / "models" / "default"


@pytest.fixture(scope="module")
def photos(photo_folder):
    """The 32 real photos, decoded as the trainer's cache holds them."""
    _, meta = load_model_dir(DEFAULT) if (DEFAULT / "config.json").exists() else (None, None)
    if meta is None:
        pytest.skip(f"{DEFAULT} has no trained model")
    return [training_image(p.read_bytes(), meta.preprocess) for p in sorted(photo_folder.rglob("*.jpg"))]


def test_the_signal_ranks_the_trained_model_above_its_random_init(photos):
    """Measured, not assumed: on real photos the default model's neighbourhoods survive a
    change of view far better than those of the same network with random weights."""
    trained, meta = load_model_dir(DEFAULT)
    random_net, _ = load_model_dir(DEFAULT, random_init=True)
    vset = validation.view_set(photos, meta.preprocess, n_views=3, seed=0)
    assert vset.x.shape[0] == 3 * len(photos)
    good = validation.score(validation.features(trained, vset.x), vset, k=5)
    bad = validation.score(validation.features(random_net, vset.x), vset, k=5)
    assert 0 <= bad["score"] < good["score"] <= 1, (good, bad)
    assert good["score"] > bad["score"] + 0.05
    # the same views every time: a fair comparison of checkpoints
    again = validation.view_set(photos, meta.preprocess, n_views=3, seed=0)
    assert torch.equal(again.x, vset.x)


def test_agreement_metrics_on_known_embeddings():
    ids = np.repeat(np.arange(6), 2)
    perfect = torch.eye(6).repeat_interleave(2, 0)
    assert validation.agreement(perfect, ids)["map"] == 1.0
    assert validation.neighbour_agreement(torch.randn(6, 4).repeat_interleave(2, 0), 6, 2, k=2)["score"] == 1.0
    q = torch.eye(4)
    assert validation.pair_agreement(q, q)["recall@1"] == 1.0
    assert validation.pair_agreement(q, q.roll(1, 0))["recall@1"] == 0.0
    diverged = validation.score(torch.full((12, 4), float("nan")), validation.ViewSet(torch.zeros(12), 6, 2))
    assert diverged["score"] < 0


def test_select_keeps_the_reference_unless_beaten_by_the_margin_on_both_measures():
    def cand(step, na, vm):
        return validation.Candidate(step, "none", {"score": na, "view_map": vm})
    ref = cand(0, 0.50, 0.60)
    close, far, split = cand(9, 0.505, 0.61), cand(9, 0.52, 0.62), cand(5, 0.70, 0.59)
    assert validation.select([ref, close], ref, 0.01)[0] is ref
    assert validation.select([ref, split], ref, 0.01)[0] is ref      # one measure says worse
    chosen, why = validation.select([ref, close, far, split], ref, 0.01)
    assert chosen is far and "0.5200" in why


def test_a_run_that_makes_things_worse_exports_the_starting_model_unchanged(photo_folder, tiny_model_dir, tmp_path):
    """A learning rate so high that training wrecks the network: the export is the --init
    model's weights, and the run log and the metadata say why."""
    out = train(TrainConfig(data=str(photo_folder), out=str(tmp_path / "keep"), init=str(tiny_model_dir),
                            batch_size=8, lr=50.0, warmup_steps=0, max_steps=2, val_every=1, workers=0,
                            progress=False, version="k", val_fraction=0.5, val_min_images=8, evaluate=False))
    before, _ = load_model_dir(tiny_model_dir)
    after, _ = load_model_dir(out)
    for (name, a), b in zip(before.backbone.state_dict().items(), after.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    sel = read_meta(out).training["selection"]
    assert sel["kept_start"] is True and sel["step"] == 0
    assert "starting model" in sel["reason"] and [h["step"] for h in sel["history"]] == [0, 1, 2]
    assert read_meta(out).training["data"]["validation_images"] == 16
    assert read_meta(out).training["data"]["train_images"] == 16
    logged = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [r["step"] for r in logged if r["event"] == "validation"] == [0, 1, 2]
    assert [r["kept_start"] for r in logged if r["event"] == "selection"] == [True]


def test_the_augmentation_and_size_fit_a_grey_low_detail_catalog(photos):
    rng = np.random.default_rng(0)
    glyphs = [Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).resize((64, 64), Image.BILINEAR)
              .convert("RGB") for _ in range(20)]
    _, meta = load_model_dir(DEFAULT)
    grey = catalog_profile(glyphs, meta.preprocess)
    assert grey["grey"] and grey["small"] and grey["detail"] and grey["detail"] <= 32
    aug, why = augment_for(grey)
    assert aug.flip_p == 0 and aug.saturation == 0 and aug.hue == 0 and aug.grey_p == 0
    assert aug.crop_scale[0] >= 0.5 and len(why) == 2
    colour = catalog_profile(photos, meta.preprocess)
    assert not colour["grey"] and colour["detail"] is None
    assert augment_for(colour) == (AugmentConfig(), [])
