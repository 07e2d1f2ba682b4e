"""Search events on the Kafka topic ``search.events`` (JSON values, key = query_id): the
search service writes them, ``vsearch ctr`` reports click-through rate from them and the
trainer turns them into (query image, clicked image) pairs.

impression: {"schema": 1, "type": "impression", "query_id": str, "query_hash": sha256 hex of
             the query image bytes (after crop: hash of bytes + crop), "query_uri": str | null
             (where the query image was stored, file:// or catalog:<id>), "crop": [4] | null,
             "model_version": str, "results": [{"id": str, "rank": int (1-based),
             "score": float}], "ts": epoch-ms}
click:      {"schema": 1, "type": "click", "query_id": str, "query_hash": str,
             "query_uri": str | null, "crop": [4] | null, "item_id": str, "item_uri": str | null,
             "rank": int, "model_version": str, "ts": epoch-ms}

The search service also writes "image_hash" (sha256 of the uncropped query image bytes; the
stored file at query_uri is that uncropped image, "crop" says which part was searched) in
both, "k" and each result's "uri" in impressions, and the clicked result's "score" in clicks.
Delivery is at least once: readers de-duplicate impressions by query_id and clicks by
(query_id, item_id).
"""

from __future__ import annotations

import json

from .kafka import read_topic

TOPIC = "search.events"
SCHEMA = 1
TYPES = ("impression", "click")


class BadSearchEvent(ValueError):
    pass


def encode(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()


def decode(value: bytes) -> dict:
    try:
        rec = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadSearchEvent(f"not JSON: {exc}") from exc
    if not isinstance(rec, dict) or rec.get("schema") != SCHEMA or rec.get("type") not in TYPES:
        raise BadSearchEvent(f"not a search event of schema {SCHEMA}: {str(rec)[:200]}")
    for key in ("query_id", "model_version", "ts"):
        if key not in rec:
            raise BadSearchEvent(f"search event without {key!r}")
    if rec["type"] == "click" and "item_id" not in rec:
        raise BadSearchEvent("click event without 'item_id'")
    return rec


def read_all(bootstrap: str, topic: str = TOPIC, *, idle_s: float = 3.0,
             timeout_s: float | None = None, client_id: str = "vsearch-reader"):
    """Every record of ``topic`` from the beginning (:func:`vsearch.core.kafka.read_topic`),
    decoded; for a record that cannot be decoded, the :class:`BadSearchEvent` saying why (so
    callers count what they skip). Raises ``LookupError`` when the topic does not exist and
    ``TimeoutError`` when records are still arriving after ``timeout_s``."""
    for m in read_topic(bootstrap, topic, idle_s=idle_s, timeout_s=timeout_s, client_id=client_id):
        try:
            yield decode(m.value)
        except BadSearchEvent as exc:
            yield BadSearchEvent(f"{m.topic}:{m.partition}@{m.offset}: {exc}")
