"""Augmentations: the same decoded image and preprocessing as serving, random in between."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from vsearch.predictor.preprocess import PreprocessConfig, bytes_to_array, decode_image
from vsearch.trainer.augment import (
    AugmentConfig,
    PairAugment,
    SimCLRAugment,
    random_resized_crop,
    serving_view,
    shift_hue,
    training_image,
)

CFG = PreprocessConfig(image_size=48, resize_size=56)


def test_views_are_model_inputs_and_differ(photo_bytes):
    img = training_image(photo_bytes[0], CFG)
    assert min(img.size) == CFG.resize_size            # shrunk once, kept whole for random crops
    aug = SimCLRAugment(CFG)
    rng = random.Random(0)
    a, b = aug(img, rng), aug(img, rng)
    assert a.shape == b.shape == (3, 48, 48) and a.dtype == np.float32
    assert np.abs(a - b).mean() > 0.05
    again = SimCLRAugment(CFG)(img, random.Random(0))
    assert np.array_equal(a, again)                    # a function of the generator: resumable
    assert PairAugment(CFG)(img, random.Random(1)).shape == (3, 48, 48)


def test_without_randomness_a_view_is_the_serving_input(photo_bytes):
    none = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0, jitter_p=0,
                         grey_p=0, blur_p=0)
    square = Image.fromarray(np.asarray(decode_image(photo_bytes[1]))[:150, :150])
    cfg = PreprocessConfig(image_size=48, resize_size=48)
    view = SimCLRAugment(cfg, none)(square, random.Random(0))
    assert np.allclose(view, serving_view(square, cfg), atol=1e-5)


def test_serving_view_is_the_predictor_preprocessing(photo_bytes):
    assert np.array_equal(serving_view(decode_image(photo_bytes[2]), CFG), bytes_to_array(photo_bytes[2], CFG))


def test_random_resized_crop_keeps_the_requested_area():
    img = Image.new("RGB", (200, 100))
    for seed in range(20):
        out = random_resized_crop(img, 32, (0.3, 0.5), (0.75, 1.33), random.Random(seed))
        assert out.size == (32, 32)


def test_hue_shift_rotates_colours():
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    r, g, b = shift_hue(red, 1 / 3).getpixel((0, 0))
    assert g > 200 and r < 40 and b < 40
