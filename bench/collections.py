"""Labelled image collections unlike Caltech-101, for the fine-tuning benchmark, made only from
what is on the machine (no downloads). Each is written as class sub-folders of PNG files,
so ``vsearch train --data DIR`` trains on its pixels (labels unused) and ``--holdout`` /
``vsearch evaluate --split held-out`` score it on held-out images by their labels.

- ``digits``:   scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), upscaled to
                64x64 (bilinear), 10 classes;
- ``shapes``:   12 shapes drawn with PIL (circle, square, triangle, star, cross, ...) at a
                random size, position, rotation and colour on a random noisy background;
- ``textures``: 10 procedural textures (stripes, checks, dots, waves, bricks, noise, ...) at a
                random scale, angle, phase and pair of colours;
- ``scenes``:   random crops (10-40 % of the area, any position) of 16 photos bundled with
                scikit-image and scikit-learn; the class is the photo a crop comes from.

    python -m bench.collections --out .bench/collections [--only digits,shapes] [--seed 0]

Everything is a function of ``--seed``: the same folders every time.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLLECTIONS = ("digits", "shapes", "textures", "scenes")
SIZE = 96


def _colour(rng) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _far_colours(rng) -> tuple[tuple, tuple]:
    """Two random colours that differ enough to see the pattern."""
    while True:
        a, b = _colour(rng), _colour(rng)
        if sum(abs(x - y) for x, y in zip(a, b)) > 150:
            return a, b


# --------------------------------------------------------------------------- digits

def digits(rng) -> dict[str, list[Image.Image]]:
    from sklearn.datasets import load_digits
    d = load_digits()
    out: dict[str, list[Image.Image]] = {}
    for img, y in zip(d.images, d.target):
        a = (255 - img * (255 / 16)).astype(np.uint8)          # dark ink on white paper
        out.setdefault(str(y), []).append(Image.fromarray(a).resize((64, 64), Image.BILINEAR).convert("RGB"))
    return out


# --------------------------------------------------------------------------- shapes

def _polygon(n, r, cx, cy, angle, star=False):
    pts = []
    for i in range(n * (2 if star else 1)):
        rad = r * (0.45 if star and i % 2 else 1.0)
        t = angle + 2 * math.pi * i / (n * (2 if star else 1))
        pts.append((cx + rad * math.cos(t), cy + rad * math.sin(t)))
    return pts


def _shape(kind: str, rng) -> Image.Image:
    bg, fg = _far_colours(rng)
    noise = rng.normal(0, 12, (SIZE, SIZE, 3))
    img = Image.fromarray(np.clip(np.asarray(bg, float) + noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.38) * SIZE
    cx, cy = rng.uniform(r, SIZE - r), rng.uniform(r, SIZE - r)
    a = rng.uniform(0, 2 * math.pi)
    w = max(2, int(r * 0.3))
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=w)
    elif kind == "ellipse":
        e = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(e).ellipse([cx - r, cy - r * 0.45, cx + r, cy + r * 0.45], fill=255)
        img.paste(fg, (0, 0), e.rotate(math.degrees(a), center=(cx, cy)))
    elif kind in ("triangle", "square", "pentagon", "hexagon"):
        n = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[kind]
        d.polygon(_polygon(n, r, cx, cy, a), fill=fg)
    elif kind == "star":
        d.polygon(_polygon(5, r, cx, cy, a, star=True), fill=fg)
    elif kind in ("cross", "plus-outline"):
        for t in (a, a + math.pi / 2):
            dx, dy = r * math.cos(t), r * math.sin(t)
            d.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=fg, width=w if kind == "cross" else 2)
    elif kind == "line":
        dx, dy = r * math.cos(a), r * math.sin(a)
        d.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=fg, width=w)
    elif kind == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        ox, oy = 0.45 * r * math.cos(a), 0.45 * r * math.sin(a)
        d.ellipse([cx - r + ox, cy - r + oy, cx + r + ox, cy + r + oy], fill=bg)
    return img


SHAPES = ("circle", "ring", "ellipse", "triangle", "square", "pentagon", "hexagon", "star", "cross",
          "plus-outline", "line", "crescent")


def shapes(rng, per_class: int = 80) -> dict[str, list[Image.Image]]:
    return {k: [_shape(k, rng) for _ in range(per_class)] for k in SHAPES}


# --------------------------------------------------------------------------- textures

def _texture(kind: str, rng) -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    a = rng.uniform(0, math.pi)
    u, v = x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)
    period = rng.uniform(8, 20)
    ph = rng.uniform(0, 2 * math.pi)
    if kind == "stripes":
        m = np.sin(2 * math.pi * u / period + ph) > 0
    elif kind == "checks":
        m = (np.sin(2 * math.pi * u / period + ph) > 0) ^ (np.sin(2 * math.pi * v / period) > 0)
    elif kind == "dots":
        m = (np.sin(2 * math.pi * u / period + ph) * np.sin(2 * math.pi * v / period)) > 0.6
    elif kind == "waves":
        m = np.sin(2 * math.pi * (u + 0.25 * period * np.sin(2 * math.pi * v / (2 * period))) / period + ph) > 0
    elif kind == "rings":
        cx, cy = rng.uniform(0, SIZE, 2)
        m = np.sin(2 * math.pi * np.hypot(x - cx, y - cy) / period + ph) > 0
    elif kind == "bricks":
        row = np.floor(v / period)
        m = ((np.mod(v, period) < 2) | (np.mod(u + (row % 2) * period, 2 * period) < 2))
    elif kind == "noise":
        m = rng.random((SIZE // 4, SIZE // 4))
        m = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC)) > 128
    elif kind == "speckle":
        m = rng.random((SIZE, SIZE)) > 0.85
    elif kind == "gradient":
        m = (u - u.min()) / (u.max() - u.min() + 1e-9)
    elif kind == "zigzag":
        m = np.abs(np.mod(u / period + np.abs(np.mod(v / period, 2) - 1), 1) - 0.5) < 0.2
    c0, c1 = (np.asarray(c, float) for c in _far_colours(rng))
    m = np.asarray(m, float)[..., None]
    arr = c0 * (1 - m) + c1 * m + rng.normal(0, 6, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))


TEXTURES = ("stripes", "checks", "dots", "waves", "rings", "bricks", "noise", "speckle", "gradient", "zigzag")


def textures(rng, per_class: int = 80) -> dict[str, list[Image.Image]]:
    return {k: [_texture(k, rng) for _ in range(per_class)] for k in TEXTURES}


# --------------------------------------------------------------------------- scenes

SCENE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "coins", "horse", "rocket", "hubble_deep_field",
                "moon", "brick", "grass", "gravel", "retina", "immunohistochemistry")


def _photos() -> dict[str, Image.Image]:
    import skimage.data
    from sklearn.datasets import load_sample_images
    out = {}
    for name in SCENE_PHOTOS:
        a = np.asarray(getattr(skimage.data, name)())
        if a.dtype != np.uint8:
            a = (255 * (a > 0)).astype(np.uint8) if a.dtype == bool else np.clip(a, 0, 255).astype(np.uint8)
        out[name] = Image.fromarray(a).convert("RGB")
    for name, a in zip(("china", "flower"), load_sample_images().images):
        out[name] = Image.fromarray(a).convert("RGB")
    return out


def scenes(rng, per_class: int = 50) -> dict[str, list[Image.Image]]:
    out = {}
    for name, img in _photos().items():
        w, h = img.size
        crops = []
        for _ in range(per_class):
            area = rng.uniform(0.1, 0.4) * w * h
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = min(w, int(math.sqrt(area * ratio))), min(h, int(math.sqrt(area / ratio)))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crops.append(img.resize((SIZE, SIZE), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)))
        out[name] = crops
    return out


# --------------------------------------------------------------------------- writing

def make(name: str, seed: int = 0) -> dict[str, list[Image.Image]]:
    if name not in COLLECTIONS:
        raise ValueError(f"unknown collection {name!r}: expected one of {', '.join(COLLECTIONS)}")
    return globals()[name](np.random.default_rng([seed, COLLECTIONS.index(name)]))


def write(name: str, out: str | Path, seed: int = 0) -> Path:
    """Write collection ``name`` as ``out/<class>/<nnnn>.png`` (kept if already complete)."""
    out = Path(out)
    done = out / ".complete"
    if done.exists() and done.read_text() == f"{name} {seed}\n":
        return out
    for label, images in make(name, seed).items():
        (out / label).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            img.save(out / label / f"{i:04d}.png")
    done.write_text(f"{name} {seed}\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".bench/collections")
    p.add_argument("--only", default=",".join(COLLECTIONS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        path = write(name, Path(args.out) / name, args.seed)
        n = sum(1 for _ in path.rglob("*.png"))
        print(f"{name}: {n} images in {sum(1 for q in path.iterdir() if q.is_dir())} classes at {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
