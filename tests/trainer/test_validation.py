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
    # among a gallery: two views agree on their gallery neighbours when they land near the same
    # gallery items, and the gallery's size bounds k
    gallery = torch.eye(4)
    twins = torch.eye(4)[[0, 0, 1, 1, 2, 2]] + 0.01 * torch.randn(6, 4)
    got = validation.neighbour_agreement(twins, 3, 2, k=1, gallery=gallery)
    assert got["score"] == 1.0 and got["k"] == 1 and len(got["_values"]) == 3
    swapped = torch.eye(4)[[0, 3, 1, 2, 2, 1]]
    assert validation.neighbour_agreement(swapped, 3, 2, k=1, gallery=gallery)["score"] == 0.0
    assert validation.neighbour_agreement(twins, 3, 2, k=50, gallery=gallery)["k"] == 4
    diverged = validation.score(torch.full((12, 4), float("nan")), validation.ViewSet(torch.zeros(12), 6, 2))
    assert diverged["score"] < 0


def test_select_keeps_the_reference_unless_surely_beaten_by_the_margin_on_both_measures():
    """The gain is judged per held-out image (paired): a mean gain inside the noise of a small
    validation set does not replace the starting model; a consistent one does."""
    rng = np.random.default_rng(0)
    base_na, base_vm = rng.uniform(0.3, 0.7, 60), rng.uniform(0.4, 0.8, 60)

    def jitter(sd):                                  # zero-mean: the mean gain is exactly d
        e = rng.normal(0, sd, 60)
        return e - e.mean()

    def cand(step, d_na, d_vm, noise=0.005):
        na, vm = base_na + d_na + jitter(noise), base_vm + d_vm + jitter(noise)
        return validation.Candidate(step, "none", {"score": float(na.mean()), "view_map": float(vm.mean()),
                                                   "_per_image": {"score": na, "view_map": vm}})
    ref = validation.Candidate(0, "start", {"score": float(base_na.mean()), "view_map": float(base_vm.mean()),
                                            "_per_image": {"score": base_na, "view_map": base_vm}})
    close, far, split = cand(9, 0.005, 0.01), cand(9, 0.02, 0.02), cand(5, 0.2, -0.01)
    noisy = cand(7, 0.04, 0.04, noise=0.3)           # a larger mean gain, but within the noise
    assert validation.select([ref, close], ref, 0.01)[0] is ref
    assert validation.select([ref, split], ref, 0.01)[0] is ref      # one measure says worse
    kept, why = validation.select([ref, noisy], ref, 0.01)
    assert kept is ref and "not surely better" in why, why
    assert noisy.details["paired_gain"]["mean"] == pytest.approx(0.04)
    assert noisy.details["paired_gain"]["lower"] < 0
    chosen, why = validation.select([ref, close, far, split, noisy], ref, 0.01)
    assert chosen is far and "beats the starting model" in why and "corrected for 4 candidates" in why, why
    assert far.details["paired_gain"]["lower"] > 0
    # the same per-image values with a mismatched image count: refused, not silently compared
    with pytest.raises(ValueError, match="same images"):
        validation.paired_gain({"score": 0.5, "_per_image": {"score": np.zeros(3)}}, ref.measures)
    # a diverged candidate never wins
    assert validation.paired_gain({"score": -1.0, "diverged": True}, ref.measures)["lower"] == -1.0


def test_per_image_measures_average_to_the_reported_ones(photos):
    trained, meta = load_model_dir(DEFAULT)
    vset = validation.view_set(photos[:12], meta.preprocess, n_views=3, seed=0)
    m = validation.score(validation.features(trained, vset.x), vset, k=3)
    assert len(m["_per_image"]["score"]) == 12 and len(m["_per_image"]["view_map"]) == 12
    assert m["_per_image"]["score"].mean() == pytest.approx(m["score"])
    assert m["_per_image"]["view_map"].mean() == pytest.approx(m["view_map"])
    assert "_per_image" not in validation.public(m) and validation.public(m)["score"] == m["score"]
    q = torch.eye(4)
    pairs = validation.pair_agreement(q, q.roll(1, 0) + q)
    assert pairs["_per_image"]["score"].mean() == pytest.approx(pairs["mrr"])


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


def test_the_gallery_signal_scores_the_held_out_views_among_training_images(photo_folder, tiny_model_dir, tmp_path):
    out = train(TrainConfig(data=str(photo_folder), out=str(tmp_path / "g"), init=str(tiny_model_dir),
                            batch_size=8, max_steps=2, val_every=1, workers=0, progress=False, version="g",
                            val_fraction=0.5, val_min_images=8, val_gallery=10, evaluate=False))
    sel = read_meta(out).training["selection"]
    assert [h["gallery"] for h in sel["history"]] == [10, 10, 10]
    assert all(0 <= h["score"] <= 1 for h in sel["history"]) and "_per_image" not in sel["history"][0]
    assert all(c["gain_lower"] is not None for c in sel["candidates"][1:])


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
