"""JSON in and out. Out: JSON that other programs can read (NaN and infinity become null;
``json.dumps`` would write ``NaN``, which is not JSON, and never calls its ``default`` hook for
floats), numpy scalars become numbers and paths text. In: a JSON object from a flag, a form
field or a request, with one clear error."""

from __future__ import annotations

import json
import math
from pathlib import PurePath

import numpy as np


def json_safe(x):
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, PurePath):
        return str(x)
    return x


def dumps(x, **kwargs) -> str:
    """``json.dumps`` of :func:`json_safe` (``x``); refuses anything still not JSON."""
    return json.dumps(json_safe(x), allow_nan=False, **kwargs)


def json_object(value, what: str) -> dict:
    """``value`` as a dict: a dict as it is, JSON text of an object parsed, nothing as ``{}``;
    anything else raises ``ValueError`` saying that ``what`` must be a JSON object."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{what} must be a JSON object, got {value[:200]!r}: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return dict(value)
