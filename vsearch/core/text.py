"""Text for messages: how much of a caller's value an error message shows."""

from __future__ import annotations

from typing import Any, Iterable


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (bytes as their length only): how much of a
    client's value a message shows."""
    text = repr(value) if not isinstance(value, (bytes, bytearray)) else f"<{len(value)} bytes>"
    return text if len(text) <= limit else text[:limit] + "..."


def names_brief(names: Iterable[Any], limit: int = 5) -> str:
    """A few of a client's names for a message (each cut short), and how many more there are:
    an error never grows with the request."""
    names = sorted({str(n) for n in names})
    shown = ", ".join(brief(n, 40) for n in names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")
