"""The stored versions the consumer knows without a Strong read of Milvus.

The ordering rule (an event older than what is stored for its id is ignored) needs the stored
version of every id in a batch. A Strong read waits until Milvus has applied every write up to
now (about 200-400 ms on a server, whatever the batch size), which bounds a consumer to a few
batches a second. The consumer knows most of it already:

- Keyed events (key = id, the catalog contract: the compacted topic refuses records without
  a key on Kafka, and the default partitioner maps a key to one partition): all events of an
  id are in one partition, and while this consumer owns that partition it is the only writer
  of the id. So what it read or wrote for the id since it got the partition is still what
  Milvus holds: a cache entry is ``(partition, ownership epoch, version)`` and counts only
  for an event of that partition while the epoch lasts. Any rebalance (revoked, lost or
  assigned partitions) starts a new epoch: nothing read before it is trusted after it.
- Ids it does not know: the previous owners of the partition finished their writes before the
  partition came here, so a read that sees every write up to any write of this consumer that
  began after the assignment (its Milvus timestamp, ``seen``) sees theirs too: no need to wait
  for the newest writes. That read may miss this consumer's own later writes, so those are
  kept here (``written``, whatever the event's key) until ``seen`` passes them, and never
  evicted before.
- Events without a key (or with the cache off, or before this consumer wrote anything since
  the last rebalance) are read Strong, as before.

The entries are kept in LRU order, at most ``size`` (plus writes not yet covered by ``seen``).
Everything here is guarded by one lock: the writer thread records its writes while the main
thread prepares the next batch; all updates keep the larger version, so their order does not
matter.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time

from .metrics import VERSION_LOOKUPS

SEEN_LAG_S = 1.0            # a write this old is visible in Milvus: reads at its timestamp do not wait


@dataclasses.dataclass
class _Entry:
    partition: object | None      # TopicPartition whose owner read/wrote it (None: an unkeyed write)
    epoch: int
    version: int                  # -1: nothing stored
    wrote_at: int = 0             # Milvus timestamp of this consumer's latest write of the id (0: none)


class VersionCache:
    """See the module docstring. ``size``: entries kept (LRU)."""

    def __init__(self, size: int):
        if size <= 0:
            raise ValueError("the version cache needs a positive size (0 turns it off in IngestSettings)")
        self.size = size
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._epochs: dict = {}                       # partition -> epoch
        self._counter = itertools.count(1)
        self._since = 0                               # Milvus ts of the last write seen before the last rebalance
        self._writes: collections.deque = collections.deque()   # (monotonic time, ts) since the last rebalance
        self._seen = 0                                # ts reads may use (0: read Strong)
        self._generation = 0                          # rebalances so far
        self._lock = threading.Lock()

    # --- ownership -----------------------------------------------------------------------

    def reset(self, partitions) -> None:
        """A rebalance gave or took ``partitions``: a new epoch for each, and reads are Strong
        again until this consumer writes after it."""
        with self._lock:
            self._generation += 1
            for tp in partitions:
                self._epochs[tp] = next(self._counter)
            self._since = max([self._since] + [ts for _, ts in self._writes])
            self._writes.clear()
            self._seen = 0

    def generation(self) -> int:
        """Counts rebalances: a write that began in another generation cannot stand for one
        that began after the last rebalance."""
        with self._lock:
            return self._generation

    def epochs(self, partitions) -> dict:
        """``{partition: epoch}`` now (a batch is prepared and written under these)."""
        with self._lock:
            return {tp: self._epoch(tp) for tp in partitions}

    def _epoch(self, tp) -> int:
        if tp not in self._epochs:
            self._epochs[tp] = next(self._counter)
        return self._epochs[tp]

    def owned_since(self, epochs: dict) -> set:
        """The partitions of ``epochs`` still in the same epoch (owned all along)."""
        with self._lock:
            return {tp for tp, e in epochs.items() if self._epochs.get(tp) == e}

    # --- reads ---------------------------------------------------------------------------

    def lookup(self, keyed: dict[str, object], others: list[str], epochs: dict
               ) -> tuple[dict[str, int], list[str], int, dict[str, int]]:
        """``keyed``: ``{id: partition}`` of keyed events; ``others``: ids to read Strong anyway.
        Returns (``{id: version}`` known, keyed ids to read, the ``seen`` timestamp to read them
        at (0: Strong), ``{id: version}`` this consumer wrote for the ids to read: a lower bound
        of what Milvus holds, which a read at ``seen`` may not show yet), all at one instant."""
        hits, misses = {}, []
        with self._lock:
            for i, tp in keyed.items():
                e = self._entries.get(i)
                if e is not None and e.partition == tp and e.epoch == epochs[tp] == self._epochs.get(tp):
                    hits[i] = e.version
                    self._entries.move_to_end(i)
                else:
                    misses.append(i)
            own = {i: e.version for i in misses + list(others)
                   if (e := self._entries.get(i)) is not None and e.wrote_at}
            seen = self._seen
        VERSION_LOOKUPS.labels("cache").inc(len(hits))
        return hits, misses, seen, own

    def remember_reads(self, read: dict[str, int], keyed: dict[str, object], epochs: dict) -> None:
        """Versions read for keyed ids (``{id: version}``, -1: nothing stored), kept for the
        epochs they were read in (nothing is kept for a partition that moved meanwhile)."""
        with self._lock:
            for i, version in read.items():
                tp = keyed[i]
                if self._epochs.get(tp) != epochs[tp]:
                    continue
                e = self._entries.get(i)
                if e is None:
                    self._entries[i] = _Entry(tp, epochs[tp], version)
                else:
                    if e.partition != tp or e.epoch != epochs[tp]:
                        e.partition, e.epoch = tp, epochs[tp]
                    e.version = max(e.version, version)
                    self._entries.move_to_end(i)
            self._evict()

    # --- writes --------------------------------------------------------------------------

    def remember_writes(self, written: dict[str, tuple[int, object | None]], epochs: dict, ts: int,
                        generation: int) -> None:
        """This consumer wrote ``{id: (version, partition or None for an unkeyed event)}``;
        ``ts``: the Milvus timestamp of that write (0: unknown), which began in ``generation``."""
        with self._lock:
            fresh = generation == self._generation and ts > max([self._since] + [t for _, t in self._writes])
            stamp = ts if fresh else (1 << 62)          # unknown: never treated as seen
            for i, (version, tp) in written.items():
                e = self._entries.get(i)
                valid = tp is not None and self._epochs.get(tp) == epochs.get(tp)
                if e is None:
                    e = self._entries[i] = _Entry(tp if valid else None, epochs.get(tp, 0) if valid else 0,
                                                  version)
                elif valid and (e.partition != tp or e.epoch != epochs[tp]):
                    # an entry of an older epoch: this write is all that is known now
                    e.partition, e.epoch, e.version = tp, epochs[tp], version
                e.version = max(e.version, version)
                e.wrote_at = stamp
                self._entries.move_to_end(i)
            if fresh:
                now = time.monotonic()
                self._writes.append((now, ts))
                old = [t for at, t in self._writes if now - at >= SEEN_LAG_S]
                self._seen = max(old) if old else (self._seen or self._writes[0][1])
                while len(self._writes) > 1 and now - self._writes[1][0] >= SEEN_LAG_S:
                    self._writes.popleft()
            self._evict()

    def _evict(self) -> None:
        """Oldest entries first, down to ``size``; a write ``seen`` does not cover stays (with
        Strong reads, ``seen`` 0, every finished write is covered)."""
        kept = 0
        while len(self._entries) > self.size and kept < len(self._entries):
            i, e = next(iter(self._entries.items()))
            if not e.wrote_at or not self._seen or e.wrote_at <= self._seen:
                del self._entries[i]
            else:                                   # a write the reads may not see yet
                self._entries.move_to_end(i)
                kept += 1

    def __len__(self) -> int:
        return len(self._entries)
