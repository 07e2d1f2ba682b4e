"""Image preprocessing shared by serving, indexing and training (one module, so what is
trained is exactly what is served).

decode (size limits, EXIF orientation, any PIL mode -> RGB) -> optional crop given as a
normalised box (x0, y0, x1, y1) on the *original* image -> resize the shorter side ->
centre-crop to the model's input size -> scale to [0, 1] -> normalise with the model's
mean/std -> float32 CHW.

Every client mistake raises :class:`InvalidImage` (a ``ValueError``) whose message says what
to change; the servers turn it into a 400.
"""

from __future__ import annotations

import functools
import io
import math
import struct
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ..core.text import brief

# Longest side over shortest side of what is resized (the image, or its crop). The resize makes
# the shorter side ``resize_size``: a 1x150000 image would become 256x38,400,000 pixels.
MAX_ASPECT_RATIO = 25


class InvalidImage(ValueError):
    """The client sent something we cannot turn into a model input."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


def set_decoder_pixel_limit(max_pixels: int) -> None:
    """Raise PIL's own decompression-bomb guard (a process-wide setting, about 89 M pixels by
    default) to the configured limit, so that the clear check of :func:`decode_image` is the
    one that refuses. For the entry point that owns the process to call, once."""
    Image.MAX_IMAGE_PIXELS = max(int(max_pixels), DEFAULT_MAX_PIXELS)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model wants its input; stored in the model directory's metadata."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resample: str = "bilinear"

    @property
    def pil_resample(self) -> int:
        return {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}[self.resample]


Box = tuple[float, float, float, float]


def parse_crop(crop) -> Box | None:
    """Validate a normalised crop box; ``None`` or an empty list means the whole image."""
    if crop is None:
        return None
    try:
        values = [float(v) for v in np.asarray(crop, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError) as exc:
        raise InvalidImage(f"crop must be 4 numbers x0,y0,x1,y1 in [0,1], got {brief(crop)}") from exc
    if len(values) == 0:
        return None
    if len(values) != 4:
        raise InvalidImage(f"crop must be 4 numbers x0,y0,x1,y1 in [0,1], got {len(values)} numbers")
    x0, y0, x1, y1 = values
    if not all(math.isfinite(v) for v in values):
        raise InvalidImage("crop values must be finite numbers")
    if min(values) < 0.0 or max(values) > 1.0:
        raise InvalidImage(f"crop values must lie in [0,1] (normalised x0,y0,x1,y1), got {values}")
    if not (x0 < x1 and y0 < y1):
        raise InvalidImage(f"crop box is empty: need x0 < x1 and y0 < y1, got {values}")
    return (x0, y0, x1, y1)


def parse_crop_text(text: str | None) -> Box | None:
    """``"0.1,0.2,0.5,0.9"`` (form fields, query strings, CLI) -> a validated box."""
    if text is None or not str(text).strip():
        return None
    parts = [p for p in str(text).replace(" ", ",").split(",") if p]
    try:
        return parse_crop([float(p) for p in parts])
    except ValueError as exc:
        if isinstance(exc, InvalidImage):
            raise
        raise InvalidImage(f"crop must be 4 numbers x0,y0,x1,y1 in [0,1], got {brief(text)}") from exc


SCALE_KEY = "vsearch.scale"          # img.info: the factor that takes a high-bit image to 0..255


def _high_bit(img: Image.Image) -> bool:
    return img.mode.startswith("I;16") or img.mode in ("I", "F")


def _as_float(img: Image.Image) -> Image.Image:
    """A 16/32-bit greyscale image as PIL's float32 mode ``F`` (PIL's own conversion, no numpy
    temporaries), with the factor that scales it to 0..255 in ``info`` (read from the whole
    image's extrema, so a crop or a resize later keeps the same scale)."""
    mode = img.mode
    lo, hi = img.getextrema()
    if mode == "F" and hi <= 1.0:
        scale = 255.0
    elif mode.startswith("I;16") or hi > 255:
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    out = img if mode == "F" else img.convert("F")
    out.info[SCALE_KEY] = scale
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparent pixels are composed on white; 16/32-bit
    greyscale is scaled down instead of clipped (in float32, in place: for a large image, crop
    and resize it in mode ``F`` first, as :func:`image_to_array` does)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if _high_bit(img):
        if mode != "F" or SCALE_KEY not in img.info:
            img = _as_float(img)
        arr = np.array(img, dtype=np.float32)               # one float32 copy, then in place
        arr *= np.float32(img.info[SCALE_KEY])
        np.nan_to_num(arr, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        np.clip(arr, 0, 255, out=arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if mode == "LAB":                                   # keep the lightness channel
        return img.getchannel(0).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, limits: Limits = Limits(), *, rgb: bool = True) -> Image.Image:
    """Bytes of an image file -> upright RGB PIL image, or :class:`InvalidImage` (whatever the
    decoder raised on a corrupt file, EXIF included). ``rgb=False`` keeps a 16/32-bit
    greyscale image in mode ``F`` (see :func:`image_to_array`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImage(f"image must be the bytes of an image file, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidImage("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidImage(f"image is {len(data)} bytes, over the limit of {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > limits.max_pixels:
                raise InvalidImage(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{limits.max_pixels} pixels")
            if width == 0 or height == 0:
                raise InvalidImage(f"image has no pixels ({width}x{height})")
            img.load()
            img = ImageOps.exif_transpose(img)
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(f"image rejected as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage("not an image: the bytes are not in any image format we can read") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"image could not be decoded (truncated or corrupt file?): {str(exc)[:200]}") from exc
    except MemoryError:
        raise
    except (TypeError, struct.error, IndexError, KeyError, ZeroDivisionError, AttributeError,
            ArithmeticError, RuntimeError, AssertionError) as exc:
        # PIL's plugins (EXIF and TIFF tags above all) raise these on corrupt files
        raise InvalidImage(f"image could not be decoded (corrupt file or metadata): "
                           f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    try:
        return _as_float(img) if (not rgb and _high_bit(img)) else _to_rgb(img)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  (a mode PIL opened but cannot convert)
        raise InvalidImage(f"image could not be converted to RGB ({img.mode}): {type(exc).__name__}") from exc


def _edge(v: float, size: int, up: bool) -> int:
    """A normalised box edge -> a pixel edge: the nearest pixel when the edge lies within a
    tolerance of it (so 0.6 sent as float32, 0.6000000238, is the same edge as 0.6), else the
    pixel boundary that keeps the box's content (floor for left/top, ceil for right/bottom)."""
    x = v * size
    nearest = round(x)
    if abs(x - nearest) <= 1e-4 + 1e-6 * size:
        return int(nearest)
    return int(math.ceil(x) if up else math.floor(x))


def apply_crop(img: Image.Image, crop: Box | None) -> Image.Image:
    """Crop a normalised box out of the original image (before any resizing)."""
    if crop is None:
        return img
    w, h = img.size
    x0, y0, x1, y1 = crop
    left, top = min(_edge(x0, w, False), w - 1), min(_edge(y0, h, False), h - 1)
    right, bottom = max(left + 1, _edge(x1, w, True)), max(top + 1, _edge(y1, h, True))
    return img.crop((left, top, min(right, w), min(bottom, h)))


def resize_center_crop(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Resize so the shorter side is ``resize_size``, then take the centred
    ``image_size`` square."""
    w, h = img.size
    short = min(w, h)
    if max(w, h) > MAX_ASPECT_RATIO * short:
        raise InvalidImage(f"image (or its crop) is {w}x{h} pixels: the long side is over {MAX_ASPECT_RATIO} "
                           f"times the short one, which the resize to {cfg.resize_size} pixels would blow up; "
                           f"send an image (or a crop box) closer to square")
    scale = cfg.resize_size / short
    nw, nh = max(cfg.image_size, round(w * scale)), max(cfg.image_size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), cfg.pil_resample, reducing_gap=3.0)
    left, top = (nw - cfg.image_size) // 2, (nh - cfg.image_size) // 2
    return img.crop((left, top, left + cfg.image_size, top + cfg.image_size))


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple, std: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the scale and offset that take an 8-bit level to ``(level / 255 - mean) / std``."""
    mean64, std64 = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return (1.0 / (255.0 * std64)).astype(np.float32), (-mean64 / std64).astype(np.float32)


def normalise(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB image of the input size -> float32 CHW, scaled to [0, 1] and normalised with the
    model's mean/std: the 8-bit planes made contiguous, then one multiply (uint8 -> float32)
    and one add over the whole array (0.23 ms of CPU at 224x224, 0.15 of it PIL's copy out; a
    per-level lookup table took 0.85, and differed from this by at most 5e-7)."""
    scale, offset = _affine(tuple(cfg.mean), tuple(cfg.std))
    chw = np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))
    out = np.empty(chw.shape, np.float32)
    np.multiply(chw, scale[:, None, None], out=out, dtype=np.float32)
    out += offset[:, None, None]
    return out


def image_to_array(img: Image.Image, cfg: PreprocessConfig, crop: Box | None = None) -> np.ndarray:
    """A decoded image (+ optional crop) -> the model's float32 CHW input. A 16/32-bit
    greyscale image is cropped and resized in float32 mode ``F`` and scaled to 8 bits only
    then (no full-size float temporaries)."""
    if _high_bit(img):
        return normalise(_to_rgb(resize_center_crop(apply_crop(_as_float(img) if img.mode != "F"
                                                               or SCALE_KEY not in img.info else img,
                                                               crop), cfg)), cfg)
    if img.mode != "RGB":
        img = _to_rgb(img)
    return normalise(resize_center_crop(apply_crop(img, crop), cfg), cfg)


def bytes_to_array(data: bytes, cfg: PreprocessConfig, crop: Box | None = None,
                   limits: Limits = Limits()) -> np.ndarray:
    """Bytes of an image file (+ optional crop) -> the model's float32 CHW input."""
    return image_to_array(decode_image(data, limits, rgb=False), cfg, crop)


def stack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack(arrays, axis=0) if arrays else np.zeros((0, 3, 0, 0), np.float32)
