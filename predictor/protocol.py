"""Reading KServe V1 and V2 (Open Inference Protocol) requests that carry images: the one
parser of both servers (embedder and search). Every client mistake raises KServe's
``InvalidInput`` (a 400 with the reason).

V2: input ``image`` (BYTES, shape [N]: base64 strings, or raw file bytes through the binary
tensor extension), optional ``crop`` (FP32/FP64, shape [N, 4]: normalised x0,y0,x1,y1 boxes).
V1: ``{"instances": [{"image": {"b64": ...}, "crop": [x0, y0, x1, y1], ...}]}``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Iterable

import numpy as np
from kserve.errors import InvalidInput

from .preprocess import Box, InvalidImage, parse_crop, parse_crop_text


def decode_b64(value: Any, what: str = "image") -> bytes:
    """Image file bytes from base64 text (also ``{"b64": ...}`` and ``data:`` URLs), or the
    bytes themselves (the binary tensor extension)."""
    if isinstance(value, dict) and "b64" in value:
        value = value["b64"]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise InvalidInput(f"{what}: expected a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:            # data URLs from browsers
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{what}: not valid base64 ({exc})") from exc


def parse_box(value: Any, what: str = "crop") -> Box | None:
    """A normalised crop box from a list of 4 numbers or ``"x0,y0,x1,y1"`` text (None: the
    whole image)."""
    try:
        return parse_crop_text(value) if isinstance(value, str) else parse_crop(value)
    except InvalidImage as exc:
        raise InvalidInput(f"{what}: {exc}") from exc


def check_count(n: int, limit: int, what: str = "images") -> None:
    if n == 0:
        raise InvalidInput(f"no {what} in the request")
    if n > limit:
        raise InvalidInput(f"{n} {what} in one request, over the limit of {limit}; split the request")


def check_v2_inputs(req, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    unknown = sorted({i.name for i in req.inputs} - set(allowed))
    if unknown:
        raise InvalidInput(f"unknown input(s) {unknown}: expected {', '.join(allowed)}")


def v2_images(req, limit: int) -> list[bytes]:
    """The images of the V2 input ``image``."""
    image = req.get_input_by_name("image")
    if image is None:
        raise InvalidInput("missing input 'image' (BYTES, base64 of the image file)")
    if image.datatype != "BYTES":
        raise InvalidInput(f"input 'image' must have datatype BYTES, got {image.datatype}")
    data = image.data
    if isinstance(data, np.ndarray):
        data = data.reshape(-1).tolist()
    if not isinstance(data, list):
        raise InvalidInput("input 'image' data must be a list of base64 strings")
    if len(image.shape) != 1 or image.shape[0] != len(data):
        raise InvalidInput(f"input 'image' shape must be [N] with N = number of images "
                           f"({len(data)}), got {list(image.shape)}")
    check_count(len(data), limit)
    return [decode_b64(item, f"image {i}") for i, item in enumerate(data)]


def v2_crops(req, n: int) -> list[Box | None]:
    """The boxes of the optional V2 input ``crop`` (None for each image when absent)."""
    crop = req.get_input_by_name("crop")
    if crop is None:
        return [None] * n
    if crop.datatype not in ("FP32", "FP64"):
        raise InvalidInput(f"input 'crop' must have datatype FP32, got {crop.datatype}")
    if list(crop.shape) != [n, 4]:
        raise InvalidInput(f"input 'crop' shape must be [{n}, 4] (one normalised x0,y0,x1,y1 box "
                           f"per image), got {list(crop.shape)}")
    try:
        boxes = np.asarray(crop.data, dtype=np.float64).reshape(n, 4)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"input 'crop' data does not match its shape [{n}, 4]") from exc
    return [parse_box(b.tolist(), f"crop {i}") for i, b in enumerate(boxes)]


def v1_instances(payload: Any, limit: int, fields: Iterable[str], example: str,
                 what: str = "instances") -> list[dict]:
    """The instances of a V1 body (``what`` they are, for the messages), each an object with
    only the given fields."""
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        raise InvalidInput(f"V1 body must be {example}")
    instances = payload["instances"]
    check_count(len(instances), limit, what)
    fields = set(fields)
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise InvalidInput(f"instance {i}: expected an object like {example}")
        unknown = sorted(set(inst) - fields)
        if unknown:
            raise InvalidInput(f"instance {i}: unknown field(s) {unknown}: expected {sorted(fields)}")
    return instances
