"""The catalog consumer end to end: the real Tansu broker, real Milvus (a ``milvus-lite server``
shared with the consumer process), the real ``vsearch ingest`` command and real photos."""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from tests.ingest.catalog import (build_scenario, committed, metric, milvus_state, publish,
                                  read_topic, start_consumer, wait_committed)
from vsearch import services
from vsearch.store import MilvusStore, collection_name


def names(tag: str):
    u = uuid.uuid4().hex[:8]
    return f"catalog-{tag}-{u}", f"ingest-{tag}-{u}", f"c_{tag}_{u}"


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


def test_sigkill_mid_batch_then_sigterm_loses_nothing_and_duplicates_nothing(
        tmp_path, broker, milvus_server_uri, tiny_model_dir, photo_bytes):
    topic, group, coll = names("kill")
    sc = build_scenario(tmp_path, photo_bytes, n_ids=150, n_events=1000, seed=2)
    ends = publish(broker, topic, sc.records)
    total = sum(ends.values())
    args = ("--collection", coll, "--alias", "", "--batch-size", "40", "--batch-ms", "100")

    first = start_consumer(tmp_path, broker, topic, group, milvus_server_uri, tiny_model_dir, *args,
                           name="first")
    deadline = time.monotonic() + 90
    while sum(committed(broker, group).values()) < total * 0.2 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.signal(signal.SIGKILL)                   # no chance to finish or commit anything
    first.proc.wait(10)
    done = sum(committed(broker, group).values())
    assert 0 < done < total, f"killed too late to test anything: {done} of {total}"

    second = start_consumer(tmp_path, broker, topic, group, milvus_server_uri, tiny_model_dir, *args,
                            name="second")
    deadline = time.monotonic() + 90
    while sum(committed(broker, group).values()) < done + (total - done) * 0.3 and time.monotonic() < deadline:
        time.sleep(0.05)
    second.signal(signal.SIGTERM)                  # finish the batch, commit, exit 0
    assert second.proc.wait(40) == 0, second.log_tail()
    assert "stop requested" in second.log_tail(200)
    after_term = sum(committed(broker, group).values())
    assert after_term < total, "SIGTERM came after the end: nothing tested"

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
            assert store.describe_alias("images") == coll
    finally:
        consumer.stop()
        milvus.stop()


def test_embedding_through_the_embedder_server(tmp_path, broker, embedder_url, milvus_lite_uri, photo_bytes):
    """``--embedder-url`` path, in process: V2 HTTP embedding, a bad image dead-lettered alone."""
    from ingest.consumer import IngestConsumer, IngestSettings
    from predictor.client import EmbedderClient

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
    from vsearch.cli import main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert message in str(exc.value.code)


def test_a_collection_of_another_dimension_stops_the_consumer_with_the_reason(
        tiny_model_dir, milvus_lite_uri, caplog):
    from ingest.consumer import IngestConsumer, IngestSettings
    from predictor.model import Embedder

    store = MilvusStore(milvus_lite_uri)
    store.ensure_collection("c_other_dim", 8)
    emb = Embedder(tiny_model_dir, threads=1)
    consumer = IngestConsumer(IngestSettings(bootstrap="127.0.0.1:1", topic="t", group="g",
                                             collection="c_other_dim"), emb, store)
    assert consumer.run() == 2
    assert f"dimension 8, not {emb.dim}" in caplog.text
    store.close()
