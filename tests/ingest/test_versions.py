"""The consumer's version cache (:mod:`vsearch.ingest.versions`) keeps the ordering rules
without a Strong read per batch: on a real Milvus Lite file (and the Milvus 2.3.5 standalone
server for reads up to the consumer's own write) and real photos. Another owner of a partition
is simulated by writing to the store directly while the partition is away."""

from __future__ import annotations

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from vsearch.core.store import MilvusStore
from vsearch.ingest.consumer import IngestConsumer, IngestSettings
from vsearch.ingest.events import delete_event, encode, upsert_event
from vsearch.predictor.inference import Embedder

TOPIC = "catalog.images"
P0 = TopicPartition(TOPIC, 0)


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    return Embedder(tiny_model_dir)


def make_consumer(embedder, uri: str, coll: str, **settings) -> tuple[IngestConsumer, list]:
    """A consumer (no broker needed: batches are handed to it) whose store records the ids of
    every version read as ``(ids, seen)``."""
    store = MilvusStore(uri, timeout=60)
    store.ensure_collection(coll, embedder.dim)
    reads: list = []
    versions = store.versions

    def recording(collection, ids, **kw):
        reads.append((list(ids), kw.get("seen", 0)))
        return versions(collection, ids, **kw)

    store.versions = recording
    c = IngestConsumer(IngestSettings(bootstrap="127.0.0.1:1", topic=TOPIC, group="g", collection=coll,
                                      alias=None, create_topics=False, **settings), embedder, store)
    return c, reads


class Log:
    def __init__(self):
        self.offset = 0

    def record(self, event: dict | None, key: str | None, ts: int = 0, partition: int = 0) -> ConsumerRecord:
        self.offset += 1
        value = None if event is None else encode(event)
        k = None if key is None else key.encode()
        return ConsumerRecord(TOPIC, partition, None, self.offset, ts, 0, k, value, [], None,
                              len(k or b""), len(value or b""), 0)


def apply(consumer, records):
    return consumer.write_batch(consumer.prepare_batch(records))


def version(consumer, coll: str, item: str) -> int | None:
    return MilvusStore.versions(consumer.store, coll, [item]).get(item)


def read_ids(reads) -> list[str]:
    return [i for ids, _ in reads for i in ids]


def upsert(item_id: str, ts: int, photo: bytes) -> dict:
    return upsert_event(item_id, image=photo, ts=ts)


def test_known_versions_keep_the_order_without_reading_milvus(embedder, milvus_lite_uri, photo_bytes):
    consumer, reads = make_consumer(embedder, milvus_lite_uri, "c_cache")
    log = Log()
    apply(consumer, [log.record(upsert("a", 20, photo_bytes[0]), "a"),
                     log.record(upsert("b", 10, photo_bytes[1]), "b")])
    assert read_ids(reads) == ["a", "b"]                       # unknown ids: read once
    apply(consumer, [log.record(delete_event("b", ts=30), "b")])
    reads.clear()
    result = apply(consumer, [log.record(upsert("a", 19, photo_bytes[1]), "a"),        # older than stored
                              log.record(upsert("b", 25, photo_bytes[0]), "b")])       # older than the delete
    assert result.stale == 2 and result.written == 0 and not reads
    result = apply(consumer, [log.record(upsert("a", 21, photo_bytes[1]), "a")])
    assert result.written == 1 and not reads
    assert version(consumer, "c_cache", "a") == 21 and version(consumer, "c_cache", "b") == 30
    assert consumer.store.get("c_cache", ["a", "b"]).keys() == {"a"}      # b stays deleted
    consumer.store.close()


def test_after_a_rebalance_what_another_owner_wrote_counts(embedder, milvus_lite_uri, photo_bytes):
    consumer, reads = make_consumer(embedder, milvus_lite_uri, "c_rebalance")
    log = Log()
    apply(consumer, [log.record(upsert("a", 10, photo_bytes[0]), "a")])
    consumer._on_lost({P0})                      # the partition goes away...
    MilvusStore.upsert(consumer.store, "c_rebalance", [{      # ...another owner writes a newer version...
        "id": "a", "embedding": embedder.embed_bytes([photo_bytes[2]])[0], "uri": "inline:a",
        "metadata": {}, "visibility": "public", "updated_at": 50}])
    consumer._on_assigned({P0})                  # ...and it comes back: read again
    reads.clear()
    result = apply(consumer, [log.record(upsert("a", 20, photo_bytes[1]), "a")])
    assert result.stale == 1 and read_ids(reads) == ["a"]
    assert version(consumer, "c_rebalance", "a") == 50

    # a rebalance between preparing a batch and writing it: read again right before the write
    prepared = consumer.prepare_batch([log.record(upsert("a", 60, photo_bytes[1]), "a")])
    consumer._on_lost({P0})
    MilvusStore.delete(consumer.store, "c_rebalance", {"a": 70})
    consumer._on_assigned({P0})
    result = consumer.write_batch(prepared)
    assert result.written == 0 and result.stale == 1
    assert version(consumer, "c_rebalance", "a") == 70 and not consumer.store.get("c_rebalance", ["a"])
    consumer.store.close()


def test_an_event_without_a_key_is_read_strong(embedder, milvus_lite_uri, photo_bytes):
    consumer, reads = make_consumer(embedder, milvus_lite_uri, "c_unkeyed")
    log = Log()
    apply(consumer, [log.record(upsert("a", 10, photo_bytes[0]), "a")])
    # written by a consumer of another partition (an event without a key may land anywhere)
    MilvusStore.upsert(consumer.store, "c_unkeyed", [{
        "id": "a", "embedding": embedder.embed_bytes([photo_bytes[2]])[0], "uri": "inline:a",
        "metadata": {}, "visibility": "public", "updated_at": 50}])
    reads.clear()
    result = apply(consumer, [log.record(upsert("a", 20, photo_bytes[1]), None, partition=1)])
    assert result.stale == 1 and reads == [(["a"], 0)]          # one Strong read of its id
    assert version(consumer, "c_unkeyed", "a") == 50
    consumer.store.close()


def test_reads_up_to_the_consumers_own_write_on_the_server(embedder, milvus_standalone_uri, photo_bytes):
    """On the server, ids the consumer does not know are read at the Milvus timestamp of its
    own first write after the rebalance (no wait for the newest writes), and what it wrote
    since still counts."""
    coll = "c_seen_versions"
    consumer, reads = make_consumer(embedder, milvus_standalone_uri, coll, version_cache=1)
    try:
        log = Log()
        consumer._on_assigned({P0, TopicPartition(TOPIC, 1)})
        apply(consumer, [log.record(upsert("x", 10, photo_bytes[0]), "x")])
        assert [seen for _, seen in reads] == [0]                       # before its first write: Strong
        apply(consumer, [log.record(upsert("y", 10, photo_bytes[1]), "y")])
        assert reads[-1][0] == ["y"] and reads[-1][1] > 0               # a new id: read at its own write
        reads.clear()
        # x from another partition (not the cache's entry: read) and y, which a cache of one
        # entry no longer holds... or holds as a write the read may not see yet
        result = apply(consumer, [log.record(upsert("x", 5, photo_bytes[1]), "x", partition=1),
                                  log.record(upsert("y", 9, photo_bytes[0]), "y", partition=1),
                                  log.record(upsert("z", 1, photo_bytes[2]), "z", partition=1)])
        assert result.stale == 2 and result.written == 1
        assert reads and all(seen > 0 for _, seen in reads)
        assert consumer.store.get(coll, ["x", "y", "z"], ("updated_at",)) == {
            "x": {"updated_at": 10}, "y": {"updated_at": 10}, "z": {"updated_at": 1}}
    finally:
        MilvusStore.drop_collection(consumer.store, coll)
        consumer.store.close()
