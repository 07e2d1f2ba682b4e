"""Sample images and tiny models for running the platform on one machine: the demo's catalog
(scikit-image's bundled photos and variants of them), real photos from the Caltech-101 subset
beside the checkout, generated photo-like images when it is absent, and tiny configurations of
every model family. Used by ``vsearch demo``, the benchmarks and the tests."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

log = logging.getLogger(__name__)

# ../shared/data/caltech101 beside the checkout (VSEARCH_CALTECH_DIR elsewhere).
CALTECH = Path(os.environ.get("VSEARCH_CALTECH_DIR",
                              Path(__file__).resolve().parents[2].parent / "shared" / "data" / "caltech101"))

# Tiny configurations of each supported family: same classes and code path as the full ones.
TINY = {
    "resnet18": dict(config_overrides=dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
                     image_size=64),
    "vit-small": dict(config_overrides=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, patch_size=16), image_size=64),
    "dinov2-small": dict(config_overrides=dict(hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, patch_size=16), image_size=64),
    "clip-vit-b32": dict(config_overrides=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, patch_size=16, projection_dim=24),
                         image_size=64),
}


def caltech_photos(n_classes: int = 5, per_class: int = 4) -> list[tuple[Path, str]]:
    """(path, label) of real Caltech-101 photos, the first ``per_class`` of the first
    ``n_classes`` classes, or [] when the subset is absent."""
    labels = CALTECH / "labels.csv"
    if not labels.exists():
        return []
    by_class: dict[str, list[Path]] = {}
    for line in labels.read_text().splitlines()[1:]:
        path, label = line.rsplit(",", 1)
        by_class.setdefault(label, []).append(CALTECH / path)
    out = []
    for label in sorted(by_class)[:n_classes]:
        out += [(p, label) for p in sorted(by_class[label])[:per_class]]
    return out


def caltech_files(n: int, step: int) -> list[Path]:
    """Every ``step``-th Caltech-101 photo, at most ``n`` (benchmarks), or [] when absent."""
    return sorted((CALTECH / "images").rglob("*.jpg"))[::step][:n] if CALTECH.exists() else []


def generated_photos(n: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs (smooth gradients, shapes, noise) for when the real set is absent."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(120, 300)), int(rng.integers(120, 300))
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.uniform(0, 255, 3)
        img = np.stack([(base[c] + 80 * np.sin(xx / rng.uniform(8, 40) + c) +
                         60 * np.cos(yy / rng.uniform(8, 40))) for c in range(3)], -1)
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.uniform(0, 255, 3)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def photos(n: int, step: int = 7) -> list[bytes]:
    """``n`` real photos (Caltech-101), or generated ones when the subset is absent."""
    files = caltech_files(n, step)
    return [f.read_bytes() for f in files] if files else generated_photos(n)


# scikit-image's bundled photos (no download needed). "cat" is the same photo as "chelsea":
# it shows near-duplicate collapsing.
SKIMAGE_PHOTOS = ("astronaut", "camera", "cat", "chelsea", "coffee", "coins", "clock", "brick",
                  "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page",
                  "retina", "rocket", "colorwheel", "text", "logo", "horse", "cell")


def _to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.shape[-1] == 4:                          # composite transparency on white
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        arr = (arr[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return arr


def variants(img) -> dict:
    """Crops, flips and colour shifts of one PIL image: what a catalog holds many of."""
    w, h = img.size
    out = {
        "original": img,
        "flip": ImageOps.mirror(img),
        "crop-centre": img.crop((int(w * .2), int(h * .2), int(w * .8), int(h * .8))),
        "crop-left": img.crop((0, 0, int(w * .55), h)),
        "warm": Image.merge("RGB", [ch.point(lambda v, f=f: min(255, int(v * f)))
                                    for ch, f in zip(img.split(), (1.15, 1.0, 0.8))]),
        "grey": ImageOps.grayscale(img).convert("RGB"),
        "bright": ImageEnhance.Brightness(img).enhance(1.35),
        "rotate": img.rotate(90, expand=True),
    }
    return out


def write_sample_catalog(out_dir: str | os.PathLike) -> list[dict]:
    """JPEG files of scikit-image's sample photos and their variants under ``out_dir``; returns
    catalog items ``{"id", "path", "metadata", "visibility"}``. One variant is private."""
    import skimage.data

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for name in SKIMAGE_PHOTOS:
        try:
            arr = getattr(skimage.data, name)()
        except Exception as exc:  # noqa: BLE001  (a photo that needs a download: skip it)
            log.info("skipping skimage.data.%s: %s", name, exc)
            continue
        base = Image.fromarray(_to_rgb_uint8(arr), "RGB")
        for variant, img in variants(base).items():
            item_id = f"{name}-{variant}"
            path = out / f"{item_id}.jpg"
            if not path.exists():
                img.save(path, "JPEG", quality=90)
            items.append({"id": item_id, "path": str(path.resolve()),
                          "metadata": {"label": name, "variant": variant, "source": "scikit-image"},
                          # one private item: it is indexed but must never be shown
                          "visibility": "private" if (name, variant) == ("rocket", "warm") else "public"})
    return items


