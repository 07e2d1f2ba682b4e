"""The guarded kafka-python internals the consumer's rebalance handling relies on, against the
version the project pins (pyproject.toml) and a real broker."""

from __future__ import annotations

import re
import threading
import time
import tomllib
import types
import uuid
from pathlib import Path

import kafka
import pytest
from kafka import KafkaConsumer, TopicPartition

from vsearch.core.kafka import GROUP_SETTINGS, ensure_topics, send_and_confirm
from vsearch.ingest import kafka_internals
from vsearch.ingest.kafka_internals import KafkaInternalsMissing, Rebalancing, check_library, listener

ROOT = Path(__file__).resolve().parents[2]


def test_the_guard_supports_exactly_the_pinned_range_and_the_installed_version_passes():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("kafka-python"))
    lower, upper = re.search(r">=([\d.]+),<([\d.]+)", pin).groups()
    as_pair = lambda text: tuple(int(x) for x in (text.split(".") + ["0"])[:2])  # noqa: E731
    assert kafka_internals.SUPPORTED == (as_pair(lower), as_pair(upper)), pin
    check_library()                                  # what is installed here: the pinned kafka-python
    check_library(kafka.__version__)


@pytest.mark.parametrize("version", ["2.2.15", "4.0.0", "nonsense"])
def test_another_kafka_python_fails_loudly_naming_the_pin(version):
    with pytest.raises(KafkaInternalsMissing, match=r"needs >= 3\.0, < 4\.0"):
        check_library(version)


def test_a_missing_internal_is_named():
    with pytest.raises(KafkaInternalsMissing, match=r"no group coordinator \(_coordinator\)"):
        Rebalancing(types.SimpleNamespace())
    with pytest.raises(KafkaInternalsMissing, match="not a ConsumerCoordinator"):
        Rebalancing(types.SimpleNamespace(_coordinator=object()))
    with pytest.raises(KafkaInternalsMissing, match=r"_manager\._net\.sleep"):
        kafka_internals.require(types.SimpleNamespace(_manager=types.SimpleNamespace()), "_manager._net.sleep",
                                "IO loop sleep")


def test_a_revocation_sleeps_and_commits_on_the_io_loop_of_a_real_consumer(broker):
    """What the consumer does before giving partitions up: wait on kafka-python's IO loop and
    commit there, while the partitions are still its own. A second member joining the group
    makes the first give its partition up; the commit made inside the callback is what the
    group then holds."""
    topic, group = f"guard-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker, {topic: 1})
    send_and_confirm(broker, topic, [(b"k%d" % i, b"v%d" % i) for i in range(3)])
    tp = TopicPartition(topic, 0)
    seen: dict = {}

    async def on_revoked(partitions):
        if not partitions or "revoked" in seen:  # the first join revokes nothing; close() revokes again
            return
        started = time.monotonic()
        await rebalancing.sleep(0.2)
        seen["slept"] = time.monotonic() - started
        await rebalancing.commit({tp: 2})
        seen["revoked"] = partitions

    def member(**kwargs):
        return KafkaConsumer(bootstrap_servers=broker, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", **GROUP_SETTINGS, **kwargs)

    first = member()
    first.subscribe([topic], listener=listener(on_revoked, lambda lost: seen.setdefault("lost", lost),
                                               lambda assigned: seen.setdefault("assigned", assigned)))
    rebalancing = Rebalancing(first)
    second = member()
    stop = threading.Event()
    joiner = threading.Thread(target=lambda: [second.poll(timeout_ms=200) for _ in iter(stop.is_set, True)])
    try:
        deadline = time.monotonic() + 60
        records = []
        while len(records) < 3 and time.monotonic() < deadline:
            records += [r for rs in first.poll(timeout_ms=500).values() for r in rs]
        assert len(records) == 3
        assert seen.get("assigned") == {tp}          # the consumer's version cache starts a new epoch here
        second.subscribe([topic])
        joiner.start()
        while "revoked" not in seen and time.monotonic() < deadline:
            first.poll(timeout_ms=200)
        assert seen.get("revoked") == {tp} and seen["slept"] >= 0.2 and "lost" not in seen
    finally:
        stop.set()
        if joiner.is_alive():
            joiner.join(10)
        first.close(autocommit=False)
        second.close(autocommit=False)
    check = KafkaConsumer(bootstrap_servers=broker, group_id=group, enable_auto_commit=False)
    try:
        assert check.committed(tp) == 2
    finally:
        check.close(autocommit=False)
