"""A search request, from whichever form it came in (JSON body, multipart form, KServe V1
instance, KServe V2 inputs), checked field by field into one :class:`Query`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from kserve.errors import InvalidInput

from ...core.experiment import MAX_UNIT_CHARS
from ...core.jsonsafe import json_object
from ...core.text import brief, names_brief
from ..preprocess import Box
from ..protocol import check_v2_inputs, decode_b64, parse_box, v1_instances, v2_crops, v2_images
from .errors import BadQuery
from .settings import SearchSettings

FilterSpec = dict[str, list]
QUERY_FIELDS = ("image", "image_b64", "url", "crop", "k", "filter", "log_impression")
MAX_QUERIES = 16                     # queries in one V1/V2 request
USER_HEADER, USER_COOKIE = "X-User-Id", "vsearch_uid"   # the randomisation unit of experiments
_UNIT_RE = re.compile(r"[\x21-\x7e]+")
V1_EXAMPLE = '{"instances": [{"image": {"b64": ...}, "crop": [...], "k": 20}]}'


@dataclass
class Query:
    image: bytes
    crop: Box | None = None
    k: int = 20
    filter: FilterSpec = field(default_factory=dict)
    log_impression: bool = True
    query_uri: str | None = None          # set when the query is a catalog image, e.g. catalog:<id>
    unit: str | None = None               # the experiments' randomisation unit: a user id (unit_of)


def unit_of(headers: Mapping[str, str], cookies: Mapping[str, str] | None = None) -> str | None:
    """The randomisation unit a client names: header ``X-User-Id``, else the web page's
    first-party cookie ``vsearch_uid``; None when neither (the query image's hash is then the
    unit). A user/session id is 1 to 200 visible ASCII characters: a header that is not is
    refused (a 400 that says why: its sender can fix it), a cookie that is not is ignored (the
    page replaces it; a person could not, and a 400 on every search would lock them out)."""
    value = _header(headers, USER_HEADER)
    if value is not None:
        if not _valid_unit(value):
            raise BadQuery(f"{USER_HEADER} must be a user or session id of 1 to {MAX_UNIT_CHARS} visible "
                           f"ASCII characters, got {brief(value)}")
        return value
    value = (cookies or {}).get(USER_COOKIE)
    return value if value is not None and _valid_unit(value) else None


def _valid_unit(value) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= MAX_UNIT_CHARS and bool(_UNIT_RE.fullmatch(value))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    if name in headers:
        return headers[name]
    lower = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lower), None)


def parse_k(value: Any, settings: SearchSettings) -> int:
    if value is None or value == "":
        return settings.k_default
    if isinstance(value, bool):
        raise BadQuery(f"k must be a whole number from 1 to {settings.k_max}, got {brief(value)}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise BadQuery(f"k must be a whole number from 1 to {settings.k_max}, got {brief(value)}") from None
    if not math.isfinite(f) or f != int(f):
        raise BadQuery(f"k must be a whole number from 1 to {settings.k_max}, got {brief(value)}")
    k = int(f)
    if not 1 <= k <= settings.k_max:
        raise BadQuery(f"k must be from 1 to {settings.k_max}, got {k}")
    return k


def parse_filter(value: Any, allowed: Iterable[str]) -> FilterSpec:
    """``{"label": "cat"}`` or ``{"label": ["cat", "dog"], "source": "x"}`` (JSON text or an
    object): every named metadata field must match one of its values (the store's
    :func:`~vsearch.core.store.filter_expr` writes the expression)."""
    try:
        value = json_object(value, 'filter (such as {"label": "cat"})')
    except ValueError as exc:
        raise BadQuery(str(exc)) from exc
    allowed = tuple(allowed)
    out: FilterSpec = {}
    for key, wanted in value.items():
        if key not in allowed:
            raise BadQuery(f"unknown filter field {key!r}: the fields that can be filtered on are "
                           f"{', '.join(allowed) or '(none)'}")
        values = wanted if isinstance(wanted, list) else [wanted]
        if not values or len(values) > 100:
            raise BadQuery(f"filter field {key!r} needs 1 to 100 values")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise BadQuery(f"filter field {key!r}: values must be strings or numbers, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise BadQuery(f"filter field {key!r}: values must be finite numbers")
            if isinstance(v, str) and len(v) > 256:
                raise BadQuery(f"filter field {key!r}: values must be at most 256 characters")
            if isinstance(v, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in v):
                raise BadQuery(f"filter field {key!r}: values must be valid Unicode text (no lone surrogates)")
            if isinstance(v, int) and not -2**63 <= v < 2**63:
                raise BadQuery(f"filter field {key!r}: integers must fit in 64 bits")
        out[key] = values
    return out


def query_from_fields(fields: Any, settings: SearchSettings, fetch_url: Callable[[str], bytes],
                      where: str = "") -> Query:
    """A query from a JSON object: image_b64 / image ({"b64": ...}) / url, crop, k, filter."""
    if not isinstance(fields, dict):
        raise BadQuery(f"{where}expected an object with 'image' (base64)")
    unknown = set(fields) - set(QUERY_FIELDS)
    if unknown:
        raise BadQuery(f"{where}unknown field(s) {names_brief(unknown)}: expected {', '.join(QUERY_FIELDS)}")
    sources = [f for f in ("image", "image_b64", "url") if fields.get(f) not in (None, "")]
    if len(sources) != 1:
        raise BadQuery(f"{where}give exactly one of image (base64), image_b64 or url")
    try:
        if sources[0] == "url":
            if not settings.allow_url_queries:
                raise BadQuery("image URLs as queries are turned off on this server (--allow-url-queries)")
            image = fetch_url(str(fields["url"]))
        else:
            image = decode_b64(fields[sources[0]])
        return Query(image=image, crop=parse_box(fields.get("crop")),
                     k=parse_k(fields.get("k"), settings),
                     filter=parse_filter(fields.get("filter"), settings.filter_fields),
                     log_impression=fields.get("log_impression", True) is not False)
    except InvalidInput as exc:          # BadQuery included
        exc.reason = where + exc.reason
        raise


def v1_queries(payload: Any, settings: SearchSettings, fetch_url: Callable[[str], bytes]) -> list[Query]:
    instances = v1_instances(payload, MAX_QUERIES, QUERY_FIELDS, V1_EXAMPLE, "queries")
    return [query_from_fields(inst, settings, fetch_url, where=f"instance {i}: ")
            for i, inst in enumerate(instances)]


def v2_queries(req, settings: SearchSettings) -> list[Query]:
    """Inputs ``image`` (BYTES [N]), optional ``crop`` (FP32 [N, 4]) and ``k`` (INT32 [1]);
    parameters ``k`` and ``filter``."""
    check_v2_inputs(req, ("image", "crop", "k"))
    blobs = v2_images(req, MAX_QUERIES)
    crops = v2_crops(req, len(blobs))
    params = req.parameters or {}
    k_value = params.get("k")
    k_in = req.get_input_by_name("k")
    if k_in is not None:
        vals = np.asarray(k_in.data).reshape(-1).tolist()
        if len(vals) != 1:
            raise BadQuery("input 'k' must hold one number")
        k_value = vals[0]
    k = parse_k(k_value, settings)
    spec = parse_filter(params.get("filter"), settings.filter_fields)
    return [Query(image=b, crop=c, k=k, filter=spec) for b, c in zip(blobs, crops)]
