"""Kafka plumbing shared by the consumer and ``vsearch publish``: client settings that work
on Apache Kafka and on the local Tansu broker, and topic creation.

Tansu quirks this code respects: consumer groups join quickly only with
``session_timeout_ms=6000, heartbeat_interval_ms=500``; its reported end offsets are wrong, so
nothing here uses end offsets or lag."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

GROUP_SETTINGS = dict(session_timeout_ms=6000, heartbeat_interval_ms=500)


def ensure_topics(bootstrap: str, topics: dict[str, int], *, compact: set[str] = frozenset(),
                  timeout_s: float = 15.0) -> list[str]:
    """Create the topics that do not exist yet (``{name: partitions}``); ``compact`` names the
    ones created with ``cleanup.policy=compact``. Returns the names it created."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="vsearch-admin",
                             request_timeout_ms=int(timeout_s * 1000))
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
                     linger_ms: int = 5, batch_size: int = 16384) -> dict:
    """Send ``(key, value)`` records in order with ``acks=all`` and wait for every one.
    Returns ``{TopicPartition: last offset + 1}`` as the broker acknowledged them (not the
    broker's end offsets, which Tansu reports wrongly): what a consumer must reach."""
    from kafka import KafkaProducer, TopicPartition

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=linger_ms,
                             batch_size=batch_size)
    try:
        futures = [producer.send(topic, key=k, value=v) for k, v in records]
        producer.flush(timeout)
        ends: dict = {}
        for f in futures:
            md = f.get(timeout)
            tp = TopicPartition(md.topic, md.partition)
            ends[tp] = max(ends.get(tp, 0), md.offset + 1)
        return ends
    finally:
        producer.close(5)
