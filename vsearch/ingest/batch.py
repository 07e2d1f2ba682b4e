"""The batch planner: what a batch of catalog records writes, decided without I/O.

From the polled records to the rows and deletes the writer sends: decode and validate each
record (:func:`decode_records`), drop what is older than the stored version of its id
(:func:`fresh_events`), then keep the newest valid event per id, ties to the later one in the
log (:func:`plan`). Right before the write, :func:`drop_overtaken` drops what a newer write
(another owner of the partition, around a rebalance) made stale in the meantime. Records
that cannot be applied are collected as ``(record, stage, reason)`` for the dead-letter
topic; each step counts its outcomes in the ingest metrics."""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from .deadletter import Dead
from .events import BadEvent, CatalogEvent, decode
from .kafka_internals import partition_of
from .metrics import EVENTS, FAILED

log = logging.getLogger(__name__)

Event = tuple[int, object, CatalogEvent]        # (position in the batch, record, event)


@dataclasses.dataclass
class BatchResult:
    offsets: dict                          # TopicPartition -> next offset to read
    written: int = 0
    deleted: int = 0
    stale: int = 0
    superseded: int = 0
    dead: int = 0


@dataclasses.dataclass
class PreparedBatch:
    result: BatchResult
    rows: list[dict]
    deletes: dict[str, int]
    dead: list[Dead]                      # to dead-letter
    size: int
    started: float
    versions: dict[str, int]              # id -> ts this batch writes (for the next batch's check)
    sources: dict[str, object]            # id -> the record whose event this batch writes
    committed_in_rebalance: dict = dataclasses.field(default_factory=dict)   # tp -> offset
    epochs: dict = dataclasses.field(default_factory=dict)   # tp -> ownership epoch when prepared (.versions)


@dataclasses.dataclass
class FetchedBatch:
    """A batch between its fetch and its embedding: the events still live after the version
    check, the bytes of their images (or why a fetch failed), and what is already known."""
    result: BatchResult
    live: list[Event]
    blobs: dict                           # position -> image bytes, or the FetchError saying why not
    dead: list[Dead]
    size: int
    started: float
    epochs: dict                          # tp -> ownership epoch when read (.versions)


def next_offsets(records: Sequence) -> dict:
    """``{partition: offset after the last record of the batch}``: what a commit stores."""
    offsets: dict = {}
    for r in records:
        tp = partition_of(r)
        offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
    return offsets


def decode_records(records: Sequence, dead: list[Dead]) -> list[Event]:
    """The records that are valid catalog events; the others go to ``dead`` (stage validate)."""
    events: list[Event] = []
    for pos, rec in enumerate(records):
        try:
            events.append((pos, rec, decode(rec.key, rec.value, rec.timestamp)))
        except BadEvent as exc:
            dead.append((rec, "validate", str(exc)))
            FAILED.labels("validate").inc()
        except Exception as exc:  # noqa: BLE001  (one record's surprise must not stop the partition)
            log.exception("unexpected error validating %s[%s]@%s", rec.topic, rec.partition, rec.offset)
            dead.append((rec, "validate", f"the event could not be read: {type(exc).__name__}: "
                                          f"{str(exc)[:300]}"))
            FAILED.labels("validate").inc()
    return events


def without_unreadable_ids(events: list[Event], refused: dict[str, str], dead: list[Dead]) -> list[Event]:
    """``events`` less those whose id Milvus refused to look up (``{id: reason}``), which go
    to ``dead``: such an id can never be written, so it is not retried."""
    if not refused:
        return events
    for _pos, rec, ev in events:
        if ev.id in refused:
            dead.append((rec, "validate", f"Milvus cannot look up this id: {refused[ev.id]}"))
            FAILED.labels("validate").inc()
    return [e for e in events if e[2].id not in refused]


def fresh_events(events: list[Event], stored: dict[str, int], result: BatchResult) -> list[Event]:
    """The events not older than the stored version (``{id: ts}``) of their id."""
    live = []
    for pos, rec, ev in events:
        if ev.ts < stored.get(ev.id, -1):
            result.stale += 1
            EVENTS.labels(ev.op, "stale").inc()
        else:
            live.append((pos, rec, ev))
    return live


def plan(live: list[Event], vectors: dict[int, np.ndarray], result: BatchResult, dead: list[Dead],
         size: int, started: float) -> PreparedBatch:
    """The newest valid event per id (ties: the later in the log) as rows and deletes. An
    upsert without a vector (``{position: vector}``) was dead-lettered and does not count."""
    winners: dict[str, tuple[tuple[int, int], CatalogEvent]] = {}
    for pos, _rec, ev in live:
        if ev.op == "upsert" and pos not in vectors:
            continue                          # dead-lettered
        key = (ev.ts, pos)
        prev = winners.get(ev.id)
        if prev is not None:
            result.superseded += 1
            EVENTS.labels(ev.op, "superseded").inc()
        if prev is None or key > prev[0]:
            winners[ev.id] = (key, ev)

    record_at = {pos: rec for pos, rec, _ in live}
    rows, deletes = [], {}
    for (_, pos), ev in winners.values():
        if ev.op == "delete":
            deletes[ev.id] = ev.ts
        else:
            rows.append({"id": ev.id, "embedding": vectors[pos], "uri": ev.stored_uri,
                         "metadata": ev.metadata, "visibility": ev.visibility, "updated_at": ev.ts})
    return PreparedBatch(result=result, rows=rows, deletes=deletes, dead=dead, size=size,
                         started=started, versions={i: k[0] for i, (k, _) in winners.items()},
                         sources={i: record_at[k[1]] for i, (k, _) in winners.items()})


def without_partitions(p: PreparedBatch, partitions: set) -> PreparedBatch:
    """The batch less everything from ``partitions`` (given to another consumer while the
    batch was being embedded): their records are neither written, dead-lettered nor committed
    here; their new owner reads them again from the committed offsets."""
    if not partitions:
        return p
    keep = {i for i, rec in p.sources.items() if partition_of(rec) not in partitions}
    log.info("%d id(s) of this batch belong to partitions given to another consumer while it was "
             "embedded: left to their new owner", len(p.sources) - len(keep))
    result = dataclasses.replace(p.result, offsets={tp: off for tp, off in p.result.offsets.items()
                                                     if tp not in partitions})
    return dataclasses.replace(
        p, result=result, rows=[r for r in p.rows if r["id"] in keep],
        deletes={i: ts for i, ts in p.deletes.items() if i in keep},
        dead=[d for d in p.dead if partition_of(d[0]) not in partitions],
        versions={i: ts for i, ts in p.versions.items() if i in keep},
        sources={i: rec for i, rec in p.sources.items() if i in keep})


def written_ids(p: PreparedBatch) -> list[str]:
    return list(dict.fromkeys([r["id"] for r in p.rows] + list(p.deletes)))


def drop_overtaken(p: PreparedBatch, stored: dict[str, int]) -> PreparedBatch:
    """The batch less what a newer stored version (``{id: ts}``, read right before the write)
    overtook since it was planned: an older write from a previous owner of the partition
    cannot overwrite a newer one (a delete stays a delete, a public -> private change stays)."""
    rows = [r for r in p.rows if r["updated_at"] >= stored.get(r["id"], -1)]
    deletes = {i: ts for i, ts in p.deletes.items() if ts >= stored.get(i, -1)}
    stale = len(p.rows) - len(rows) + len(p.deletes) - len(deletes)
    if stale:
        log.info("%d write(s) of this batch were overtaken by newer ones since it was read: skipped", stale)
        p.result.stale += stale
        EVENTS.labels("upsert", "stale").inc(len(p.rows) - len(rows))
        EVENTS.labels("delete", "stale").inc(len(p.deletes) - len(deletes))
    return dataclasses.replace(p, rows=rows, deletes=deletes)
