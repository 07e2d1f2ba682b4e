"""The kafka-python internals the consumer relies on for rebalances, in one guarded place.

To finish and commit the batch in hand before the group takes its partitions away, the
consumer needs three things kafka-python 3 has but does not document as public API:

- its rebalance listener may be a coroutine (``kafka.AsyncConsumerRebalanceListener``, run on
  the client's IO loop, so waiting in it does not stop the heartbeats), with
  ``on_partitions_lost`` for an eviction;
- ``ConsumerCoordinator._commit_offsets_sync_async``: a commit that can be awaited on that loop
  (``KafkaConsumer.commit`` would block the very loop it needs);
- the loop's own ``sleep`` (``KafkaConsumer._coordinator._manager._net``), to wait for the
  writer thread without blocking the loop.

The version range and the names are checked when this module is imported, the objects of a
consumer when it starts (:class:`Rebalancing`); a kafka-python without them fails loudly with
:class:`KafkaInternalsMissing` instead of quietly losing the commit before a rebalance.
``tests/ingest/test_kafka_internals.py`` runs against the version the project pins."""

from __future__ import annotations

import inspect
import logging
import re
from typing import Awaitable, Callable

import kafka
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer
from kafka.coordinator.consumer import ConsumerCoordinator
from kafka.structs import OffsetAndMetadata, TopicPartition

log = logging.getLogger(__name__)

# The kafka-python versions whose internals are the ones above: pyproject.toml's pin.
SUPPORTED = ((3, 0), (4, 0))              # >= 3.0, < 4


class KafkaInternalsMissing(ImportError):
    """The installed kafka-python lacks an internal the consumer's rebalance handling uses."""


def version_tuple(text: str) -> tuple[int, ...]:
    """``"3.0.12"`` -> ``(3, 0, 12)`` (a pre-release suffix ends the numbers)."""
    out = []
    for part in text.split("."):
        digits = re.match(r"\d*", part).group()
        if not digits:
            break
        out.append(int(digits))
        if digits != part:
            break
    return tuple(out)


def require(owner, path: str, what: str):
    """``owner.<path>`` (dotted), or :class:`KafkaInternalsMissing` naming what is missing."""
    value = owner
    for name in path.split("."):
        try:
            value = getattr(value, name)
        except AttributeError:
            raise KafkaInternalsMissing(
                f"kafka-python {kafka.__version__} has no {what} ({path}); the ingest consumer needs "
                f"kafka-python >= {'.'.join(map(str, SUPPORTED[0]))}, < {'.'.join(map(str, SUPPORTED[1]))} "
                "(pyproject.toml) to commit the batch in hand before a rebalance") from None
    return value


def check_library(version: str = kafka.__version__) -> None:
    """The installed kafka-python is one whose internals this module knows."""
    have = version_tuple(version)
    if not SUPPORTED[0] <= have[:2] < SUPPORTED[1]:
        raise KafkaInternalsMissing(
            f"kafka-python {version} is not supported by the ingest consumer: it needs >= "
            f"{'.'.join(map(str, SUPPORTED[0]))}, < {'.'.join(map(str, SUPPORTED[1]))} (pyproject.toml)")
    for method in ("on_partitions_revoked", "on_partitions_assigned", "on_partitions_lost"):
        if not inspect.iscoroutinefunction(require(AsyncConsumerRebalanceListener, method,
                                                   "coroutine rebalance listener")):
            raise KafkaInternalsMissing(f"kafka-python {version}: AsyncConsumerRebalanceListener.{method} "
                                        "is not a coroutine")
    commit = require(ConsumerCoordinator, "_commit_offsets_sync_async", "awaitable offset commit")
    if not inspect.iscoroutinefunction(commit):
        raise KafkaInternalsMissing(f"kafka-python {version}: ConsumerCoordinator._commit_offsets_sync_async "
                                    "is not a coroutine")


check_library()


def partition_of(record) -> TopicPartition:
    return TopicPartition(record.topic, record.partition)


class Rebalancing:
    """What a rebalance callback may do on the IO loop of a started ``consumer``: sleep, and
    commit offsets (awaited there). Checked when made, so a consumer fails at start."""

    def __init__(self, consumer: KafkaConsumer):
        coordinator = require(consumer, "_coordinator", "group coordinator")
        if not isinstance(coordinator, ConsumerCoordinator):
            raise KafkaInternalsMissing(f"kafka-python {kafka.__version__}: the consumer's coordinator is a "
                                        f"{type(coordinator).__name__}, not a ConsumerCoordinator")
        self._sleep = require(coordinator, "_manager._net.sleep", "IO loop sleep")
        self._commit = coordinator._commit_offsets_sync_async

    async def sleep(self, seconds: float) -> None:
        await self._sleep(seconds)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit ``{partition: next offset}`` (raises what the broker answers)."""
        await self._commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})


def listener(on_revoked: Callable[[set], Awaitable[None]], on_lost: Callable[[set], None],
             on_assigned: Callable[[set], None] | None = None) -> AsyncConsumerRebalanceListener:
    """The group's rebalance callbacks as kafka-python runs them (coroutines on its IO loop):
    ``on_revoked(partitions)`` is awaited before the group takes them away, ``on_lost`` is
    called when they were already taken (evicted: commit nothing for them), ``on_assigned``
    when partitions come (before records of them are polled)."""

    class Listener(AsyncConsumerRebalanceListener):
        async def on_partitions_revoked(self, revoked):
            await on_revoked(set(revoked))

        async def on_partitions_assigned(self, assigned):
            log.info("partitions assigned: %s", names(assigned))
            if on_assigned is not None:
                on_assigned(set(assigned))

        async def on_partitions_lost(self, lost):
            log.warning("partitions lost (evicted from the group): %s", names(lost))
            on_lost(set(lost))

    return Listener()


def names(partitions) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)
