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

error:      {"schema": 1, "type": "error", "query_id": str, "model_version": str (of the arm
             that failed), "collection": str, "experiment": {...}, "status": int, "reason": str,
             "took_ms": float, "ts": epoch-ms}: a search of an online experiment's arm that
             failed on the service's side (written only during an experiment, for its guardrails)

During an online experiment (:mod:`vsearch.core.experiment`) impressions, clicks and errors
carry ``"experiment": {"id", "design", "arm", "unit"}`` (``unit``: the randomisation unit's
salted hash); an interleaved impression's results carry ``"team"`` (``serving``/``candidate``)
and its experiment object ``"arm_ms"`` (each version's retrieval time) and, when the candidate
failed and serving answered alone, ``"fallback": true``; a click on it copies the clicked
result's team into its experiment object. Impressions also carry ``"took_ms"`` (the whole
search) and ``"error": false``.

The search service also writes "image_hash" (sha256 of the uncropped query image bytes; the
stored file at query_uri is that uncropped image, "crop" says which part was searched) in
both, "k" and each result's "uri" in impressions, and the clicked result's "score" in clicks.
Delivery is at least once, and a client may replay what it sent. Every reader counts the
same way, through :func:`count_clicks`: an impression once per query_id, and a click once per
(query_id, item_id), only when that query's impression is on the log and the item was among
its results (a search made with ``log_impression=false`` whose impression never came has no
counted clicks). ``vsearch ctr`` and the trainer's click pairs read clicks this way; a
reader added later (an online experiment's arms) must use it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable

from .kafka import read_topic

TOPIC = "search.events"
SCHEMA = 1
TYPES = ("impression", "click", "error")


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
        yield decode_message(m)


def decode_message(m):
    """A consumed Kafka record's search event (:func:`decode`), or the :class:`BadSearchEvent`
    saying why not and where the record is."""
    try:
        return decode(m.value)
    except BadSearchEvent as exc:
        return BadSearchEvent(f"{m.topic}:{m.partition}@{m.offset}: {exc}")


@dataclass
class ClickLog:
    """What :func:`count_clicks` made of a stream of search events."""

    impressions: dict[str, dict] = field(default_factory=dict)     # query_id -> its (first) impression
    clicks: list[dict] = field(default_factory=list)                # counted clicks, in log order
    raw_clicks: int = 0                                             # click records read
    bad: int = 0                                                    # undecodable records
    not_counted: dict[str, int] = field(default_factory=lambda: {
        "duplicate": 0, "without_impression": 0, "not_in_results": 0})

    def clicks_of(self, query_id: str) -> list[dict]:
        return [c for c in self.clicks if c["query_id"] == query_id]


def count_clicks(records: Iterable) -> ClickLog:
    """Raw search events (dicts as :func:`decode` returns them; a :class:`BadSearchEvent` or a
    ``{"_bad": ...}`` dict for an undecodable one) -> the impressions and the clicks that
    count, by the rule of the module: an impression once per query_id, a click once per
    (query_id, item_id), only with its impression on the log and the item among its results.
    Order does not matter (a deferred impression may come after its clicks). Other record
    types (``error``) are neither impressions nor clicks: they are skipped."""
    log = ClickLog()
    pending: list[dict] = []
    for rec in records:
        if isinstance(rec, BadSearchEvent) or not isinstance(rec, dict) or "_bad" in rec:
            log.bad += 1
        elif rec.get("type") == "impression":
            log.impressions.setdefault(str(rec.get("query_id")), rec)
        elif rec.get("type") == "click":
            log.raw_clicks += 1
            pending.append(rec)
    seen: set[tuple[str, str]] = set()
    for rec in pending:
        qid, item = str(rec.get("query_id")), str(rec.get("item_id"))
        imp = log.impressions.get(qid)
        if imp is None:
            log.not_counted["without_impression"] += 1
        elif item not in {str(r.get("id")) for r in imp.get("results") or () if isinstance(r, dict)}:
            log.not_counted["not_in_results"] += 1
        elif (qid, item) in seen:
            log.not_counted["duplicate"] += 1
        else:
            seen.add((qid, item))
            log.clicks.append(rec)
    return log
