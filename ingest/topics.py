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
