"""The catalog consumer end to end: the real Tansu broker, real Milvus (a ``milvus-lite server``
shared with the consumer process), the real ``vsearch ingest`` command and real photos."""

from __future__ import annotations

import signal
import time
import uuid

import pytest
from pymilvus import DataType, MilvusClient

from tests.fixtures.catalog import (
    build_scenario,
    committed,
    metric,
    milvus_state,
    publish,
    read_topic,
    start_consumer,
    wait_committed,
)
from tests.fixtures.waiting import wait_until
from vsearch.cli import main
from vsearch.core.naming import DEFAULT_ALIAS, collection_name
from vsearch.core.store import MilvusStore
from vsearch.ingest.consumer import IngestConsumer, IngestSettings
from vsearch.ingest.events import encode, upsert_event
from vsearch.local import services
from vsearch.predictor.client import EmbedderClient
from vsearch.predictor.inference import Embedder


def names(tag: str):
    u = uuid.uuid4().hex[:8]
    return f"catalog-{tag}-{u}", f"ingest-{tag}-{u}", f"c_{tag}_{u}"


@pytest.mark.slow
def test_thousands_of_events_end_to_end(tmp_path, broker, milvus_server_uri, tiny_model_dir, photo_bytes):
    topic, group, coll = names("e2e")
    sc = build_scenario(tmp_path, photo_bytes, n_ids=300, n_events=3000, seed=1)
    assert len(sc.records) == 3000 and len(sc.bad) > 100
    ends = publish(broker, topic, sc.records)
    consumer = start_consumer(tmp_path, broker, topic, group, milvus_server_uri, tiny_model_dir,
                              "--collection", coll, "--alias", "", "--batch-size", "500")
    try:
        wait_committed(broker, group, ends, timeout=180, consumer=consumer)
        state = milvus_state(milvus_server_uri, coll)
        assert set(state) == set(sc.expected)
        for i, want in sc.expected.items():
            assert state[i] == want, i
        # every malformed record is in the dead-letter topic, once, with its reason
        dlq = read_topic(broker, f"{topic}.dlq", len(sc.bad), timeout=30)
        assert len(dlq) == len(sc.bad)
        for rec in dlq:
            headers = dict(rec.headers)
            assert rec.value in sc.bad, rec.value[:200]
            assert headers["dlq.stage"].decode() == sc.bad[rec.value]
            assert headers["dlq.reason"] and headers["dlq.topic"].decode() == topic
        reasons = " ".join(dict(r.headers)["dlq.reason"].decode() for r in dlq)
        for phrase in ("not JSON", "unknown schema version 2", "without 'ts'", "visibility must be",
                       "no such file", "cannot be used", "does not match the event id", "op must be"):
            assert phrase in reasons
        assert metric(consumer, "vsearch_ingest_events_dead_lettered_total") == len(sc.bad)
        assert metric(consumer, "vsearch_ingest_events_processed_total") == sc.n_valid
    finally:
        assert consumer.stop() == 0, consumer.log_tail()
        with MilvusStore(milvus_server_uri) as store:
            store.drop_collection(coll)


@pytest.mark.slow
def test_sigkill_mid_batch_then_sigterm_loses_nothing_and_duplicates_nothing(
        tmp_path, broker, milvus_server_uri, tiny_model_dir, photo_bytes):
    """The catalog arrives in three parts: the first consumer is SIGKILLed part-way through
    the first, the second is SIGTERMed part-way through the second, the third finishes the
    third. Each part is published only after the previous consumer is gone, so every stop
    lands in the middle whatever the machine's speed."""
    topic, group, coll = names("kill")
    sc = build_scenario(tmp_path, photo_bytes, n_ids=150, n_events=1000, seed=2)
    parts = [sc.records[:400], sc.records[400:700], sc.records[700:]]
    args = ("--collection", coll, "--alias", "", "--batch-size", "40", "--batch-ms", "100")

    def wait_for_progress(done: int, consumer):
        def progressed() -> bool:
            if sum(committed(broker, group).values()) > done:
                return True
            assert consumer.alive(), consumer.log_tail()
            return False

        wait_until(progressed, 90, 0.05, message=None)
        return sum(committed(broker, group).values())

    ends: dict = {}

    def publish_part(records):
        for tp, off in publish(broker, topic, records).items():
            ends[tp] = max(ends.get(tp, 0), off)

    publish_part(parts[0])
    first = start_consumer(tmp_path, broker, topic, group, milvus_server_uri, tiny_model_dir, *args,
                           name="first")
    assert wait_for_progress(0, first) > 0
    first.signal(signal.SIGKILL)                   # no chance to finish or commit anything
    first.proc.wait(10)
    done = sum(committed(broker, group).values())

    publish_part(parts[1])
    second = start_consumer(tmp_path, broker, topic, group, milvus_server_uri, tiny_model_dir, *args,
                            name="second")
    wait_for_progress(done, second)
    second.signal(signal.SIGTERM)                  # finish the batch, commit, exit 0
    assert second.proc.wait(40) == 0, second.log_tail()
    assert "stop requested" in second.log_tail(200)

    publish_part(parts[2])
    third = start_consumer(tmp_path, broker, topic, group, milvus_server_uri, tiny_model_dir, *args,
                           name="third")
    try:
        wait_committed(broker, group, ends, timeout=120, consumer=third)
        state = milvus_state(milvus_server_uri, coll)          # also asserts unique ids
        assert state == sc.expected
        with MilvusStore(milvus_server_uri) as store:
            assert store.count(coll) == len(sc.expected)
    finally:
        third.stop()
        with MilvusStore(milvus_server_uri) as store:
            store.drop_collection(coll)


@pytest.mark.slow
def test_milvus_outage_commits_nothing_until_it_is_back(tmp_path, broker, tiny_model_dir, photo_bytes):
    topic, group, coll = names("outage")
    port = services.free_port()
    milvus = services.start_milvus_lite_server(tmp_path / "milvus", port=port, log_path=tmp_path / "m1.log")
    uri = milvus.uri
    sc = build_scenario(tmp_path, photo_bytes, n_ids=60, n_events=400, seed=3)
    half = len(sc.records) // 2
    consumer = start_consumer(tmp_path, broker, topic, group, uri, tiny_model_dir,
                              "--collection", coll, "--batch-size", "50")
    try:
        ends_a = publish(broker, topic, sc.records[:half])
        wait_committed(broker, group, ends_a, timeout=90, consumer=consumer)

        milvus.stop()                                  # Milvus goes away
        ends_b = publish(broker, topic, sc.records[half:])
        time.sleep(6)
        assert committed(broker, group) == {tp: off for tp, off in ends_a.items()}, \
            "offsets were committed while Milvus was down"
        assert consumer.alive(), consumer.log_tail()
        assert metric(consumer, "vsearch_ingest_retries_total") > 0

        milvus = services.start_milvus_lite_server(tmp_path / "milvus", port=port,
                                                   log_path=tmp_path / "m2.log")
        wait_committed(broker, group, ends_b, timeout=90, consumer=consumer)
        assert milvus_state(uri, coll) == sc.expected
        with MilvusStore(uri) as store:                # the first consumer made the serving alias
            assert store.describe_alias(DEFAULT_ALIAS) == coll
    finally:
        consumer.stop()
        milvus.stop()


def test_embedding_through_the_embedder_server(tmp_path, broker, embedder_url, milvus_lite_uri, photo_bytes):
    """``--embedder-url`` path, in process: V2 HTTP embedding, a bad image dead-lettered alone."""
    topic, group, _ = names("http")
    sc = build_scenario(tmp_path, photo_bytes[:6], n_ids=20, n_events=80, seed=4)
    ends = publish(broker, topic, sc.records)
    client = EmbedderClient(embedder_url)
    store = MilvusStore(milvus_lite_uri)
    coll = collection_name("tiny-http", "1")
    consumer = IngestConsumer(IngestSettings(bootstrap=broker, topic=topic, group=group, collection=coll,
                                             batch_size=30, batch_ms=200, exit_when_idle_s=3.0),
                              client, store)
    assert consumer.run() == 0
    assert committed(broker, group) == ends
    assert milvus_state_local(store, coll) == sc.expected
    dlq = read_topic(broker, f"{topic}.dlq", len(sc.bad), timeout=20)
    assert sorted(r.value for r in dlq) == sorted(sc.bad)
    store.close()


def milvus_state_local(store: MilvusStore, coll: str) -> dict:
    return {r["id"]: {"uri": r["uri"], "metadata": r["metadata"], "visibility": r["visibility"]}
            for r in store.scan(coll, ("uri", "metadata", "visibility"))}


@pytest.mark.parametrize("argv, message", [
    (["ingest", "--bootstrap", "127.0.0.1:1"], "--model-dir"),
    (["ingest", "--bootstrap", "127.0.0.1:1", "--embedder-url", "http://127.0.0.1:1"], "--collection"),
    (["publish", "--bootstrap", "127.0.0.1:1"], "--delete"),
])
def test_cli_explains_missing_arguments(argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert message in str(exc.value.code)


def test_a_collection_of_another_dimension_stops_the_consumer_with_the_reason(
        tiny_model_dir, milvus_lite_uri, caplog):
    store = MilvusStore(milvus_lite_uri)
    store.ensure_collection("c_other_dim", 8)
    emb = Embedder(tiny_model_dir)
    consumer = IngestConsumer(IngestSettings(bootstrap="127.0.0.1:1", topic="t", group="g",
                                             collection="c_other_dim"), emb, store)
    assert consumer.run() == 2
    assert f"dimension 8, not {emb.dim}" in caplog.text
    store.close()


def test_a_write_milvus_refuses_dead_letters_only_its_records_and_the_partition_flows(
        tmp_path, broker, milvus_lite_uri, tiny_model_dir, photo_bytes):
    """A real, deterministic refusal: the collection was created (by an older deployment) with
    ``uri`` limited to 64 characters, so Milvus itself refuses rows whose file:// URI is
    longer, while inline images (stored as ``inline:<id>``) fit. The refused rows are found by
    splitting the batch and dead-lettered at stage ``write``; the rest is written and the
    offsets are committed."""
    emb = Embedder(tiny_model_dir)
    coll = "c_narrow_uri"
    client = MilvusClient(uri=milvus_lite_uri)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=emb.dim)
    schema.add_field("uri", DataType.VARCHAR, max_length=64)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("visibility", DataType.VARCHAR, max_length=16)
    schema.add_field("updated_at", DataType.INT64)
    index = client.prepare_index_params()
    index.add_index(field_name="embedding", index_type="FLAT", metric_type="COSINE")
    client.create_collection(coll, schema=schema, index_params=index)
    client.close()

    folder = tmp_path / ("a-folder-name-long-enough-to-make-every-file-uri-longer-than-64-chars")
    folder.mkdir()
    events, refused = [], set()
    for i in range(12):
        if i % 3 == 0:
            path = folder / f"p{i}.jpg"
            path.write_bytes(photo_bytes[i])
            events.append(upsert_event(f"long-{i}", uri=path.as_uri(), ts=1))
            refused.add(f"long-{i}")
        else:
            events.append(upsert_event(f"inline-{i}", image=photo_bytes[i], ts=1))
    topic, group, _ = names("refuse")
    ends = publish(broker, topic, [(e["id"].encode(), encode(e)) for e in events], partitions=1)

    store = MilvusStore(milvus_lite_uri)
    consumer = IngestConsumer(IngestSettings(bootstrap=broker, topic=topic, group=group, collection=coll,
                                             alias=None, batch_size=100, batch_ms=300, exit_when_idle_s=3.0),
                              emb, store)
    assert consumer.run() == 0
    assert committed(broker, group) == ends
    assert set(milvus_state_local(store, coll)) == {e["id"] for e in events} - refused
    dlq = read_topic(broker, f"{topic}.dlq", len(refused), timeout=20)
    assert {r.key.decode() for r in dlq} == refused
    for r in dlq:
        headers = dict(r.headers)
        assert headers["dlq.stage"] == b"write"
        assert b"Milvus refused the write" in headers["dlq.reason"]
    store.close()
