"""What one catalog row may carry: the limits of the collection schema (its VARCHAR lengths,
Milvus' JSON field) and the checks of an id and of metadata against them. The store checks
every row it writes with these, and the catalog event schema validates events with the same
ones, so an event that passes validation is a row the store takes."""

from __future__ import annotations

import json

import numpy as np

from .text import brief

VISIBILITIES = ("public", "private")
MAX_ID_BYTES = 512
MAX_URI_BYTES = 4096
MAX_METADATA_BYTES = 65_536
MAX_METADATA_DEPTH = 32              # nesting of objects and lists inside metadata
INT64 = (-2**63, 2**63 - 1)


def _bad_char(text: str) -> str | None:
    """The first control character (C0, DEL, C1) or lone surrogate of ``text``, if any."""
    for c in text:
        o = ord(c)
        if o < 0x20 or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF:
            return c
    return None


def check_id(i) -> str:
    """An id a row can carry (the catalog event schema uses the same check); ``ValueError``
    with the reason otherwise: a non-empty string of at most :data:`MAX_ID_BYTES` UTF-8
    bytes, without control characters or lone surrogates (Milvus' expression parser cannot
    read a newline in a key, UTF-8 cannot carry a surrogate) and without quotes or
    backslashes (pymilvus quotes string keys with single quotes and no escaping)."""
    if not isinstance(i, str) or not i.strip():
        raise ValueError(f"id must be a non-empty string, got {brief(i)}")
    bad = _bad_char(i)
    if bad is not None:
        raise ValueError(f"id {brief(i)} contains U+{ord(bad):04X} (a control character or a lone "
                         "surrogate), which Milvus key lookups cannot carry")
    if len(i.encode()) > MAX_ID_BYTES:
        raise ValueError(f"id longer than {MAX_ID_BYTES} bytes: {i[:60]!r}...")
    if "'" in i or "\\" in i:
        raise ValueError(f"id {i[:80]!r} contains a quote or a backslash, which Milvus key lookups cannot carry")
    return i


def check_metadata(meta) -> dict:
    """Metadata a row can carry: a JSON object of at most :data:`MAX_METADATA_BYTES` (UTF-8)
    and :data:`MAX_METADATA_DEPTH` levels, whose integers fit in int64, whose numbers are
    finite and whose text (keys and values) is valid Unicode: what Milvus' JSON field
    stores. Checked without recursion, so any depth gets its reason."""
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise ValueError(f"metadata must be a JSON object, got {type(meta).__name__}")
    stack = [(meta, 1, "metadata")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_METADATA_DEPTH:
                raise ValueError(f"metadata nests deeper than {MAX_METADATA_DEPTH} levels (at {where[:80]})")
            for k, v in value.items():
                if not isinstance(k, str):
                    raise ValueError(f"metadata keys must be strings, got {type(k).__name__} at {where[:80]}")
                if any(0xD800 <= ord(c) <= 0xDFFF for c in k):
                    raise ValueError(f"metadata key at {where[:80]} contains a lone surrogate (not valid Unicode)")
                stack.append((v, depth + 1, f"{where}.{k[:40]}"))
        elif isinstance(value, (list, tuple)):
            if depth > MAX_METADATA_DEPTH:
                raise ValueError(f"metadata nests deeper than {MAX_METADATA_DEPTH} levels (at {where[:80]})")
            stack.extend((v, depth + 1, f"{where}[{n}]") for n, v in enumerate(value))
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, (int, np.integer)):
            if not INT64[0] <= int(value) <= INT64[1]:
                raise ValueError(f"{where[:80]}: integer {str(value)[:30]} does not fit in 64 bits")
        elif isinstance(value, (float, np.floating)):
            if not np.isfinite(value):
                raise ValueError(f"{where[:80]}: numbers must be finite, got {value}")
        elif isinstance(value, str):
            if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
                raise ValueError(f"{where[:80]}: text contains a lone surrogate (not valid Unicode)")
        else:
            raise ValueError(f"{where[:80]}: {type(value).__name__} is not a JSON value")
    size = len(json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes, the limit is {MAX_METADATA_BYTES}")
    return meta
