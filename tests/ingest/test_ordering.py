"""The consumer's ordering rules, one at a time, on a real Milvus Lite file and real photos:
for each id the event with the highest ``ts`` wins (ties: the later one in the log); an event
older than what Milvus holds for its id is ignored (stale); a delete leaves a tombstone so an
older upsert cannot bring the item back; batches in flight count as stored."""

from __future__ import annotations

import json

import pytest
from kafka.consumer.fetcher import ConsumerRecord

from vsearch.core.store import MilvusStore
from vsearch.ingest.consumer import IngestConsumer, IngestSettings
from vsearch.ingest.events import delete_event, encode, upsert_event
from vsearch.predictor.inference import Embedder

TOPIC = "catalog.images"


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    return Embedder(tiny_model_dir)


@pytest.fixture
def consumer(embedder, milvus_lite_uri):
    store = MilvusStore(milvus_lite_uri)
    c = IngestConsumer(IngestSettings(bootstrap="127.0.0.1:1", topic=TOPIC, group="g", collection="c_order",
                                      alias=None, create_topics=False), embedder, store)
    store.ensure_collection("c_order", embedder.dim)
    yield c
    store.close()


class Log:
    """Records of one partition, offsets in order, as the consumer would poll them."""

    def __init__(self):
        self.offset = 0

    def record(self, event: dict | None, key: str, ts: int = 0) -> ConsumerRecord:
        self.offset += 1
        value = None if event is None else encode(event)
        return ConsumerRecord(TOPIC, 0, None, self.offset, ts, 0, key.encode(), value, [], None,
                              len(key), len(value or b""), 0)


def upsert(item_id: str, ts: int, photo: bytes, **meta) -> dict:
    return upsert_event(item_id, image=photo, ts=ts, metadata=meta)


def stored(consumer) -> dict:
    rows = consumer.store.scan("c_order", ("metadata", "updated_at"))
    return {r["id"]: (r["updated_at"], json.dumps(r["metadata"], sort_keys=True)) for r in rows}


def apply(consumer, records, in_flight=None):
    return consumer.write_batch(consumer.prepare_batch(records, in_flight))


def test_newest_event_of_a_batch_wins_and_ties_go_to_the_later_one(consumer, photo_bytes):
    log = Log()
    result = apply(consumer, [log.record(upsert("a", 20, photo_bytes[0], v="new"), "a"),
                              log.record(upsert("a", 10, photo_bytes[1], v="old"), "a"),
                              log.record(upsert("b", 5, photo_bytes[0], v="first"), "b"),
                              log.record(upsert("b", 5, photo_bytes[1], v="second"), "b")])
    assert result.superseded == 2 and result.written == 2 and result.stale == 0
    assert stored(consumer) == {"a": (20, '{"v": "new"}'), "b": (5, '{"v": "second"}')}


def test_an_event_older_than_the_stored_version_is_stale(consumer, photo_bytes):
    log = Log()
    apply(consumer, [log.record(upsert("a", 20, photo_bytes[0], v="stored"), "a")])
    result = apply(consumer, [log.record(upsert("a", 19, photo_bytes[1], v="late"), "a")])
    assert result.stale == 1 and result.written == 0
    assert stored(consumer) == {"a": (20, '{"v": "stored"}')}
    result = apply(consumer, [log.record(upsert("a", 20, photo_bytes[1], v="same ts, later"), "a")])
    assert result.written == 1                           # an equal ts is not older: the later one wins
    assert stored(consumer) == {"a": (20, '{"v": "same ts, later"}')}


def test_a_delete_leaves_a_tombstone_that_older_upserts_cannot_cross(consumer, photo_bytes):
    log = Log()
    apply(consumer, [log.record(upsert("a", 10, photo_bytes[0]), "a"),
                     log.record(upsert("b", 10, photo_bytes[1]), "b")])
    result = apply(consumer, [log.record(delete_event("a", ts=30), "a"),
                              log.record(None, "b", ts=40)])          # a Kafka tombstone deletes b at 40
    assert result.deleted == 2 and stored(consumer) == {}
    result = apply(consumer, [log.record(upsert("a", 25, photo_bytes[0], v="before the delete"), "a"),
                              log.record(upsert("b", 39, photo_bytes[1]), "b")])
    assert result.stale == 2 and stored(consumer) == {}          # the deleted items stay deleted
    result = apply(consumer, [log.record(upsert("a", 31, photo_bytes[0], v="back"), "a")])
    assert result.written == 1 and stored(consumer) == {"a": (31, '{"v": "back"}')}


def test_writes_of_a_batch_still_in_flight_count_as_stored(consumer, photo_bytes):
    """The consumer prepares batch N+1 while batch N is being written: an event older than one
    of N's is stale even though N's write has not reached Milvus yet."""
    log = Log()
    first = consumer.prepare_batch([log.record(upsert("a", 50, photo_bytes[0], v="in flight"), "a")])
    second = consumer.prepare_batch([log.record(upsert("a", 40, photo_bytes[1], v="older"), "a")],
                                    first.versions)
    assert second.result.stale == 1 and not second.rows
    consumer.write_batch(first)
    consumer.write_batch(second)
    assert stored(consumer) == {"a": (50, '{"v": "in flight"}')}


def test_a_batch_fetched_before_the_one_ahead_of_it_was_planned_is_checked_again_before_embedding(
        consumer, photo_bytes):
    """Three stages: batch N+1 is read and fetched while N is still being embedded (its
    winners unknown); N's planned writes then count as stored when N+1 is embedded."""
    log = Log()
    fetched_n = consumer.fetch_batch([log.record(upsert("a", 50, photo_bytes[0], v="newer"), "a")])
    fetched_next = consumer.fetch_batch([log.record(upsert("a", 40, photo_bytes[1], v="older"), "a"),
                                         log.record(upsert("b", 10, photo_bytes[2], v="b"), "b")])
    planned_n = consumer.embed_batch(fetched_n)
    planned_next = consumer.embed_batch(fetched_next, planned_n.versions)
    assert planned_next.result.stale == 1 and [r["id"] for r in planned_next.rows] == ["b"]
    consumer.write_batch(planned_n)
    consumer.write_batch(planned_next)
    assert stored(consumer) == {"a": (50, '{"v": "newer"}'), "b": (10, '{"v": "b"}')}


def test_partitions_given_away_while_a_batch_was_embedded_leave_it(consumer, photo_bytes):
    """What another consumer owns after a rebalance is neither written, dead-lettered nor
    committed by this one: rows, deletes, dead letters and offsets of those partitions go."""
    from kafka.structs import TopicPartition

    from vsearch.ingest.batch import without_partitions

    def rec(partition, offset, event, key):
        value = encode(event) if isinstance(event, dict) else event
        return ConsumerRecord(TOPIC, partition, None, offset, 0, 0, key.encode(), value, [], None,
                              len(key), len(value), 0)
    records = [rec(0, 7, upsert("a", 5, photo_bytes[0]), "a"), rec(1, 3, upsert("b", 5, photo_bytes[1]), "b"),
               rec(1, 4, delete_event("c", ts=6), "c"), rec(1, 5, b"{not json", "d"),
               rec(0, 8, b"{not json either", "e")]
    planned = consumer.prepare_batch(records)
    assert {r["id"] for r in planned.rows} == {"a", "b"} and set(planned.deletes) == {"c"} and len(planned.dead) == 2
    kept = without_partitions(planned, {TopicPartition(TOPIC, 1)})
    assert [r["id"] for r in kept.rows] == ["a"] and kept.deletes == {} and set(kept.versions) == {"a"}
    assert [d[0].offset for d in kept.dead] == [8] and set(kept.sources) == {"a"}
    assert kept.result.offsets == {TopicPartition(TOPIC, 0): 9}
    assert without_partitions(planned, set()) is planned
