"""Image files: the suffixes the platform treats as images, the walk that finds them in a
folder, and what kind of image a byte string holds (sniffed by PIL, never by the name)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm"})

# The largest image accepted anywhere (a fetched or uploaded file, a decoded picture): the
# defaults of every --max-image-bytes / --max-upload-bytes / --max-pixels flag.
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000

# PIL format name -> (media type, file suffix) of the formats a browser shows.
WEB_FORMATS = {"JPEG": ("image/jpeg", ".jpg"), "PNG": ("image/png", ".png"),
               "WEBP": ("image/webp", ".webp"), "GIF": ("image/gif", ".gif")}


def image_files(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (recursively, by suffix), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def image_format(data: bytes) -> str | None:
    """PIL's name for the format of ``data`` (``"JPEG"``, ``"PNG"``, ...), read from the header
    only (nothing is decoded), or None when it is not an image PIL knows."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        return None


def web_media_type(data: bytes) -> tuple[str, str] | None:
    """``(media type, suffix)`` when ``data`` is a JPEG, PNG, WebP or GIF image, else None."""
    return WEB_FORMATS.get(image_format(data) or "")
