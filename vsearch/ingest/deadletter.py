"""The dead-letter topic (``<topic>.dlq``): where a record that cannot be applied goes, with the
reason, instead of stopping its partition or vanishing.

A dead-letter record is the original key, value and headers, sanitised so that the producer
always takes them (header keys as text, values as bytes, null values as empty; a null key and
a null value become an empty value with ``dlq.value_null``), cut to fit (a value over
``max_bytes`` is truncated, ``dlq.truncated`` and ``dlq.value_bytes`` say so), plus
``dlq.reason``, ``dlq.stage``, ``dlq.topic``, ``dlq.partition``, ``dlq.offset`` and
``dlq.timestamp``. A record the producer or the broker refuses for its size is sent again
without its value and original headers (``dlq.truncated: value-dropped``)."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Callable

from kafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError

from ..core.kafka import producer
from .metrics import DEAD

log = logging.getLogger(__name__)

MAX_DLQ_KEY = 16 * 1024                  # bytes of a dead-letter key kept
MAX_DLQ_HEADER_VALUE = 4096              # bytes of one original header value kept
MAX_DLQ_HEADER_BYTES = 64 * 1024         # bytes of original headers kept in all
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)

Dead = tuple[object, str, str]           # (the consumer record, stage, reason)


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


def envelope(rec, stage: str, reason: str, *, max_bytes: int, minimal: bool = False):
    """``(key, value, headers)`` of the dead-letter record for the consumer record ``rec`` (see
    the module's description). ``minimal``: the value and original headers left out (a broker
    refused the record)."""
    limit = max(1024, int(max_bytes))
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


class _Resend(Exception):
    """Dead-letter records to send again in their minimal form (not an outage)."""


class DeadLetters:
    """The producer of the dead-letter topic. :meth:`send` returns once the broker
    acknowledged every record; only outages of the broker are retried (through ``retry``, a
    :class:`~vsearch.ingest.retry.Retrier`)."""

    def __init__(self, bootstrap: str, client_id: str, topic: str, max_bytes: int,
                 retry: Callable):
        self.bootstrap, self.client_id, self.topic = bootstrap, client_id, topic
        self.max_bytes = max_bytes
        self.retry = retry
        self._producer = None

    def connect(self) -> None:
        if self._producer is None:
            self._producer = self.retry("connect producer", lambda: producer(
                self.bootstrap, self.client_id,
                max_request_size=max(1_048_576, self.max_bytes + 128 * 1024)))

    def close(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=5)
            except Exception as exc:  # noqa: BLE001
                log.warning("closing the dead-letter producer: %s", exc)
            self._producer = None

    def send(self, dead: list[Dead]) -> None:
        """Send the records and wait for the broker's acknowledgement of each."""
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
                key, value, headers = envelope(rec, stage, reason, max_bytes=self.max_bytes, minimal=minimal)
                try:
                    sent.append((item, self._producer.send(self.topic, key=key, value=value, headers=headers)))
                except _TOO_LARGE:
                    shrink(item, failed)
            self._producer.flush(timeout=10)
            for item, fut in sent:
                try:
                    fut.get(timeout=10)
                except _TOO_LARGE:
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
                self.retry("dead-letter", attempt)
            except _Resend as exc:
                log.warning("%s", exc)
        DEAD.inc(len(dead))
