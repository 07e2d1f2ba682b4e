"""Kafka plumbing shared by every part that talks to the broker: client settings that work on
Apache Kafka and on the local Tansu broker, the one producer set-up, topic creation, a
send-and-confirm helper and a reader of whole topics.

Tansu quirks this code respects: consumer groups join quickly only with
``session_timeout_ms=6000, heartbeat_interval_ms=500``; its reported end offsets are wrong, so
nothing here uses end offsets or lag."""

from __future__ import annotations

import logging
import time
from typing import Iterator

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

log = logging.getLogger(__name__)

GROUP_SETTINGS = dict(session_timeout_ms=6000, heartbeat_interval_ms=500)


def producer(bootstrap: str, client_id: str, *, timeout_s: float | None = None, **overrides):
    """A ``KafkaProducer`` that waits for every in-sync replica (``acks=all``) and retries;
    ``timeout_s`` bounds connecting, blocking and each request; ``overrides`` are passed on."""
    settings = dict(bootstrap_servers=bootstrap, client_id=client_id, acks="all", retries=5,
                    linger_ms=5)
    if timeout_s is not None:
        ms = int(timeout_s * 1000)
        settings.update(request_timeout_ms=ms, max_block_ms=ms, bootstrap_timeout_ms=ms)
    settings.update(overrides)
    return KafkaProducer(**settings)


def ensure_topics(bootstrap: str, topics: dict[str, int], *, compact: set[str] = frozenset(),
                  timeout_s: float = 15.0) -> list[str]:
    """Create the topics that do not exist yet (``{name: partitions}``); ``compact`` names the
    ones created with ``cleanup.policy=compact``. Returns the names it created."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="vsearch-admin",
                             request_timeout_ms=int(timeout_s * 1000),
                             bootstrap_timeout_ms=int(timeout_s * 1000))
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, num_partitions=n, replication_factor=1,
                        topic_configs={"cleanup.policy": "compact"} if name in compact else None)
               for name, n in topics.items() if name not in existing]
        created = []
        for topic in new:
            try:
                admin.create_topics([topic], timeout_ms=int(timeout_s * 1000))
                created.append(topic.name)
                log.info("created topic %s (%d partitions)", topic.name, topic.num_partitions)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()


def send_and_confirm(bootstrap: str, topic: str, records, *, timeout: float = 30.0,
                     client_id: str = "vsearch-send", **overrides) -> dict:
    """Send ``(key, value)`` records in order and wait for the broker's acknowledgement of every
    one. Returns ``{TopicPartition: last offset + 1}`` as acknowledged (not the broker's end
    offsets, which Tansu reports wrongly): what a consumer of them must reach."""
    p = producer(bootstrap, client_id, **overrides)
    try:
        futures = [p.send(topic, key=k, value=v) for k, v in records]
        p.flush(timeout)
        ends: dict = {}
        for f in futures:
            md = f.get(timeout)
            tp = TopicPartition(md.topic, md.partition)
            ends[tp] = max(ends.get(tp, 0), md.offset + 1)
        return ends
    finally:
        p.close(5)


def read_topic(bootstrap: str, topic: str, *, idle_s: float = 3.0, timeout_s: float | None = None,
               client_id: str = "vsearch-reader") -> Iterator:
    """Every record of ``topic``, every partition from the beginning, until none has arrived for
    ``idle_s`` seconds (end offsets are not trusted: some Kafka-protocol brokers report them
    wrongly). Nothing is committed. Raises ``LookupError`` when the topic does not exist and
    ``TimeoutError`` when records are still arriving after ``timeout_s``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", client_id=client_id,
                             request_timeout_ms=30_000)
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise LookupError(f"topic {topic!r} does not exist on {bootstrap}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        start = last = time.monotonic()
        while time.monotonic() - last < idle_s:
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{topic!r} on {bootstrap} still delivering after {timeout_s:.0f}s")
            batch = consumer.poll(timeout_ms=300)
            if batch:
                last = time.monotonic()
            for msgs in batch.values():
                yield from msgs
    finally:
        consumer.close()
