"""The catalog consumer: keeps one Milvus collection (one model version) equal to the catalog
topic, with nothing lost and nothing duplicated.

Loop: poll a batch (up to ``batch_size`` records or ``batch_ms`` after the first one) ->
validate each event -> read the stored version (``updated_at`` or delete time) of the batch's
ids (Strong) and drop events older than it -> fetch images (parallel, timeouts, retries) ->
embed (in process, or the embedder's V2 endpoint) -> for each id keep the newest valid event
(ties: the later in the log) -> upsert / delete in Milvus -> dead-letter the bad records to
``<topic>.dlq`` (original key, value and headers; the reason in headers) -> commit the
batch's offsets. Two stages overlap: the writes of batch N (a writer thread) run while batch
N+1 is polled, validated, fetched and embedded; N is committed when its writes are done, and
N+1's version check counts N's writes as stored.

Guarantees:
- Offsets are committed only after the Milvus writes and the dead-letter sends succeeded, so a
  crash at any point replays the batch; writes are idempotent upserts/deletes by id, so a
  replay leaves no duplicate (dead-letter records may repeat after a crash: at-least-once).
- Milvus, embedder and broker outages are retried with exponential backoff (no commit, no
  crash); the process stays up and catches up when they are back.
- A write Milvus refuses as invalid (:class:`~vsearch.core.store.StoreRefused`, or a row the
  store's own checks refuse) is not an outage: the batch is split until the refused rows are
  found, those are dead-lettered (stage ``write``) and the rest is written. Like kopf's split
  of temporary and permanent errors, only outages are retried.
- SIGTERM/SIGINT: the batch in hand is finished and committed, then the process exits 0. If an
  outage keeps the batch from finishing within ``stop_grace_s`` it exits 75 without committing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import signal
import threading
import time
from concurrent import futures
from typing import Callable, Sequence

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from ..core.fetch import Fetcher, FetchError
from ..core.kafka import GROUP_SETTINGS, ensure_topics, producer
from ..core.store import StoreError, StoreRefused, StoreUnavailable
from ..predictor.preprocess import InvalidImage
from .events import BadEvent, CatalogEvent, decode, dlq_topic

log = logging.getLogger(__name__)

EVENTS = Counter("vsearch_ingest_events_processed_total",
                 "catalog events handled and committed, by op and outcome "
                 "(written, stale: older than the stored version, superseded: a newer event for the "
                 "same id in the batch)", ["op", "outcome"])
FAILED = Counter("vsearch_ingest_events_failed_total",
                 "catalog events that could not be applied, by stage (validate, fetch, decode, embed, write)",
                 ["stage"])
DEAD = Counter("vsearch_ingest_events_dead_lettered_total", "records sent to the dead-letter topic")
RETRIES = Counter("vsearch_ingest_retries_total", "retries after an outage, by stage", ["stage"])
BATCH_SECONDS = Histogram("vsearch_ingest_batch_seconds", "one batch: poll end to commit")
FETCH_SECONDS = Histogram("vsearch_ingest_fetch_seconds", "image fetch time per batch")
EMBED_SECONDS = Histogram("vsearch_ingest_embed_seconds", "embedding time per batch")
WRITE_SECONDS = Histogram("vsearch_ingest_write_seconds", "Milvus write time per batch")
LAST_COMMIT = Gauge("vsearch_ingest_last_commit_timestamp_seconds", "when offsets were last committed")


MAX_DLQ_KEY = 16 * 1024                  # bytes of a dead-letter key kept
MAX_DLQ_HEADER_VALUE = 4096              # bytes of one original header value kept
MAX_DLQ_HEADER_BYTES = 64 * 1024         # bytes of original headers kept in all


def _as_bytes(value) -> bytes | None:
    """A key, value or header value as bytes (None stays None; text is UTF-8, surrogates
    escaped)."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return _as_text(value).encode("utf-8", "backslashreplace")


def _as_text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value if isinstance(value, str) else str(value)


class _Resend(Exception):
    """Dead-letter records to send again in their minimal form (not an outage)."""


class ShutdownDuringOutage(RuntimeError):
    """Asked to stop while an outage kept the batch from finishing; nothing was committed."""


@dataclasses.dataclass
class IngestSettings:
    bootstrap: str
    topic: str
    group: str
    collection: str
    alias: str | None = "images"          # created for this collection when absent
    dlq: str | None = None                # default <topic>.dlq
    batch_size: int = 256
    batch_ms: int = 500
    max_poll_interval_ms: int = 600_000
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0
    stop_grace_s: float = 30.0
    exit_when_idle_s: float | None = None  # exit after this long without records (backfills, tests)
    create_topics: bool = True
    partitions: int = 3                   # when this consumer creates the topic
    client_id: str = "vsearch-ingest"
    # The model that builds the collection (``{"model", "version", "embedder_url"}``), recorded
    # in the collection when this consumer creates it (search resolves collection -> model).
    record: dict | None = None
    dlq_max_bytes: int = 900_000          # a dead-letter value larger than this is cut (a header says so)
    unknown_error_attempts: int = 3       # a Milvus error of no known kind: tries before it counts as a refusal

    @property
    def dlq_topic(self) -> str:
        return self.dlq or dlq_topic(self.topic)


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
    dead: list                            # (record, stage, reason) to dead-letter
    size: int
    started: float
    versions: dict[str, int]              # id -> ts this batch writes (for the next batch's check)
    sources: dict[str, object]            # id -> the record whose event this batch writes
    committed_in_rebalance: dict = dataclasses.field(default_factory=dict)   # tp -> offset


def _outages() -> tuple[type[BaseException], ...]:
    """What is retried with backoff: the broker, Milvus or the embedder being away. A Milvus
    error that is neither an outage nor a refusal of the request is retried too (it may pass);
    a refusal (``StoreRefused``, a ``ValueError``) is not."""
    from kafka.errors import KafkaError
    return (ConnectionError, TimeoutError, StoreUnavailable, KafkaError)


def _tp(rec):
    from kafka.structs import TopicPartition
    return TopicPartition(rec.topic, rec.partition)


def _rebalance_listener(ingest: "IngestConsumer"):
    """The group's rebalance callbacks. kafka-python runs them on its IO loop, so they are
    coroutines: waiting for the writer and committing never block the heartbeats."""
    from kafka import AsyncConsumerRebalanceListener

    class Rebalance(AsyncConsumerRebalanceListener):
        async def on_partitions_revoked(self, revoked):
            await ingest._on_revoked(set(revoked))

        async def on_partitions_assigned(self, assigned):
            log.info("partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))

        async def on_partitions_lost(self, lost):
            # Evicted: the partitions are someone else's already; commit nothing for them.
            log.warning("partitions lost (evicted from the group): %s",
                        sorted(f"{tp.topic}[{tp.partition}]" for tp in lost))
            ingest._drop_polled(set(lost))

    return Rebalance()


class IngestConsumer:
    """One consumer process. ``embedder`` has ``dim`` and either ``try_preprocess`` +
    ``embed_arrays`` (:class:`vsearch.predictor.model.Embedder`) or ``embed_bytes``
    (:class:`vsearch.predictor.client.EmbedderClient`); ``store`` is a
    :class:`vsearch.core.store.MilvusStore`."""

    def __init__(self, settings: IngestSettings, embedder, store, fetcher: Fetcher | None = None):
        self.s = settings
        self.embedder = embedder
        self.store = store
        self.fetcher = fetcher or Fetcher()
        self._stop = threading.Event()
        self._stop_deadline: float | None = None
        self._consumer = None
        self._producer = None
        self._outages = _outages()
        self._pending = None                  # (future, prepared batch) being written
        self._collecting: list = []           # records polled for the next batch

    # --- lifecycle -----------------------------------------------------------------------

    def request_stop(self, *_args) -> None:
        if not self._stop.is_set():
            log.info("stop requested: finishing the batch in hand, then committing and exiting")
            self._stop_deadline = time.monotonic() + self.s.stop_grace_s
            self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def prepare(self) -> None:
        """Collection, alias and topics; retried while Milvus or the broker are down."""
        if self.s.record:
            created = self._retry("ensure collection", lambda: self.store.ensure_model_collection(
                self.s.collection, int(self.embedder.dim), self.s.record))
        else:
            created = self._retry("ensure collection",
                                  lambda: self.store.ensure_collection(self.s.collection, int(self.embedder.dim)))
        log.info("collection %s %s (dim %d)", self.s.collection, "created" if created else "exists",
                 self.embedder.dim)
        if self.s.alias:
            if self._retry("ensure alias", lambda: self.store.ensure_alias(self.s.alias, self.s.collection)):
                log.info("alias %s created for %s (the first model version serves)", self.s.alias,
                         self.s.collection)
        if self.s.create_topics:
            self._retry("create topics", lambda: ensure_topics(
                self.s.bootstrap, {self.s.topic: self.s.partitions, self.s.dlq_topic: 1},
                compact={self.s.topic}))

    def _connect(self):
        from kafka import KafkaConsumer
        if self._consumer is None:
            def connect():
                consumer = KafkaConsumer(
                    bootstrap_servers=self.s.bootstrap, group_id=self.s.group,
                    client_id=self.s.client_id, enable_auto_commit=False, auto_offset_reset="earliest",
                    max_poll_records=self.s.batch_size, max_poll_interval_ms=self.s.max_poll_interval_ms,
                    **GROUP_SETTINGS)
                consumer.subscribe([self.s.topic], listener=_rebalance_listener(self))
                return consumer
            self._consumer = self._retry("connect consumer", connect)
        if self._producer is None:
            self._producer = self._retry("connect producer", lambda: producer(
                self.s.bootstrap, self.s.client_id + "-dlq",
                max_request_size=max(1_048_576, self.s.dlq_max_bytes + 128 * 1024)))

    # --- rebalances ----------------------------------------------------------------------

    def _drop_polled(self, partitions: set) -> None:
        before = len(self._collecting)
        self._collecting = [r for r in self._collecting if _tp(r) not in partitions]
        if before != len(self._collecting):
            log.info("dropped %d polled records of partitions given up; their next owner reads them "
                     "from the committed offsets", before - len(self._collecting))

    async def _on_revoked(self, revoked: set) -> None:
        """Before the group takes ``revoked`` away: records polled for the next batch from
        those partitions are dropped, and the batch being written is finished and committed
        while the partitions are still ours (for the revoked partitions only; the rest is
        committed as usual)."""
        log.info("partitions revoked: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))
        self._drop_polled(revoked)
        if self._pending is None:
            return
        future, prepared = self._pending
        coordinator = getattr(self._consumer, "_coordinator", None)
        net = getattr(getattr(coordinator, "_manager", None), "_net", None)
        commit = getattr(coordinator, "_commit_offsets_sync_async", None)
        if net is None or commit is None:        # another kafka-python: the new owner replays the batch
            log.warning("cannot commit inside the rebalance with this kafka-python; the batch in hand "
                        "will be replayed by the partitions' next owner (writes are idempotent)")
            return
        while not future.done():
            await net.sleep(0.05)
        if future.exception() is not None:
            return                                 # raised again where the batch is finished
        from kafka.structs import OffsetAndMetadata
        offsets = {tp: off for tp, off in future.result().offsets.items() if tp in revoked}
        if offsets:
            try:
                await commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
                prepared.committed_in_rebalance.update(offsets)
                LAST_COMMIT.set_to_current_time()
                log.info("committed the batch in hand for %d revoked partition(s) before giving them up",
                         len(offsets))
            except Exception as exc:  # noqa: BLE001  (the group moved on: the next owner replays it)
                log.warning("commit before the rebalance failed (%s); the next owner replays the batch", exc)

    def run(self) -> int:
        """Consume until stopped (or idle for ``exit_when_idle_s``); returns the exit code."""
        try:
            self.prepare()
            self._connect()
        except ShutdownDuringOutage:
            return 75
        except ValueError as exc:            # configuration that cannot work, e.g. another dim
            log.error("cannot start: %s", exc)
            self.close()
            return 2
        # Two stages: while the writer thread upserts batch N and dead-letters its bad records,
        # this thread polls, validates, fetches and embeds batch N+1. Batch N's offsets are
        # committed only once its writes are done; N+1's version check also counts N's
        # in-flight writes, so an event older than one of them is still ignored.
        writer = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        self._pending = None                              # (future, prepared batch)
        idle_since = time.monotonic()
        try:
            while not self._stop.is_set():
                batch = self._poll_batch()
                if not batch:
                    if self._pending is not None:
                        pending, self._pending = self._pending, None
                        self._finish(*pending)
                    if not self._consumer.assignment():
                        idle_since = time.monotonic()      # not idle: still joining the group
                    elif (self.s.exit_when_idle_s is not None
                            and time.monotonic() - idle_since >= self.s.exit_when_idle_s):
                        log.info("no records for %.1fs: exiting", self.s.exit_when_idle_s)
                        break
                    continue
                prepared = self.prepare_batch(batch, self._pending[1].versions if self._pending else None)
                if self._pending is not None:
                    pending, self._pending = self._pending, None
                    self._finish(*pending)
                self._pending = (writer.submit(self.write_batch, prepared), prepared)
                idle_since = time.monotonic()
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self._finish(*pending)
        except ShutdownDuringOutage as exc:
            log.error("%s", exc)
            return 75
        finally:
            writer.shutdown(wait=True)
            self.close()
        return 0

    def _finish(self, future, prepared: "PreparedBatch") -> None:
        """Wait for a batch's writes, then commit its offsets (those of partitions still
        assigned here and not committed already during a rebalance)."""
        result = future.result()
        self._commit({tp: off for tp, off in result.offsets.items()
                      if prepared.committed_in_rebalance.get(tp) != off})
        BATCH_SECONDS.observe(time.monotonic() - prepared.started)
        log.info("batch of %d: %d written, %d deleted, %d stale, %d superseded, %d dead-lettered "
                 "in %.2fs", prepared.size, result.written, result.deleted, result.stale,
                 result.superseded, result.dead, time.monotonic() - prepared.started)

    def close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close(autocommit=False)
            except Exception as exc:  # noqa: BLE001
                log.warning("closing the consumer: %s", exc)
            self._consumer = None
        if self._producer is not None:
            try:
                self._producer.close(timeout=5)
            except Exception as exc:  # noqa: BLE001
                log.warning("closing the producer: %s", exc)
            self._producer = None
        self.fetcher.close()

    # --- Kafka ---------------------------------------------------------------------------

    def _poll_batch(self) -> list:
        """Up to ``batch_size`` records, waiting at most ``batch_ms`` after the first one. A
        rebalance during the poll may drop records of revoked partitions (:meth:`_on_revoked`).
        Errors of the broker (or of a record batch the client cannot read) are retried."""
        self._collecting = []
        first = None
        while len(self._collecting) < self.s.batch_size and not self._stop.is_set():
            wait = self.s.batch_ms if first is None else self.s.batch_ms - (time.monotonic() - first) * 1000
            if wait <= 0:
                break
            want = self.s.batch_size - len(self._collecting)
            polled = self._retry("poll", lambda w=int(wait), n=want: self._consumer.poll(timeout_ms=w, max_records=n))
            got = [r for recs in polled.values() for r in recs]
            if got:
                self._collecting += got
                first = first or time.monotonic()
            elif first is None:
                break                      # nothing within batch_ms: let the caller check stop/idle
        records, self._collecting = self._collecting, []
        return records

    def _commit(self, offsets: dict) -> None:
        from kafka.errors import CommitFailedError
        from kafka.structs import OffsetAndMetadata
        owned = self._consumer.assignment()
        lost = [tp for tp in offsets if tp not in owned]
        if lost:
            log.warning("not committing %d partition(s) no longer assigned here: %s", len(lost),
                        sorted(f"{tp.topic}[{tp.partition}]" for tp in lost))
        offsets = {tp: off for tp, off in offsets.items() if tp in owned}
        if not offsets:
            return
        commit = {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}
        try:
            self._retry("commit", lambda: self._consumer.commit(commit))
        except CommitFailedError as exc:
            # The group rebalanced while this batch was in hand: the new owner replays it (the
            # writes are idempotent), so nothing is lost.
            log.warning("commit refused after a rebalance; the batch will be replayed: %s", exc)
            return
        LAST_COMMIT.set_to_current_time()

    def _dlq_record(self, rec, stage: str, reason: str, minimal: bool = False):
        """``(key, value, headers)`` of the dead-letter record for ``rec``: the original key,
        value and headers, sanitised so that the producer always takes them (header keys as
        text, values as bytes, null values as empty; a null key and a null value become an
        empty value with ``dlq.value_null``), cut to fit (a value over ``dlq_max_bytes`` is
        truncated, ``dlq.truncated`` and ``dlq.value_bytes`` say so), plus ``dlq.reason``,
        ``dlq.stage``, ``dlq.topic``, ``dlq.partition``, ``dlq.offset``, ``dlq.timestamp``.
        ``minimal``: the value and original headers left out (a broker refused the record)."""
        limit = max(1024, int(self.s.dlq_max_bytes))
        key = _as_bytes(rec.key)
        value = _as_bytes(rec.value)
        extra: list[tuple[str, bytes]] = []
        if key is not None and len(key) > MAX_DLQ_KEY:
            extra.append(("dlq.key_bytes", str(len(key)).encode()))
            key = key[:MAX_DLQ_KEY]
        if value is None and key is None:
            value = b""
            extra.append(("dlq.value_null", b"true"))
        if value is not None and (minimal or len(value) > limit):
            extra += [("dlq.truncated", b"value-dropped" if minimal else b"value"),
                      ("dlq.value_bytes", str(len(value)).encode()),
                      ("dlq.value_sha256", hashlib.sha256(value).hexdigest().encode())]
            value = b"" if minimal else value[:limit]
        headers: list[tuple[str, bytes]] = []
        budget = MAX_DLQ_HEADER_BYTES
        dropped = 0
        for item in ([] if minimal else list(rec.headers or [])):
            try:
                hk, hv = item
            except (TypeError, ValueError):
                dropped += 1
                continue
            hk = _as_text(hk)[:256]
            hv = _as_bytes(hv) or b""
            if len(hv) > MAX_DLQ_HEADER_VALUE:
                hv = hv[:MAX_DLQ_HEADER_VALUE]
                extra.append(("dlq.truncated_header", hk.encode("utf-8", "backslashreplace")[:256]))
            if len(hk) + len(hv) > budget:
                dropped += 1
                continue
            budget -= len(hk) + len(hv)
            headers.append((hk, hv))
        if dropped:
            extra.append(("dlq.headers_dropped", str(dropped).encode()))
        headers += extra + [
            ("dlq.reason", _as_text(reason).encode("utf-8", "backslashreplace")[:4000]),
            ("dlq.stage", stage.encode()), ("dlq.topic", _as_text(rec.topic).encode("utf-8", "backslashreplace")),
            ("dlq.partition", str(rec.partition).encode()), ("dlq.offset", str(rec.offset).encode()),
            ("dlq.timestamp", str(int(time.time() * 1000)).encode())]
        return key, value, headers

    def _dead_letter(self, dead: list[tuple[object, str, str]]) -> None:
        """Send the bad records to the dead-letter topic (see :meth:`_dlq_record`) and wait for
        the broker's acknowledgement of each. A record the producer or the broker refuses for
        its size is sent again without its value and original headers; only outages of the
        broker are retried."""
        from kafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError
        too_large = (MessageSizeTooLargeError, RecordListTooLargeError)
        pending = [(rec, stage, reason, False) for rec, stage, reason in dead]

        def shrink(item, failed):
            if item[3]:
                log.error("the broker refuses even the minimal dead-letter record of %s[%s]@%s; "
                          "it is logged here instead: stage %s, reason %s", item[0].topic,
                          item[0].partition, item[0].offset, item[1], item[2][:500])
            else:
                failed.append((*item[:3], True))

        def attempt():
            nonlocal pending
            sent, failed, last = [], [], None
            for item in pending:
                rec, stage, reason, minimal = item
                key, value, headers = self._dlq_record(rec, stage, reason, minimal)
                try:
                    sent.append((item, self._producer.send(self.s.dlq_topic, key=key, value=value,
                                                           headers=headers)))
                except too_large:
                    shrink(item, failed)
            self._producer.flush(timeout=10)
            for item, fut in sent:
                try:
                    fut.get(timeout=10)
                except too_large:
                    shrink(item, failed)
                except KafkaError as exc:
                    failed.append(item)
                    last = exc
            retry_now = [f for f in failed if f[3]]
            pending = failed
            if last is not None:
                raise last
            if retry_now:
                raise _Resend(f"{len(retry_now)} dead-letter record(s) too large for the broker: "
                              "sending them without their value")

        while pending:
            try:
                self._retry("dead-letter", attempt)
            except _Resend as exc:
                log.warning("%s", exc)
        DEAD.inc(len(dead))

    # --- one batch -----------------------------------------------------------------------

    def prepare_batch(self, records: Sequence, in_flight: dict[str, int] | None = None) -> "PreparedBatch":
        """Everything before the writes: validate, version check, fetch, embed, newest per id.
        ``in_flight``: ``{id: ts}`` of writes not yet finished (they count as stored)."""
        started = time.monotonic()
        offsets: dict = {}
        for r in records:
            tp = _tp(r)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        result = BatchResult(offsets=offsets)
        dead: list[tuple[object, str, str]] = []

        events: list[tuple[int, object, CatalogEvent]] = []       # (position, record, event)
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

        ids = list(dict.fromkeys(ev.id for _, _, ev in events))
        refused: dict[str, str] = {}
        stored = self._versions(ids, refused)
        if refused:                            # ids Milvus cannot look up: dead-lettered, not retried
            for _pos, rec, ev in events:
                if ev.id in refused:
                    dead.append((rec, "validate", f"Milvus cannot look up this id: {refused[ev.id]}"))
                    FAILED.labels("validate").inc()
            events = [e for e in events if e[2].id not in refused]
        for i, ts in (in_flight or {}).items():
            stored[i] = max(stored.get(i, ts), ts)
        live = []
        for pos, rec, ev in events:
            if ev.ts < stored.get(ev.id, -1):
                result.stale += 1
                EVENTS.labels(ev.op, "stale").inc()
            else:
                live.append((pos, rec, ev))

        vectors = self._images_and_vectors(live, dead)

        # newest valid event per id (ties: later in the log)
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
        return PreparedBatch(result=result, rows=rows, deletes=deletes, dead=dead, size=len(records),
                             started=started, versions={i: k[0] for i, (k, _) in winners.items()},
                             sources={i: record_at[k[1]] for i, (k, _) in winners.items()})

    def _versions(self, ids: list[str], refused: dict[str, str]) -> dict[str, int]:
        """``store.versions`` of ``ids`` (retried through outages); when Milvus refuses the
        lookup itself, the ids are split until the refused ones are found (into ``refused``)."""
        if not ids:
            return {}
        try:
            return self._retry("read versions", lambda: self.store.versions(self.s.collection, ids),
                               unknown_attempts=self.s.unknown_error_attempts)
        except (ValueError, StoreError) as exc:                   # StoreRefused included
            if isinstance(exc, StoreUnavailable):
                raise
            if len(ids) == 1:
                refused[ids[0]] = str(exc)[:500]
                return {}
            mid = len(ids) // 2
            return {**self._versions(ids[:mid], refused), **self._versions(ids[mid:], refused)}

    def _current(self, p: "PreparedBatch") -> "PreparedBatch":
        """The batch less what became stale while it was prepared: the stored versions are read
        again right before the write, so that an older write from a previous owner of the
        partition (a rebalance) cannot overwrite a newer one (a delete stays a delete, a
        public -> private change stays)."""
        ids = [r["id"] for r in p.rows] + list(p.deletes)
        if not ids:
            return p
        stored = self._versions(list(dict.fromkeys(ids)), {})
        rows = [r for r in p.rows if r["updated_at"] >= stored.get(r["id"], -1)]
        deletes = {i: ts for i, ts in p.deletes.items() if ts >= stored.get(i, -1)}
        stale = len(p.rows) - len(rows) + len(p.deletes) - len(deletes)
        if stale:
            log.info("%d write(s) of this batch were overtaken by newer ones since it was read: skipped", stale)
            p.result.stale += stale
            EVENTS.labels("upsert", "stale").inc(len(p.rows) - len(rows))
            EVENTS.labels("delete", "stale").inc(len(p.deletes) - len(deletes))
        return dataclasses.replace(p, rows=rows, deletes=deletes)

    def write_batch(self, p: "PreparedBatch") -> BatchResult:
        """Upsert and delete in Milvus, then dead-letter; returns the result with the offsets."""
        started = time.monotonic()
        refused: list[tuple[str, str]] = []                       # (id, Milvus' reason)
        coll = self.s.collection
        p = self._current(p)
        written = self._write(p.rows, lambda rows: self.store.upsert(coll, rows), "upsert",
                              lambda row: row["id"], refused)
        deleted = self._write(list(p.deletes.items()), lambda items: self.store.delete(coll, dict(items)),
                              "delete", lambda item: item[0], refused)
        WRITE_SECONDS.observe(time.monotonic() - started)
        dead = p.dead + [(p.sources[i], "write", f"Milvus refused the write: {reason}") for i, reason in refused]
        result = p.result
        result.written, result.deleted = written, deleted
        EVENTS.labels("upsert", "written").inc(written)
        EVENTS.labels("delete", "written").inc(deleted)
        self._dead_letter(dead)
        result.dead = len(dead)
        return result

    def _write(self, items: list, write: Callable, stage: str, key: Callable, refused: list) -> int:
        """``write(items)``, retried through outages. A refusal of the request (``StoreRefused``
        or the store's own ``ValueError``) splits the items in halves until the refused ones
        are found; those go to ``refused``. Returns how many were written."""
        if not items:
            return 0
        try:
            self._retry(stage, lambda: write(items), unknown_attempts=self.s.unknown_error_attempts)
            return len(items)
        except (ValueError, TypeError, StoreError) as exc:        # StoreRefused included
            if isinstance(exc, StoreUnavailable):
                raise
            if len(items) == 1:
                refused.append((key(items[0]), str(exc)[:1000]))
                FAILED.labels("write").inc()
                log.warning("Milvus refused to %s %r: %s", stage, key(items[0]), str(exc)[:300])
                return 0
            mid = len(items) // 2
            return (self._write(items[:mid], write, stage, key, refused)
                    + self._write(items[mid:], write, stage, key, refused))

    def _images_and_vectors(self, live, dead) -> dict[int, np.ndarray]:
        """Fetch and embed the upserts in ``live``: ``{position: vector}``; failures go to ``dead``."""
        ups = [(pos, rec, ev) for pos, rec, ev in live if ev.op == "upsert"]
        if not ups:
            return {}
        started = time.monotonic()
        to_fetch = [item for item in ups if item[2].image is None]
        distinct = list(dict.fromkeys(ev.uri for _, _, ev in to_fetch))   # same URI: fetched once
        by_uri = dict(zip(distinct, self.fetcher.fetch_many(distinct)))
        fetched = [by_uri[ev.uri] for _, _, ev in to_fetch]
        blobs: dict[int, bytes] = {pos: ev.image for pos, _, ev in ups if ev.image is not None}
        for (pos, rec, _ev), got in zip(to_fetch, fetched):
            if isinstance(got, FetchError):
                dead.append((rec, "fetch", f"image fetch failed: {got}"))
                FAILED.labels("fetch").inc()
            else:
                blobs[pos] = got
        FETCH_SECONDS.observe(time.monotonic() - started)

        # identical bytes (re-uploads) are embedded once
        by_hash: dict[str, list[int]] = {}
        for pos, blob in blobs.items():
            by_hash.setdefault(hashlib.sha1(blob).hexdigest(), []).append(pos)
        unique = [(h, blobs[p[0]]) for h, p in by_hash.items()]
        started = time.monotonic()
        outcome = self._retry("embed", lambda: self._embed([b for _, b in unique]))
        EMBED_SECONDS.observe(time.monotonic() - started)
        record_of = {pos: rec for pos, rec, _ in ups}
        vectors: dict[int, np.ndarray] = {}
        for (h, _), got in zip(unique, outcome):
            for pos in by_hash[h]:
                if isinstance(got, Exception):
                    dead.append((record_of[pos], "decode", f"image cannot be used: {got}"))
                    FAILED.labels("decode").inc()
                elif not np.all(np.isfinite(got)):
                    dead.append((record_of[pos], "embed", "the model produced a non-finite embedding "
                                                          "for this image"))
                    FAILED.labels("embed").inc()
                else:
                    vectors[pos] = got
        return vectors

    def _embed(self, blobs: list[bytes]) -> list:
        """One item per blob: its vector, or the InvalidImage saying why it cannot be embedded."""
        if not blobs:
            return []
        if hasattr(self.embedder, "try_preprocess"):
            arrays = self.embedder.try_preprocess(blobs)
            ok = [i for i, a in enumerate(arrays) if not isinstance(a, Exception)]
            out: list = list(arrays)
            if ok:
                vecs = self._isolated(lambda idx: self.embedder.embed_arrays(np.stack([arrays[i] for i in idx])), ok)
                for i, v in zip(ok, vecs):
                    out[i] = v
            return out
        return self._isolated(lambda idx: self.embedder.embed_bytes([blobs[i] for i in idx]), list(range(len(blobs))))

    def _isolated(self, embed: Callable[[list[int]], Sequence], idx: list[int]) -> list:
        """``embed(idx)`` for the items ``idx``: their vectors; when it fails for a reason that
        is not an outage, the items are split until each failure is one item's (an
        ``InvalidImage`` in its place). Outages propagate (and are retried by the caller)."""
        try:
            return list(embed(idx))
        except self._outages:
            raise
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  (InvalidImage, or whatever the model raised for one image)
            if len(idx) == 1:
                return [exc if isinstance(exc, InvalidImage)
                        else InvalidImage(f"embedding failed: {type(exc).__name__}: {str(exc)[:300]}")]
        mid = len(idx) // 2
        return self._isolated(embed, idx[:mid]) + self._isolated(embed, idx[mid:])

    # --- retries -------------------------------------------------------------------------

    def _retry(self, stage: str, fn: Callable, unknown_attempts: int | None = None):
        """Call ``fn`` until it succeeds, backing off on outages. Gives up (raising
        :class:`ShutdownDuringOutage`) only when a stop was requested and the grace period is
        over. A Milvus error of no known kind (neither an outage nor a refusal) is tried
        ``unknown_attempts`` times (None: like an outage), then raised."""
        from kafka.errors import CommitFailedError
        delay = self.s.retry_initial_s
        unknown = 0
        while True:
            try:
                return fn()
            except (CommitFailedError, InvalidImage, StoreRefused):
                raise
            except (*self._outages, StoreError) as exc:
                if isinstance(exc, StoreError) and not isinstance(exc, StoreUnavailable):
                    unknown += 1
                    if unknown_attempts is not None and unknown >= unknown_attempts:
                        raise
                RETRIES.labels(stage).inc()
                if self._stop.is_set() and time.monotonic() >= (self._stop_deadline or 0):
                    raise ShutdownDuringOutage(f"stopping during an outage at {stage}: {exc}; "
                                               "nothing committed, the batch will be replayed") from exc
                log.warning("%s failed (%s: %s); retrying in %.1fs", stage, type(exc).__name__,
                            str(exc)[:300], delay)
                if self._stop.is_set():
                    time.sleep(min(delay, 1.0))
                else:
                    self._stop.wait(delay)
                delay = min(delay * 2, self.s.retry_max_s)
