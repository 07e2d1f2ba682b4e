"""Reading KServe V1 and V2 (Open Inference Protocol) requests that carry images: the one
parser of both servers (embedder and search). Every client mistake raises KServe's
``InvalidInput`` (a 400 with the reason).

V2: input ``image`` (BYTES, shape [N]: base64 strings, or raw file bytes through the binary
tensor extension), optional ``crop`` (FP32/FP64, shape [N, 4]: normalised x0,y0,x1,y1 boxes).
V1: ``{"instances": [{"image": {"b64": ...}, "crop": [x0, y0, x1, y1], ...}]}``.

The binary tensor extension (a JSON header of ``Inference-Header-Content-Length`` bytes, then
each binary input's ``binary_data_size`` bytes: BYTES elements as a 4-byte little-endian
length and the bytes, numbers little-endian) is read by :func:`binary_request_to_json`, which
``serving.RequestGuard`` applies before KServe parses the request. No message here repeats
more than a few characters of what the client sent.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any, Iterable

import numpy as np
from kserve.errors import InvalidInput

from ..core.text import brief, names_brief
from .limits import ServerLimits
from .preprocess import Box, InvalidImage, parse_crop, parse_crop_text

# Datatypes of the Open Inference Protocol and their little-endian numpy dtypes.
NUMERIC_DTYPES = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
                  "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2",
                  "FP32": "<f4", "FP64": "<f8"}
MAX_HEADER_BYTES = 1024 * 1024        # the JSON header of a binary-extension request


def count_json_values(body: bytes | str) -> int:
    """An upper bound on the objects, arrays and list items a JSON text holds, counted on the
    bytes (commas and opening brackets, strings included) before anything is parsed."""
    if isinstance(body, str):
        body = body.encode("utf-8", "replace")
    return body.count(b",") + body.count(b"{") + body.count(b"[")


def check_json_body(body: bytes, limits: ServerLimits = ServerLimits()) -> None:
    """Refuse (``InvalidInput``) a JSON body of more than ``limits.max_json_values`` values
    before it is parsed (the number of a V2 request's inputs is checked once the server has
    parsed the bounded body: :func:`check_v2_inputs`)."""
    n = count_json_values(body)
    if n > limits.max_json_values:
        raise InvalidInput(f"the JSON body holds about {n} values (objects, arrays, list items); the "
                           f"limit is {limits.max_json_values}: send fewer or split the request")


def binary_request_to_json(body: bytes, header_length, limits: ServerLimits = ServerLimits()) -> dict:
    """A V2 request that uses the binary tensor extension -> the same request as JSON: BYTES
    elements become ``{"b64": ...}`` (read back as the raw bytes by :func:`decode_b64`),
    numbers become JSON numbers (an FP32 value keeps its exact float32 value). Sizes and
    element counts are checked against ``limits`` (``max_json_values`` elements per input,
    ``max_inputs`` inputs) before anything is built. Raises ``InvalidInput`` saying what is
    malformed (never echoing the data)."""
    try:
        n = int(str(header_length).strip())
    except ValueError:
        raise InvalidInput("Inference-Header-Content-Length must be a number of bytes") from None
    if not 0 < n <= len(body):
        raise InvalidInput(f"Inference-Header-Content-Length is {n}, but the body has {len(body)} bytes")
    if n > MAX_HEADER_BYTES:
        raise InvalidInput(f"the JSON header is {n} bytes; the limit is {MAX_HEADER_BYTES}")
    check_json_body(body[:n], limits)
    max_elements = limits.max_json_values
    try:
        head = json.loads(body[:n])
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidInput("the JSON header of the binary request is not valid JSON") from None
    if not isinstance(head, dict) or not isinstance(head.get("inputs"), list):
        raise InvalidInput('the JSON header of the binary request must be {"inputs": [...]}')
    if len(head["inputs"]) > limits.max_inputs:
        raise InvalidInput(f"{len(head['inputs'])} inputs in one request; the limit is {limits.max_inputs}")
    offset = n
    for i, inp in enumerate(head["inputs"]):
        if not isinstance(inp, dict):
            raise InvalidInput(f"input {i} of the binary request is not an object")
        params = inp.get("parameters")
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is None:
            continue
        name = brief(inp.get("name"), 40)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise InvalidInput(f"input {name}: binary_data_size {brief(size, 20)} does not fit the body "
                               f"({len(body) - offset} bytes left)")
        raw = body[offset:offset + size]
        offset += size
        shape = inp.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise InvalidInput(f"input {name}: shape must be a list of non-negative integers")
        count = math.prod(shape)
        if count > max_elements:
            raise InvalidInput(f"input {name}: {count} elements, over the limit of {max_elements}")
        dtype = inp.get("datatype")
        if dtype == "BYTES":
            items, pos = [], 0
            while pos < len(raw):
                if len(items) >= count:
                    raise InvalidInput(f"input {name}: more BYTES elements in the binary data than "
                                       f"shape {shape} holds ({count})")
                if pos + 4 > len(raw):
                    raise InvalidInput(f"input {name}: a BYTES element's 4-byte length is cut off")
                length = int.from_bytes(raw[pos:pos + 4], "little")
                pos += 4
                if pos + length > len(raw):
                    raise InvalidInput(f"input {name}: a BYTES element of {length} bytes overruns the tensor")
                items.append({"b64": base64.b64encode(raw[pos:pos + length]).decode("ascii")})
                pos += length
            data = items
        elif dtype in NUMERIC_DTYPES:
            width = np.dtype(NUMERIC_DTYPES[dtype]).itemsize
            if len(raw) != count * width:
                raise InvalidInput(f"input {name}: {len(raw)} bytes of binary data, but shape {shape} of "
                                   f"{dtype} needs {count * width}")
            data = np.frombuffer(raw, dtype=NUMERIC_DTYPES[dtype]).tolist()
        else:
            raise InvalidInput(f"input {name}: datatype {brief(dtype, 20)} is not one of BYTES, "
                               f"{', '.join(NUMERIC_DTYPES)}")
        if len(data) != count:
            raise InvalidInput(f"input {name}: {len(data)} elements in the binary data, but shape "
                               f"{shape} needs {count}")
        inp["data"] = data
        rest = {k: v for k, v in params.items() if k != "binary_data_size"}
        if rest:
            inp["parameters"] = rest
        else:
            inp.pop("parameters")
    if offset != len(body):
        raise InvalidInput(f"{len(body) - offset} bytes after the last binary input")
    return head


def decode_b64(value: Any, what: str = "image") -> bytes:
    """Image file bytes from base64 text (also ``{"b64": ...}`` and ``data:`` URLs), or the
    bytes themselves (the binary tensor extension)."""
    if isinstance(value, dict) and "b64" in value:
        value = value["b64"]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise InvalidInput(f"{what}: expected a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," not in value[:1024]:
        raise InvalidInput(f"{what}: a data: URL needs a ',' before its base64 data")
    if value.startswith("data:") and "," in value:            # data URLs from browsers
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{what}: not valid base64 ({str(exc)[:100]})") from None


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


def check_v2_inputs(req, allowed: Iterable[str], max_inputs: int = ServerLimits.max_inputs) -> None:
    """At most ``max_inputs`` inputs, each one of ``allowed``."""
    if len(req.inputs) > max_inputs:
        raise InvalidInput(f"{len(req.inputs)} inputs in one request; the limit is {max_inputs}")
    allowed = tuple(allowed)
    unknown = {i.name for i in req.inputs} - set(allowed)
    if unknown:
        raise InvalidInput(f"unknown input(s) {names_brief(unknown)}: expected {', '.join(allowed)}")


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
        unknown = set(inst) - fields
        if unknown:
            raise InvalidInput(f"instance {i}: unknown field(s) {names_brief(unknown)}: expected "
                               f"{', '.join(sorted(fields))}")
    return instances
