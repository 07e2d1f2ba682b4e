"""What the rollout's ``Experimenting`` phase (:mod:`vsearch.operators.rollout`) reads and says:
the search events of the topic (:class:`TopicEvents`, the :class:`~vsearch.operators.rollout.ReadsEvents`
of the cluster and of local runs), the analysis' policy from the spec (:func:`stats_policy`) and
the one-line summary of a look's figures (:func:`summary`).

Counting exactly once: every look re-reads the topic from its beginning (no consumer group, no
committed offsets, as :func:`vsearch.core.search_events.read_all`) and the analysis counts through
:func:`vsearch.core.search_events.count_clicks` (an impression once per query id, a click once per
query and item), so a look repeated after an operator crash counts the same events the same way:
nothing in the status is added to, every figure is recomputed from the log. The price is a read
of the whole topic per look (the topic's retention bounds it; seconds for a few hundred thousand
events); an experiment's status never holds partial counts that a crash could lose or repeat."""

from __future__ import annotations

import logging
import threading
import time

from kafka import KafkaConsumer, TopicPartition

from ..core.experiment_stats import Policy as StatsPolicy
from ..core.search_events import decode_message
from .spec import Experiment

log = logging.getLogger(__name__)

# status.experiment fields the rollout owns; the rest of a look's analysis is stored as it comes
OWN = ("id", "design", "share", "salt", "candidate", "serving", "servingCollection", "candidateCollection", "started",
       "startedAt", "propertyWritten", "skipped", "looks", "lookedAt", "events", "timedOut", "decidedAt", "endedAt")


class TopicEvents:
    """The search events of a topic from its beginning, up to the moment of the call, decoded
    (:func:`vsearch.core.search_events.decode`; a :class:`~vsearch.core.search_events.BadSearchEvent`
    for a record that is not one). A partition is read until its first record written after the
    call began (by the record's timestamp; that record is left for the next look) or until no
    record came for ``idle_s``, so a topic the search services never stop writing still ends
    (no end offsets: Tansu reports them wrongly); ``max_s`` bounds a read whatever happens. What
    one look reads is a prefix of every partition: counted once, the next look reads further.
    One consumer per bootstrap is kept between looks (no group, nothing committed; a read seeks
    to the beginning), one read at a time on it; :meth:`close` closes them."""

    def __init__(self, *, idle_s: float = 1.0, max_s: float = 120.0):
        self.idle_s, self.max_s = idle_s, max_s
        self._consumers: dict[str, tuple[KafkaConsumer, threading.Lock]] = {}
        self._lock = threading.Lock()

    def _consumer(self, bootstrap: str) -> tuple[KafkaConsumer, threading.Lock]:
        with self._lock:
            if bootstrap not in self._consumers:
                self._consumers[bootstrap] = (KafkaConsumer(
                    bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                    auto_offset_reset="earliest", client_id="vsearch-operator-experiment",
                    request_timeout_ms=30_000), threading.Lock())
            return self._consumers[bootstrap]

    def read(self, bootstrap: str, topic: str) -> list:
        until_ms = int(time.time() * 1000)
        consumer, lock = self._consumer(bootstrap)
        with lock:
            try:
                return self._read(consumer, topic, until_ms)
            except Exception:
                with self._lock:                  # a broken consumer is not kept
                    self._consumers.pop(bootstrap, None)
                consumer.close()
                raise

    def _read(self, consumer: KafkaConsumer, topic: str, until_ms: int) -> list:
        out: list = []
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            return []                             # no search yet made the topic: no events
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.resume(*tps)
        consumer.seek_to_beginning(*tps)
        done: set = set()
        start = last = time.monotonic()
        while time.monotonic() - last < self.idle_s and len(done) < len(tps):
            if time.monotonic() - start > self.max_s:
                log.info("%s: a look stops after %.0fs with the %d events read", topic, self.max_s, len(out))
                break
            batch = consumer.poll(timeout_ms=200)
            if batch:
                last = time.monotonic()
            for tp, msgs in batch.items():
                if tp in done:
                    continue
                for m in msgs:
                    if m.timestamp is not None and m.timestamp > until_ms:
                        done.add(tp)              # written after the look began: the next look's
                        consumer.pause(tp)
                        break
                    out.append(decode_message(m))
        return out

    def close(self) -> None:
        with self._lock:
            consumers, self._consumers = list(self._consumers.values()), {}
        for consumer, _ in consumers:
            consumer.close()


def stats_policy(x: Experiment) -> StatsPolicy:
    """``spec.rollout.experiment`` as the analysis' policy (:class:`vsearch.core.experiment_stats.Policy`)."""
    return StatsPolicy(alpha=x.alpha, margin=x.margin, promote_when=x.promote_when, min_units=x.min_units,
                       max_errors_ratio=x.max_error_ratio, max_p99_ratio=x.max_p99_ratio, on_timeout=x.on_timeout)


def _ctr(arm: dict | None) -> str:
    if not arm:
        return "no figures"
    ci = arm.get("ctrInterval")
    ctr = arm.get("ctr")
    text = f"CTR {ctr:.4f}" if isinstance(ctr, (int, float)) else "CTR -"
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        text += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
    return (text + f" ({arm.get('clicks', 0)} clicks / {arm.get('impressions', 0)} impressions, "
            f"{arm.get('units', 0)} units)")


def summary(e: dict) -> str:
    """A look's figures in a line: each arm's CTR with its interval, the interleaving preference."""
    arms = e.get("arms") or {}
    parts = [f"serving {_ctr(arms.get('serving'))}", f"candidate {_ctr(arms.get('candidate'))}"]
    il = e.get("interleave") or {}
    if il:
        pref, ci = il.get("preference"), il.get("interval")
        parts.append(f"interleaving wins/losses/ties {il.get('wins')}/{il.get('losses')}/{il.get('ties')}"
                     + (f", preference {pref:.3f}" if isinstance(pref, (int, float)) else "")
                     + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2
                        and all(isinstance(v, (int, float)) for v in ci) else ""))
    return "; ".join(parts)
