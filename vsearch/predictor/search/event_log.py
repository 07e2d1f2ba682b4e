"""Search events (impressions and clicks) to the Kafka topic ``search.events`` without ever
failing or slowing a search: a bounded buffer drained by a background sender."""

from __future__ import annotations

import collections
import logging
import threading
import time

from kafka.errors import KafkaError

from ...core import kafka, search_events
from .metrics import EVENTS_BUFFERED, EVENTS_DROPPED, EVENTS_FAILED, EVENTS_SENT

log = logging.getLogger(__name__)


class EventLog:
    """Search events to Kafka without ever failing or slowing a search.

    Records go into a bounded in-memory buffer; a background thread sends them (acks=all) and
    removes them only once Kafka acknowledged them; failures are logged, counted
    (``vsearch_search_events_send_failures_total``) and retried with exponential backoff. When
    the buffer is full the oldest record is dropped, logged and counted
    (``vsearch_search_events_dropped_total``): memory stays bounded while Kafka is down.

    One record can never stall the ones behind it: a record over ``max_record_bytes`` (under
    the producer's 1 MiB request limit) is dropped when it is emitted, and one Kafka refuses for
    good (a non-retriable error such as a broker's smaller size limit) is dropped when it is
    sent; both logged with the reason and counted (``reason="too_large"``, ``"refused"``).
    Only retriable failures put records back."""

    def __init__(self, bootstrap: str | None, topic: str = search_events.TOPIC,
                 max_buffer: int = 10_000, batch: int = 500, send_timeout: float = 10.0,
                 max_record_bytes: int = 900_000):
        self.bootstrap, self.topic = bootstrap, topic
        self.max_record_bytes = max_record_bytes
        self.max_buffer, self.batch, self.send_timeout = max_buffer, batch, send_timeout
        self._buf: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._inflight = 0
        self.sent = self.failures = self.dropped = 0
        self.last_error: str | None = None
        self._thread = None
        if bootstrap:
            self._thread = threading.Thread(target=self._run, name="search-events", daemon=True)
            self._thread.start()
        else:
            log.warning("no --bootstrap given: search events (impressions, clicks) are not logged")

    @property
    def enabled(self) -> bool:
        return self._thread is not None

    def emit(self, record: dict) -> None:
        if not self.enabled:
            EVENTS_DROPPED.labels("disabled").inc()
            return
        item = (str(record.get("query_id", "")).encode(), search_events.encode(record))
        if len(item[1]) > self.max_record_bytes:
            self._drop(item, "too_large", f"{len(item[1])} bytes, over the limit of {self.max_record_bytes}")
            return
        with self._cv:
            if len(self._buf) >= self.max_buffer:
                self._buf.popleft()
                self.dropped += 1
                EVENTS_DROPPED.labels("buffer_full").inc()
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error("search events buffer full (%d records; Kafka at %s unreachable: %s): "
                              "dropped the oldest record (%d dropped so far)", self.max_buffer,
                              self.bootstrap, self.last_error, self.dropped)
            self._buf.append(item)
            EVENTS_BUFFERED.set(len(self._buf))
            self._cv.notify()

    def _drop(self, item: tuple[bytes, bytes], reason: str, why: str) -> None:
        with self._cv:
            self.dropped += 1
        EVENTS_DROPPED.labels(reason).inc()
        log.error("search event of query %s dropped (%s): %s", item[0][:64].decode("utf-8", "replace"), reason, why)

    def pending(self) -> int:
        with self._cv:
            return len(self._buf) + self._inflight

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every buffered record was acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.pending() == 0

    def close(self, timeout: float = 5.0) -> None:
        if not self.enabled:
            return
        self.flush(timeout)
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)
        if self.pending():
            log.error("stopping with %d search events not sent to Kafka", self.pending())

    def _producer(self):
        producer = kafka.producer(self.bootstrap, "vsearch-search", timeout_s=self.send_timeout, retries=3)
        try:
            kafka.ensure_topics(self.bootstrap, {self.topic: 1}, timeout_s=self.send_timeout)
        except KafkaError as exc:                # the producer may still auto-create it
            log.warning("could not check/create topic %s: %s", self.topic, exc)
        return producer

    def _run(self) -> None:
        producer, backoff = None, 0.5
        while True:
            with self._cv:
                while not self._buf and not self._stop:
                    self._cv.wait(1.0)
                if self._stop and not self._buf:
                    break
                items = [self._buf.popleft() for _ in range(min(self.batch, len(self._buf)))]
                self._inflight = len(items)
                EVENTS_BUFFERED.set(len(self._buf))
            try:
                if producer is None:
                    producer = self._producer()
                self._send(producer, items)
                backoff = 0.5
                with self._cv:
                    self._inflight = 0
            except KafkaError as exc:
                # Put the batch back in front (a record acknowledged before the failure may be
                # sent twice: at-least-once, the query id lets readers de-duplicate).
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                EVENTS_FAILED.inc()
                log.warning("sending %d search events to %s failed (%s); retrying in %.1fs",
                            len(items), self.bootstrap, self.last_error, backoff)
                with self._cv:
                    room = self.max_buffer - len(self._buf)
                    keep = items[-room:] if room > 0 else []
                    lost = len(items) - len(keep)
                    if lost:
                        self.dropped += lost
                        EVENTS_DROPPED.labels("buffer_full").inc(lost)
                        log.error("dropped %d search events: buffer full", lost)
                    self._buf.extendleft(reversed(keep))
                    self._inflight = 0
                    EVENTS_BUFFERED.set(len(self._buf))
                if producer is not None:
                    _close_quietly(producer, 1)
                    producer = None
                with self._cv:
                    if self._stop:
                        break
                    self._cv.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        if producer is not None:
            _close_quietly(producer, 2)


    def _send(self, producer, items: list[tuple[bytes, bytes]]) -> None:
        """Send ``items`` and wait for their acknowledgements. A record refused for good is
        dropped (logged, counted, and taken out of ``items``) and the others go on; a retriable
        failure raises (the caller puts what is left of ``items`` back)."""
        sent = []
        for item in list(items):
            try:
                sent.append((item, producer.send(self.topic, key=item[0], value=item[1])))
            except KafkaError as exc:
                if exc.retriable:
                    raise
                items.remove(item)
                self._drop(item, "refused", f"{type(exc).__name__}: {exc}")
        producer.flush(self.send_timeout)
        acked = 0
        try:
            for item, fut in sent:
                try:
                    fut.get(timeout=self.send_timeout)
                except KafkaError as exc:
                    if exc.retriable:
                        raise
                    self._drop(item, "refused", f"{type(exc).__name__}: {exc}")
                else:
                    acked += 1
                items.remove(item)           # acknowledged or refused: not to be sent again
        finally:
            self.sent += acked
            EVENTS_SENT.inc(acked)


def _close_quietly(producer, timeout: float) -> None:
    try:
        producer.close(timeout=timeout)
    except KafkaError as exc:
        log.warning("closing the search-events producer: %s", exc)
