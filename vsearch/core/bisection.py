"""Find the items a call refuses by splitting the batch in halves.

A batch call (write these rows, look up these ids, embed these images) fails as a whole when
one item is bad. :func:`bisect` calls it on the whole batch, and when it raises a refusal (an
error about the items, not an outage) calls it again on each half, down to single items: the
good items are handled in as few calls as the bad ones allow, and each refusal is pinned on
one item. Errors that are not refusals (outages) propagate at once.

    parts = bisect(rows, store_upsert, refused=lambda e: isinstance(e, ValueError))
    written = sum(len(p.items) for p in parts if p.error is None)
    bad = [(p.items[0], p.error) for p in parts if p.error is not None]
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass
class Part(Generic[T, R]):
    """A run of consecutive items and what the call made of them: ``result`` when it passed,
    ``error`` (with exactly one item) when that item was refused."""
    items: list[T]
    result: R | None = None
    error: BaseException | None = None


def bisect(items: Sequence[T], call: Callable[[list[T]], R],
           refused: Callable[[BaseException], bool]) -> list[Part[T, R]]:
    """``call(items)``, split in halves until every refusal is one item's. Returns the parts
    in the order of ``items`` (their items, concatenated, are ``items``); an empty
    ``items`` makes no call. An exception for which ``refused`` is false propagates."""
    items = list(items)
    if not items:
        return []
    try:
        return [Part(items, result=call(items))]
    except Exception as exc:  # noqa: BLE001  (``refused`` decides; the rest is raised again)
        if not refused(exc):
            raise
        if len(items) == 1:
            return [Part(items, error=exc)]
    mid = len(items) // 2
    return bisect(items[:mid], call, refused) + bisect(items[mid:], call, refused)
