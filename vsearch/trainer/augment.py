"""Augmentations for contrastive training, written with PIL and numpy (no torchvision).

Every view starts from an image decoded by :func:`vsearch.predictor.preprocess.decode_image` and ends
with :func:`vsearch.predictor.preprocess.normalise`, so training sees exactly the pixels serving sees;
only the geometry and colour in between are random.

    >>> aug = SimCLRAugment(meta.preprocess)
    >>> img = training_image(path_bytes, meta.preprocess)     # decoded once, kept in memory
    >>> v1, v2 = aug(img, rng), aug(img, rng)                  # two float32 CHW views

The recipe is SimCLR's (Chen et al. 2020): random resized crop, horizontal flip, colour jitter
(brightness, contrast, saturation, hue) with p=0.8, greyscale with p=0.2, Gaussian blur with
p=0.5. Strengths are fields of :class:`AugmentConfig`.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from ..predictor.preprocess import Box, Limits, PreprocessConfig, apply_crop, decode_image, image_to_array, normalise


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.2, 1.0)     # fraction of the image area kept
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the crop
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1                                  # fraction of the hue circle, +-
    grey_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)      # at 224 px; scaled to the input size

    def to_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- helpers

def training_image(data: bytes, cfg: PreprocessConfig, limits: Limits = Limits(),
                   crop: Box | None = None) -> Image.Image:
    """Decode with the serving decoder (and cut the query's crop box out of the original, as
    serving does), then shrink so the shorter side is ``cfg.resize_size`` (the size serving
    resizes to before its centre crop). Small enough to keep a whole catalog in memory;
    random crops are then taken from the whole picture."""
    img = apply_crop(decode_image(data, limits), crop)
    w, h = img.size
    scale = cfg.resize_size / min(w, h)
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), cfg.pil_resample,
                         reducing_gap=3.0)
    return img


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float],
                        ratio: tuple[float, float], rng: random.Random,
                        resample: int = Image.BILINEAR) -> Image.Image:
    """A random box of ``scale`` x area and aspect ``ratio``, resized to ``size`` x ``size``
    (torchvision's algorithm: 10 tries, then the centred largest box of an allowed ratio)."""
    w, h = img.size
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
            break
    else:
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, round(w / ratio[0])
        elif in_ratio > ratio[1]:
            cw, ch = round(h * ratio[1]), h
        else:
            cw, ch = w, h
        x0, y0 = (w - cw) // 2, (h - ch) // 2
    return img.resize((size, size), resample, box=(x0, y0, x0 + cw, y0 + ch))


def shift_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by ``shift`` of a full turn (-0.5..0.5)."""
    if abs(shift) < 1e-6:
        return img
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(shift * 255))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def colour_jitter(img: Image.Image, a: AugmentConfig, rng: random.Random) -> Image.Image:
    ops = []
    if a.brightness:
        ops.append(lambda im: ImageEnhance.Brightness(im).enhance(
            rng.uniform(1 - a.brightness, 1 + a.brightness)))
    if a.contrast:
        ops.append(lambda im: ImageEnhance.Contrast(im).enhance(
            rng.uniform(1 - a.contrast, 1 + a.contrast)))
    if a.saturation:
        ops.append(lambda im: ImageEnhance.Color(im).enhance(
            rng.uniform(1 - a.saturation, 1 + a.saturation)))
    if a.hue:
        ops.append(lambda im: shift_hue(im, rng.uniform(-a.hue, a.hue)))
    rng.shuffle(ops)
    for op in ops:
        img = op(img)
    return img


# --------------------------------------------------------------------------- views

class SimCLRAugment:
    """A decoded RGB image -> one random view as the model's float32 CHW input."""

    def __init__(self, cfg: PreprocessConfig, aug: AugmentConfig = AugmentConfig()):
        self.cfg, self.aug = cfg, aug

    def view(self, img: Image.Image, rng: random.Random) -> Image.Image:
        a, size = self.aug, self.cfg.image_size
        img = random_resized_crop(img, size, a.crop_scale, a.crop_ratio, rng, self.cfg.pil_resample)
        if rng.random() < a.flip_p:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < a.jitter_p:
            img = colour_jitter(img, a, rng)
        if rng.random() < a.grey_p:
            img = img.convert("L").convert("RGB")
        if rng.random() < a.blur_p:
            sigma = rng.uniform(*a.blur_sigma) * size / 224
            img = img.filter(ImageFilter.GaussianBlur(radius=sigma))
        return img

    def __call__(self, img: Image.Image, rng: random.Random) -> np.ndarray:
        return normalise(self.view(img, rng), self.cfg)


class PairAugment:
    """Light augmentation for supervised (query, clicked) pairs: a mild random crop and a flip,
    so the network learns what the click says rather than what the augmentation says."""

    def __init__(self, cfg: PreprocessConfig, crop_scale=(0.6, 1.0), flip_p=0.5):
        self.cfg, self.crop_scale, self.flip_p = cfg, crop_scale, flip_p

    def __call__(self, img: Image.Image, rng: random.Random) -> np.ndarray:
        img = random_resized_crop(img, self.cfg.image_size, self.crop_scale, (3 / 4, 4 / 3), rng,
                                  self.cfg.pil_resample)
        if rng.random() < self.flip_p:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return normalise(img, self.cfg)


def serving_view(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """No augmentation: exactly the serving input (resize, centre crop, normalise)."""
    return image_to_array(img, cfg)


# --------------------------------------------------------------------------- catalog profile

def catalog_profile(images, cfg: PreprocessConfig, sample: int = 200, seed: int = 0) -> dict:
    """What the augmentation should respect, measured on (a seeded sample of) the decoded
    training images: ``grey`` (no colour: every pixel's channels within 4 levels), ``native``
    (median shorter side, in pixels, of the images as the cache holds them: below the model's
    ``resize_size`` when the files are small) and ``detail`` (the smallest size in 16, 24,
    32, 48 the images can be shrunk to and enlarged back from with a mean error under 1 % of the
    range: upscaled low-resolution pictures like the digits; None when none is)."""
    images = list(images)
    if len(images) > sample:
        images = random.Random(seed).sample(images, sample)
    if not images:
        return {"images": 0, "grey": False, "native": None, "detail": None}
    grey, shorts, details = 0, [], []
    for img in images:
        a = np.asarray(img.convert("RGB"), np.int16)
        grey += int(np.abs(a - a.mean(2, keepdims=True)).max() <= 4)
        shorts.append(min(img.size))
        g = img.convert("L")
        ga = np.asarray(g, np.float32)
        detail = None
        for s in (16, 24, 32, 48):
            if s >= min(g.size):
                break
            back = np.asarray(g.resize((s, s), Image.BILINEAR).resize(g.size, Image.BILINEAR), np.float32)
            if np.abs(back - ga).mean() < 2.55:
                detail = s
                break
        details.append(detail)
    known = [d for d in details if d is not None]
    return {"images": len(images), "grey": grey >= 0.95 * len(images), "native": int(np.median(shorts)),
            "small": int(np.median(shorts)) < cfg.resize_size,
            "detail": int(np.median(known)) if len(known) >= 0.9 * len(images) else None}


def augment_for(profile: dict, base: AugmentConfig = AugmentConfig()) -> tuple[AugmentConfig, list[str]]:
    """The augmentation that suits a catalog of this :func:`catalog_profile`, and why:

    - grey catalogs: no colour jitter of saturation and hue, no greyscale (it is already);
    - low detail (upscaled small pictures: glyphs, digits): gentle crops (50-100 % of the
      area, a crop of 20 % of a glyph is another glyph), no flip (a mirrored glyph is another
      one), no blur (the detail is all there is);
    - small files (below the model's resize): crops of 35-100 % of the area."""
    changes, a = [], base
    if profile.get("grey"):
        a = replace(a, saturation=0.0, hue=0.0, grey_p=0.0)
        changes.append("grey catalog: no saturation/hue jitter, no greyscale")
    if profile.get("detail"):
        a = replace(a, crop_scale=(max(a.crop_scale[0], 0.5), a.crop_scale[1]), flip_p=0.0, blur_p=0.0)
        changes.append(f"low detail (~{profile['detail']} px): crops of 50-100 %, no flip, no blur")
    elif profile.get("small"):
        a = replace(a, crop_scale=(max(a.crop_scale[0], 0.35), a.crop_scale[1]))
        changes.append(f"small images ({profile['native']} px): crops of 35-100 %")
    return a, changes
