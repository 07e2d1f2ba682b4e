"""``vsearch demo`` (``make demo``): the whole platform on one machine.

Starts, each as its own process on a free local port: the Kafka-protocol broker (Tansu), Milvus
Lite as a server (``milvus-lite server``, shared by the consumer and the search service), the
embedder, the catalog consumer (``vsearch ingest``) and the search service with its web page.
Publishes a sample catalog through Kafka (scikit-image's bundled photos and variants of them:
crops, flips, colour shifts; or ``--catalog DIR``), waits until it is searchable (by searching),
prints the URL. Ctrl-C stops everything, in reverse order.

    vsearch demo                       # then open the printed URL
    vsearch demo --catalog ~/photos    # your own images
    vsearch demo --check               # one query end to end, then exit (0 = it worked)
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("vsearch.demo")

# scikit-image's bundled photos (no download needed). "cat" is the same photo as "chelsea":
# it shows near-duplicate collapsing.
SKIMAGE_PHOTOS = ("astronaut", "camera", "cat", "chelsea", "coffee", "coins", "clock", "brick",
                  "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page",
                  "retina", "rocket", "colorwheel", "text", "logo", "horse", "cell")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


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
    from PIL import Image, ImageEnhance, ImageOps

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
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for name in SKIMAGE_PHOTOS:
        try:
            arr = getattr(skimage.data, name)()
        except Exception as exc:                       # a photo that needs a download: skip it
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


def folder_catalog(folder: str | os.PathLike) -> list[dict]:
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise SystemExit(f"--catalog {folder}: not a folder")
    items = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        rel = path.relative_to(root)
        items.append({"id": str(rel.with_suffix("")).replace(os.sep, "/"), "path": str(path),
                      "metadata": {"label": rel.parent.name or root.name, "source": str(root)},
                      "visibility": "public"})
    if not items:
        raise SystemExit(f"--catalog {folder}: no image files in it")
    return items
