"""The catalog consumer: keeps one Milvus collection (one model version) equal to the catalog
topic, with nothing lost and nothing duplicated.

Loop: poll a batch (up to ``batch_size`` records or ``batch_ms`` after the first one) ->
validate each event -> read the stored version (``updated_at`` or delete time) of the batch's
ids (Strong, or what this consumer knows since it got the partition: :mod:`.versions`) and drop
events older than it -> fetch images (parallel, timeouts, retries) ->
embed (in process, or the embedder's V2 endpoint) -> for each id keep the newest valid event
(ties: the later in the log) -> upsert / delete in Milvus -> dead-letter the bad records to
``<topic>.dlq`` (original key, value and headers; the reason in headers) -> commit the
batch's offsets. Three stages overlap: while batch N is written (a writer thread), batch N+1
is embedded (an embedding thread) and batch N+2 is polled, validated, version-checked and its
images fetched; N is committed when its writes are done. A batch's version check counts the
writes still in flight (N's, and N+1's once it is planned) as stored.

Where the parts live: this module is the loop (poll, hand the batch to the writer, commit,
rebalances); :mod:`.batch` plans what a batch writes; :mod:`.deadletter` writes the dead-letter
records; :mod:`.retry` waits out outages; :mod:`.kafka_internals` holds the kafka-python
internals the rebalance handling needs (checked against the pinned version);
:func:`vsearch.core.bisection.bisect` finds the rows Milvus refuses.

Guarantees:
- Offsets are committed only after the Milvus writes and the dead-letter sends succeeded, so a
  crash at any point replays the batch; writes are idempotent upserts/deletes by id, so a
  replay leaves no duplicate (dead-letter records may repeat after a crash: at-least-once).
- Milvus, embedder and broker outages are retried with exponential backoff (no commit, no
  crash); the process stays up and catches up when they are back.
- A write Milvus refuses as invalid (:class:`~vsearch.core.store_errors.StoreRefused`, or a row the
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
import time
from concurrent import futures
from typing import Callable, Sequence

import numpy as np
from kafka import KafkaConsumer
from kafka.errors import CommitFailedError, RebalanceInProgressError
from kafka.structs import OffsetAndMetadata

from ..core.bisection import bisect
from ..core.fetch import Fetcher, FetchError
from ..core.kafka import GROUP_SETTINGS, ensure_topics
from ..core.naming import DEFAULT_ALIAS
from ..core.store import MilvusStore
from ..core.store_errors import StoreError, StoreUnavailable
from ..predictor.embedding import ImageEmbedder
from . import batch
from .batch import BatchResult, PreparedBatch
from .deadletter import Dead, DeadLetters
from .events import dlq_topic
from .kafka_internals import Rebalancing, listener, names, partition_of
from .metrics import (
    BATCH_SECONDS,
    EMBED_SECONDS,
    EVENTS,
    FAILED,
    FETCH_SECONDS,
    LAST_COMMIT,
    READ_SECONDS,
    VERSION_LOOKUPS,
    WRITE_SECONDS,
)
from .retry import Retrier, ShutdownDuringOutage
from .versions import VersionCache

log = logging.getLogger(__name__)

HANDOFF_MS = 20          # while a batch is being embedded, polls last at most this long (see _poll_batch)


@dataclasses.dataclass
class IngestSettings:
    bootstrap: str
    topic: str
    group: str
    collection: str
    alias: str | None = DEFAULT_ALIAS     # created for this collection when absent
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
    # ids whose stored version the consumer keeps between batches (:mod:`.versions`) instead of
    # a Strong read of every batch's ids; 0: a Strong read per batch (and again before the write)
    version_cache: int = 200_000

    @property
    def dlq_topic(self) -> str:
        return self.dlq or dlq_topic(self.topic)


def _write_refused(exc: BaseException) -> bool:
    """A write Milvus (or the store's own checks) refuses: dead-lettered, not retried."""
    return isinstance(exc, (ValueError, TypeError, StoreError)) and not isinstance(exc, StoreUnavailable)


def _lookup_refused(exc: BaseException) -> bool:
    """A version lookup Milvus refuses (an id it cannot look up)."""
    return isinstance(exc, (ValueError, StoreError)) and not isinstance(exc, StoreUnavailable)


class IngestConsumer:
    """One consumer process. ``embedder`` embeds in process or through the embedder's endpoint
    (:class:`~vsearch.predictor.embedding.ImageEmbedder`); ``store`` is a
    :class:`~vsearch.core.store.MilvusStore`."""

    def __init__(self, settings: IngestSettings, embedder: ImageEmbedder, store: MilvusStore,
                 fetcher: Fetcher | None = None):
        self.s = settings
        self.embedder = embedder
        self.store = store
        self.fetcher = fetcher or Fetcher()
        self.retry = Retrier(settings.retry_initial_s, settings.retry_max_s)
        self.dead_letters = DeadLetters(settings.bootstrap, settings.client_id + "-dlq", settings.dlq_topic,
                                        settings.dlq_max_bytes, self.retry)
        self._consumer: KafkaConsumer | None = None
        self._rebalancing: Rebalancing | None = None
        self._pending = None                  # (future, prepared batch) being written
        self._embedding: futures.Future | None = None   # the batch being embedded (-> PreparedBatch)
        self._deferred: dict = {}             # tp -> offset written but not committed (a rebalance was on)
        self.versions = VersionCache(settings.version_cache) if settings.version_cache > 0 else None

    # --- lifecycle -----------------------------------------------------------------------

    def request_stop(self, *_args) -> None:
        if self.retry.stop(self.s.stop_grace_s):
            log.info("stop requested: finishing the batch in hand, then committing and exiting")

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def prepare(self) -> None:
        """Collection, alias and topics; retried while Milvus or the broker are down."""
        dim = int(self.embedder.dim)
        if self.s.record:
            created = self.retry("ensure collection", lambda: self.store.ensure_model_collection(
                self.s.collection, dim, self.s.record))
        else:
            created = self.retry("ensure collection", lambda: self.store.ensure_collection(self.s.collection, dim))
        log.info("collection %s %s (dim %d)", self.s.collection, "created" if created else "exists", dim)
        if self.s.alias:
            if self.retry("ensure alias", lambda: self.store.ensure_alias(self.s.alias, self.s.collection)):
                log.info("alias %s created for %s (the first model version serves)", self.s.alias,
                         self.s.collection)
        if self.s.create_topics:
            self.retry("create topics", lambda: ensure_topics(
                self.s.bootstrap, {self.s.topic: self.s.partitions, self.s.dlq_topic: 1},
                compact={self.s.topic}))

    def _connect(self) -> None:
        if self._consumer is None:
            def connect():
                consumer = KafkaConsumer(
                    bootstrap_servers=self.s.bootstrap, group_id=self.s.group,
                    client_id=self.s.client_id, enable_auto_commit=False, auto_offset_reset="earliest",
                    max_poll_records=self.s.batch_size, max_poll_interval_ms=self.s.max_poll_interval_ms,
                    **GROUP_SETTINGS)
                consumer.subscribe([self.s.topic], listener=listener(self._on_revoked, self._on_lost,
                                                                     self._on_assigned))
                return consumer
            self._consumer = self.retry("connect consumer", connect)
            self._rebalancing = Rebalancing(self._consumer)
        self.dead_letters.connect()

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
        # Three stages (see the module's docstring): this thread polls, validates, reads the
        # stored versions and fetches the images of one batch while the embedding thread embeds
        # the previous one and the writer thread writes the one before that. A batch's offsets
        # are committed only once its writes are done.
        writer = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        embedding = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._pending = None                              # (future, prepared batch) being written
        self._embedding = None                            # future of the batch being embedded
        idle_since = time.monotonic()
        try:
            while not self.retry.stopped.is_set():
                records = self._poll_batch(writer)
                if not records:
                    self._advance(writer)                  # nothing new: write what is in hand ...
                    self._finish_pending()                 # ... and commit it
                    if not self._consumer.assignment():
                        idle_since = time.monotonic()      # not idle: still joining the group
                    elif (self.s.exit_when_idle_s is not None
                            and time.monotonic() - idle_since >= self.s.exit_when_idle_s):
                        log.info("no records for %.1fs: exiting", self.s.exit_when_idle_s)
                        break
                    continue
                fetched = self.fetch_batch(records, self._pending[1].versions if self._pending else None)
                in_flight = self._advance(writer)
                self._embedding = embedding.submit(self.embed_batch, fetched, in_flight)
                idle_since = time.monotonic()
            self._advance(writer)
            self._finish_pending()
            self._commit_deferred()
        except ShutdownDuringOutage as exc:
            log.error("%s", exc)
            return 75
        finally:
            embedding.shutdown(wait=True)
            writer.shutdown(wait=True)
            self.close()
        return 0

    def _advance(self, writer: futures.ThreadPoolExecutor) -> dict[str, int] | None:
        """The batch being embedded goes to the writer, once the batch written before it is
        done and committed. Returns its ``{id: ts}`` (in flight for the next batch's check)."""
        if self._embedding is None:
            return None
        embedded = self._embedding.result()
        self._finish_pending()
        # A rebalance while it was embedded (inside a poll on this thread) may have given some of
        # its partitions to another consumer: those records are theirs now. Partitions that came
        # back here keep their positions (kafka-python keeps the state of a partition assigned
        # before and after), so their records are written and committed here as usual.
        prepared = batch.without_partitions(embedded, set(embedded.result.offsets) - self._consumer.assignment())
        self._pending = (writer.submit(self.write_batch, prepared), prepared)
        self._embedding = None
        return prepared.versions

    def _finish_pending(self) -> None:
        """Wait for the writes of the batch in hand, then commit its offsets (those of
        partitions still assigned here and not committed already during a rebalance)."""
        if self._pending is None:
            return
        (future, prepared), self._pending = self._pending, None
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
        self.dead_letters.close()
        self.fetcher.close()

    # --- Kafka ---------------------------------------------------------------------------

    def _poll_batch(self, writer: futures.ThreadPoolExecutor) -> list:
        """Up to ``batch_size`` records, waiting at most ``batch_ms`` for the first one and
        ``batch_ms`` after it. Meanwhile a batch whose embedding finishes goes to ``writer`` at
        once (polls are cut into slices of ``HANDOFF_MS`` while one is being embedded), so a
        quiet topic does not hold a finished batch back for a whole ``batch_ms``. A rebalance
        during a poll drops the records polled before it of partitions it gave away. Errors of
        the broker (or of a record batch the client cannot read) are retried."""
        records: list = []
        begin, first = time.monotonic(), None
        while len(records) < self.s.batch_size and not self.retry.stopped.is_set():
            wait = self.s.batch_ms - (time.monotonic() - (first or begin)) * 1000
            if wait <= 0:
                break                      # full time after the first record, or none came
            if self._embedding is not None:
                if self._embedding.done():
                    self._advance(writer)
                else:
                    wait = min(wait, HANDOFF_MS)
            want = self.s.batch_size - len(records)
            polled = self.retry("poll", lambda w=max(1, int(wait)), n=want: self._consumer.poll(timeout_ms=w,
                                                                                             max_records=n))
            got = [r for recs in polled.values() for r in recs]
            records = self._assigned_only(records + got)   # a rebalance in that poll
            self._commit_deferred()
            if got:
                first = first or time.monotonic()
        return records

    def _commit_deferred(self) -> None:
        """Commit what a rebalance in progress kept :meth:`_commit` from committing, for the
        partitions still here (the revoke callback committed the others, or their new owner
        replays them)."""
        if not self._deferred:
            return
        deferred, self._deferred = self._deferred, {}
        self._commit({tp: off for tp, off in deferred.items() if tp in self._consumer.assignment()})

    def _commit(self, offsets: dict) -> None:
        owned = self._consumer.assignment()
        lost = [tp for tp in offsets if tp not in owned]
        if lost:
            log.warning("not committing %d partition(s) no longer assigned here: %s", len(lost), names(lost))
        offsets = {tp: off for tp, off in offsets.items() if tp in owned}
        if not offsets:
            return
        commit = {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}

        def attempt():
            try:
                self._consumer.commit(commit)
                return True
            except RebalanceInProgressError:
                return False

        try:
            if not self.retry("commit", attempt):
                # Only a poll completes the rebalance, so waiting here cannot help: these
                # offsets are committed after the next poll (partitions still here) or by the
                # revoke callback (partitions leaving), see _commit_deferred / _on_revoked.
                for tp, off in offsets.items():
                    self._deferred[tp] = max(off, self._deferred.get(tp, 0))
                log.info("a rebalance is in progress: committing %d partition(s) after it", len(offsets))
                return
        except CommitFailedError as exc:
            # The group rebalanced while this batch was in hand: the new owner replays it (the
            # writes are idempotent), so nothing is lost.
            log.warning("commit refused after a rebalance; the batch will be replayed: %s", exc)
            return
        LAST_COMMIT.set_to_current_time()

    # --- rebalances (run on kafka-python's IO loop) --------------------------------------

    def _assigned_only(self, records: list) -> list:
        """``records`` less those of partitions no longer assigned here (a rebalance inside the
        last poll gave them to another consumer, which reads them from the committed offsets).
        Records of partitions revoked and assigned here again are kept: kafka-python keeps the
        position of a partition assigned before and after a rebalance, so nobody would read
        them again."""
        owned = self._consumer.assignment()
        kept = [r for r in records if partition_of(r) in owned]
        if len(kept) != len(records):
            log.info("dropped %d polled records of partitions given to another consumer; it reads them "
                     "from the committed offsets", len(records) - len(kept))
        return kept

    def _forget(self, partitions: set) -> None:
        """What this consumer knows of the stored versions of ``partitions``' ids is not
        trusted after a rebalance (another consumer may write them meanwhile)."""
        if self.versions is not None:
            self.versions.reset(partitions)

    def _on_lost(self, lost: set) -> None:
        self._forget(lost)

    def _on_assigned(self, assigned: set) -> None:
        self._forget(assigned)

    async def _on_revoked(self, revoked: set) -> None:
        """Before the group takes ``revoked`` away: the batch being written is finished and
        committed while the partitions are still ours (for the revoked partitions only; the
        rest is committed as usual). Records polled or embedded of partitions that end up with
        another consumer are dropped after the rebalance (:meth:`_assigned_only`,
        :meth:`_advance`)."""
        log.info("partitions revoked: %s", names(revoked))
        self._forget(revoked)
        prepared, written = None, {}
        if self._pending is not None:
            future, prepared = self._pending
            while not future.done():
                await self._rebalancing.sleep(0.05)
            if future.exception() is not None:
                return                             # raised again where the batch is finished
            written = future.result().offsets
        # what is written of the revoked partitions: the batch in hand and what a rebalance in
        # progress kept from being committed earlier (_deferred), the later offset of the two
        offsets = {tp: max(written.get(tp, 0), self._deferred.get(tp, 0))
                   for tp in revoked if tp in written or tp in self._deferred}
        for tp in revoked:
            self._deferred.pop(tp, None)
        if offsets:
            try:
                await self._rebalancing.commit(offsets)
                if prepared is not None:
                    prepared.committed_in_rebalance.update(offsets)
                LAST_COMMIT.set_to_current_time()
                log.info("committed the batch in hand for %d revoked partition(s) before giving them up",
                         len(offsets))
            except Exception as exc:  # noqa: BLE001  (the group moved on: the next owner replays it)
                log.warning("commit before the rebalance failed (%s); the next owner replays the batch", exc)

    # --- one batch -----------------------------------------------------------------------

    def prepare_batch(self, records: Sequence, in_flight: dict[str, int] | None = None) -> PreparedBatch:
        """Everything before the writes (:mod:`.batch`): validate, version check, fetch, embed,
        newest per id. ``in_flight``: ``{id: ts}`` of writes not yet finished (they count as
        stored)."""
        return self.embed_batch(self.fetch_batch(records, in_flight))

    def fetch_batch(self, records: Sequence, in_flight: dict[str, int] | None = None) -> batch.FetchedBatch:
        """The first stage: validate, read the stored versions, drop what is older than them
        (or than ``in_flight``, ``{id: ts}`` of writes not finished yet), fetch the images."""
        started = time.monotonic()
        dead: list[Dead] = []
        result = BatchResult(offsets=batch.next_offsets(records))
        events = batch.decode_records(records, dead)
        refused: dict[str, str] = {}
        epochs = self.versions.epochs({partition_of(rec) for _, rec, _ in events}) if self.versions is not None else {}
        stored = self._stored_versions(events, epochs, refused)
        events = batch.without_unreadable_ids(events, refused, dead)
        for i, ts in (in_flight or {}).items():
            stored[i] = max(stored.get(i, ts), ts)
        live = batch.fresh_events(events, stored, result)
        return batch.FetchedBatch(result=result, live=live, blobs=self._fetch(live), dead=dead,
                                  size=len(records), started=started, epochs=epochs)

    def embed_batch(self, f: batch.FetchedBatch, in_flight: dict[str, int] | None = None) -> PreparedBatch:
        """The second stage: drop what the writes planned since the fetch (``in_flight``)
        made stale, embed, keep the newest event per id."""
        live = batch.fresh_events(f.live, in_flight, f.result) if in_flight else f.live
        vectors = self._embed(live, f.blobs, f.dead)
        return dataclasses.replace(batch.plan(live, vectors, f.result, f.dead, f.size, f.started), epochs=f.epochs)

    def _stored_versions(self, events: list, epochs: dict, refused: dict[str, str]) -> dict[str, int]:
        """``{id: stored version}`` of the events' ids. Without the version cache: one Strong
        read. With it (:mod:`.versions`): the ids of keyed events known since this consumer
        got their partition are not read; the other keyed ids are read up to this consumer's
        own write after the last rebalance (fast), raised to what it wrote since; events
        without a key (and everything until that first write) are read Strong."""
        ids = list(dict.fromkeys(ev.id for _, _, ev in events))
        if self.versions is None:
            return self._read(ids, refused, 0)
        keyed: dict[str, object] = {}
        strong: set[str] = set()
        for _, rec, ev in events:
            tp = partition_of(rec)
            if rec.key is None or keyed.setdefault(ev.id, tp) != tp:
                strong.add(ev.id)            # no key, or one id in two partitions: no owner to trust
        for i in strong:
            keyed.pop(i, None)
        others = [i for i in ids if i in strong]
        stored, misses, seen, own = self.versions.lookup(keyed, others, epochs)
        if seen:
            read = self._read(misses, refused, seen)
            read.update(self._read(others, refused, 0))
        else:
            read = self._read(misses + others, refused, 0)
        for i in misses + others:
            version = max(read.get(i, -1), own.get(i, -1))
            if version >= 0:
                stored[i] = version
        self.versions.remember_reads({i: stored.get(i, -1) for i in misses if i not in refused}, keyed, epochs)
        return stored

    def _read(self, ids: list[str], refused: dict[str, str], seen: int) -> dict[str, int]:
        if not ids:
            return {}
        kind = "seen" if seen else "strong"
        VERSION_LOOKUPS.labels(kind).inc(len(ids))
        started = time.monotonic()
        try:
            return self._versions(ids, refused, seen)
        finally:
            READ_SECONDS.labels(kind).observe(time.monotonic() - started)

    def write_batch(self, p: PreparedBatch) -> BatchResult:
        """Upsert and delete in Milvus, then dead-letter; returns the result with the offsets."""
        started = time.monotonic()
        coll = self.s.collection
        generation = self.versions.generation() if self.versions is not None else 0
        p = batch.drop_overtaken(p, self._versions(self._recheck(p), {}))
        refused: list[tuple[str, str]] = []                       # (id, Milvus' reason)
        written = self._write(p.rows, lambda rows: self.store.upsert(coll, rows), "upsert",
                              lambda row: row["id"], refused)
        deleted = self._write(list(p.deletes.items()), lambda items: self.store.delete(coll, dict(items)),
                              "delete", lambda item: item[0], refused)
        WRITE_SECONDS.observe(time.monotonic() - started)
        if self.versions is not None:
            bad = {i for i, _ in refused}
            done = {r["id"]: r["updated_at"] for r in p.rows if r["id"] not in bad}
            done.update({i: ts for i, ts in p.deletes.items() if i not in bad})
            self.versions.remember_writes(
                {i: (ts, partition_of(p.sources[i]) if p.sources[i].key is not None else None)
                 for i, ts in done.items()}, p.epochs, self.store.last_write_ts(coll), generation)
        dead = p.dead + [(p.sources[i], "write", f"Milvus refused the write: {reason}") for i, reason in refused]
        result = p.result
        result.written, result.deleted = written, deleted
        EVENTS.labels("upsert", "written").inc(written)
        EVENTS.labels("delete", "written").inc(deleted)
        self.dead_letters.send(dead)
        result.dead = len(dead)
        return result

    def _recheck(self, p: PreparedBatch) -> list[str]:
        """The ids a batch writes whose stored version is read again (Strong) right before the
        write, in case another owner wrote them since the batch was prepared: all of them
        without the version cache; with it, those of events without a key or of partitions
        that changed hands since (this consumer is the only writer of the others)."""
        ids = batch.written_ids(p)
        if self.versions is None:
            return ids
        owned = self.versions.owned_since(p.epochs)
        return [i for i in ids if p.sources[i].key is None or partition_of(p.sources[i]) not in owned]

    def _versions(self, ids: list[str], refused: dict[str, str], seen: int = 0) -> dict[str, int]:
        """``store.versions`` of ``ids`` (retried through outages; ``seen``: see
        :meth:`MilvusStore.get`); when Milvus refuses the lookup itself, the ids it refuses
        are found by bisection (into ``refused``)."""
        if not ids:
            return {}

        def lookup(chunk):
            return self.retry("read versions", lambda: self.store.versions(self.s.collection, chunk, seen=seen),
                              unknown_attempts=self.s.unknown_error_attempts)

        stored: dict[str, int] = {}
        for part in bisect(ids, lookup, _lookup_refused):
            if part.error is None:
                stored.update(part.result)
            else:
                refused[part.items[0]] = str(part.error)[:500]
        return stored

    def _write(self, items: list, write: Callable, stage: str, key: Callable, refused: list) -> int:
        """``write(items)``, retried through outages. The items of a refused request (a
        ``StoreRefused`` or the store's own ``ValueError``) are found by bisection; those go to
        ``refused``. Returns how many were written."""
        def attempt(chunk):
            return self.retry(stage, lambda: write(chunk), unknown_attempts=self.s.unknown_error_attempts)

        written = 0
        for part in bisect(items, attempt, _write_refused):
            if part.error is None:
                written += len(part.items)
                continue
            refused.append((key(part.items[0]), str(part.error)[:1000]))
            FAILED.labels("write").inc()
            log.warning("Milvus refused to %s %r: %s", stage, key(part.items[0]), str(part.error)[:300])
        return written

    def _fetch(self, live) -> dict:
        """The images of the upserts in ``live``: ``{position: bytes or FetchError}`` (inline
        images as they are; one URI is fetched once)."""
        ups = [(pos, ev) for pos, _rec, ev in live if ev.op == "upsert"]
        if not ups:
            return {}
        started = time.monotonic()
        distinct = list(dict.fromkeys(ev.uri for _, ev in ups if ev.image is None))
        by_uri = dict(zip(distinct, self.fetcher.fetch_many(distinct)))
        FETCH_SECONDS.observe(time.monotonic() - started)
        return {pos: ev.image if ev.image is not None else by_uri[ev.uri] for pos, ev in ups}

    def _embed(self, live, blobs: dict, dead) -> dict[int, np.ndarray]:
        """Embed the fetched images of the upserts in ``live``: ``{position: vector}``;
        failures (fetch, decode, a non-finite vector) go to ``dead``."""
        ups = [(pos, rec) for pos, rec, ev in live if ev.op == "upsert"]
        if not ups:
            return {}
        images: dict[int, bytes] = {}
        for pos, rec in ups:
            got = blobs[pos]
            if isinstance(got, FetchError):
                dead.append((rec, "fetch", f"image fetch failed: {got}"))
                FAILED.labels("fetch").inc()
            else:
                images[pos] = got

        # identical bytes (re-uploads) are embedded once
        by_hash: dict[str, list[int]] = {}
        for pos, blob in images.items():
            by_hash.setdefault(hashlib.sha1(blob).hexdigest(), []).append(pos)
        unique = [(h, images[p[0]]) for h, p in by_hash.items()]
        started = time.monotonic()
        outcome = self.retry("embed", lambda: self.embedder.embed_each([b for _, b in unique]))
        EMBED_SECONDS.observe(time.monotonic() - started)
        record_of = dict(ups)
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
