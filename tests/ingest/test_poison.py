"""No record can stop ingest: poison records from a third-party producer (confluent-kafka, every
codec, null headers, tombstones, a null key with a null value) mixed with valid ones, against
the real broker and a real Milvus Lite. The consumer keeps running, the valid events land, each
poison record reaches the dead-letter topic with its stage and reason, and everything is
committed. Also: rebalances with two consumers, and writes that became stale."""

from __future__ import annotations

import base64
import http.server
import json
import logging
import os
import threading
import time
import uuid

import numpy as np
import pytest
from confluent_kafka import Producer
from kafka import TopicPartition

from tests.fixtures.catalog import build_scenario, committed, milvus_state, publish, read_topic
from tests.fixtures.waiting import wait_until
from vsearch.core.fetch import FetchConfig, Fetcher
from vsearch.core.kafka import ensure_topics
from vsearch.core.store import MilvusStore
from vsearch.ingest.batch import BatchResult, PreparedBatch
from vsearch.ingest.consumer import IngestConsumer, IngestSettings
from vsearch.ingest.events import encode, upsert_event
from vsearch.predictor.inference import Embedder

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")


def _produce(bootstrap: str, topic: str, records, codec: str) -> dict:
    """Send (key, value, headers) with confluent-kafka; {(topic, partition): last offset + 1}."""
    p = Producer({"bootstrap.servers": bootstrap, "compression.type": codec, "linger.ms": 20,
                  "message.max.bytes": 5_000_000, "enable.idempotence": False, "acks": "all"})
    ends, errors = {}, []

    def done(err, msg):
        if err is not None:
            errors.append(err)
        else:
            key = (msg.topic(), msg.partition())
            ends[key] = max(ends.get(key, 0), msg.offset() + 1)

    for key, value, headers in records:
        p.produce(topic, value=value, key=key, headers=headers, on_delivery=done)
    assert p.flush(30) == 0 and not errors, errors
    return ends


def _trickler():
    class Slow(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _ev(i: str, **kw) -> bytes:
    base = {"schema": 1, "op": "upsert", "id": i, "uri": "file:///nowhere.jpg", "ts": 1}
    base.update(kw)
    return json.dumps(base).encode()


def test_poison_records_from_a_third_party_producer_never_stop_ingest(tmp_path, broker, tiny_model_dir, photo_bytes):
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.jpg").write_bytes(photo_bytes[0])
    os.mkfifo(root / "fifo.jpg")
    (tmp_path / "outside.jpg").write_bytes(photo_bytes[1])
    (root / "escape.jpg").symlink_to(tmp_path / "outside.jpg")
    slow = _trickler()
    topic, group = f"poison-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker, {topic: 2, f"{topic}.dlq": 1}, compact={topic})

    valid: dict[str, dict] = {}
    poison: dict[bytes, str] = {}             # a value (or a key for null values) -> expected stage
    records = {codec: [] for codec in CODECS}
    for n, codec in enumerate(CODECS):
        for j in range(3):
            i = f"ok-{codec}-{j}"
            ev = upsert_event(i, image=photo_bytes[(n + j) % len(photo_bytes)], metadata={"codec": codec}, ts=10) \
                if j % 2 else upsert_event(i, uri=(root / "ok.jpg").as_uri(), metadata={"codec": codec}, ts=10)
            valid[i] = ev
            records[codec].append((i.encode(), encode(ev), [("trace", None), ("origin", b"shop")]))

    def bad(value: bytes | None, stage: str, key: bytes | None = None, headers=None, codec="zstd"):
        records[codec].append((key, value, headers or [("null-header", None)]))
        poison[value if value is not None else b"key:" + (key or b"")] = stage

    bad(b"[" * 100_000, "validate")                                         # deep JSON
    bad(_ev("x", metadata={"a": {"b": {}}}).replace(b'{"b": {}}', b"[" * 50 + b"]" * 50), "validate")
    bad(b'{"schema":1,"op":"upsert","id":"lone\\ud800","uri":"file:///x.jpg","ts":1}', "validate")
    bad(b'{"schema":1,"op":"upsert","id":"u1","uri":"https://ex\\udcffample.com/a.jpg","ts":1}', "validate")
    bad(_ev("nl\nid"), "validate")                                           # Milvus' parser cannot read it
    bad(_ev("bigint", metadata={"n": 2**70}), "validate")
    bad(_ev("surrogate-meta").replace(b'"ts"', b'"metadata": {"s": "\\ud800"}, "ts"'), "validate")
    bad(_ev("deep-meta", metadata=json.loads("[" * 40 + "]" * 40)), "validate")
    bad(_ev("nul", uri=(root / "ok.jpg").as_uri() + "%00.jpg"), "fetch")
    bad(_ev("label", uri="http://" + "a" * 64 + ".example.com/x.jpg"), "fetch")
    bad(_ev("zero", uri="file:///dev/zero"), "fetch")
    bad(_ev("fifo", uri=(root / "fifo.jpg").as_uri()), "fetch")
    bad(_ev("escape", uri=(root / "escape.jpg").as_uri()), "fetch")
    bad(_ev("slow", uri=f"http://127.0.0.1:{slow.server_address[1]}/slow.jpg"), "fetch")
    bad(encode({"schema": 1, "op": "upsert", "id": "huge", "ts": 1,
                "image_b64": base64.b64encode(os.urandom(300_000)).decode()}), "decode", key=b"huge")
    bad(None, "validate", key=None, codec="gzip")                             # null key and null value
    records["lz4"].append((b"ok-none-0", None, None))                          # a tombstone: deletes it
    valid.pop("ok-none-0")

    ends = {}
    for codec in CODECS:
        ends.update({k: max(v, ends.get(k, 0)) for k, v in _produce(broker, topic, records[codec], codec).items()})

    store = MilvusStore(str(tmp_path / "m.db"))
    fetcher = Fetcher(FetchConfig(file_roots=(root,), allow_private=True, total_timeout=2, retries=0))
    consumer = IngestConsumer(IngestSettings(bootstrap=broker, topic=topic, group=group, collection="c_poison",
                                             alias=None, batch_size=50, batch_ms=300, exit_when_idle_s=4.0,
                                             dlq_max_bytes=100_000, create_topics=False),
                              Embedder(tiny_model_dir), store, fetcher)
    try:
        assert consumer.run() == 0
        assert committed(broker, group) == {TopicPartition(t, p): off for (t, p), off in ends.items()}
        rows = {r["id"]: r for r in store.scan("c_poison", ("uri", "metadata"))}
        assert set(rows) == set(valid)
        dlq = read_topic(broker, f"{topic}.dlq", len(poison) + 5, timeout=15)
        assert len(dlq) == len(poison), [dict(r.headers).get("dlq.reason") for r in dlq]
        for rec in dlq:
            h = dict(rec.headers)
            key = rec.value if not h.get("dlq.value_null") else b"key:"
            if h.get("dlq.truncated") == b"value":
                assert len(rec.value) == 100_000 and int(h["dlq.value_bytes"]) > 100_000
                key = next(v for v in poison if v.startswith(b'{"schema":1,"op":"upsert","id":"huge"'))
            assert key in poison, (rec.value[:80], h)
            assert h["dlq.stage"].decode() == poison[key], (rec.value[:80], h["dlq.reason"])
            assert h["dlq.reason"] and h["dlq.topic"].decode() == topic
            assert all(isinstance(v, bytes) for _, v in rec.headers)
    finally:
        slow.shutdown()
        store.close()


def test_writes_that_became_stale_are_not_applied(tmp_path, tiny_model_dir, photo_bytes):
    """A batch read before a newer write landed (a previous owner of the partition, a
    rebalance) must not overwrite it: a delete stays, a public -> private change stays."""
    store = MilvusStore(str(tmp_path / "s.db"))
    store.ensure_collection("c_stale", 4)
    vec = np.ones(4, np.float32) / 2
    row = {"embedding": vec, "uri": "inline:x", "metadata": {}, "visibility": "public"}
    store.upsert("c_stale", [{"id": "private-now", **row, "visibility": "private", "updated_at": 20},
                             {"id": "deleted", **row, "updated_at": 5}])
    store.delete("c_stale", {"deleted": 20})
    consumer = IngestConsumer(IngestSettings(bootstrap="127.0.0.1:1", topic="t", group="g", collection="c_stale"),
                              None, store)

    class Rec:
        topic, partition, offset, key, value, headers = "t", 0, 0, b"k", b"v", []

    stale = PreparedBatch(result=BatchResult(offsets={}), rows=[
        {"id": "private-now", **row, "updated_at": 10}, {"id": "deleted", **row, "updated_at": 10},
        {"id": "new", **row, "updated_at": 10}], deletes={}, dead=[], size=3, started=time.monotonic(),
        versions={}, sources={"private-now": Rec, "deleted": Rec, "new": Rec})
    result = consumer.write_batch(stale)
    assert result.stale == 2 and result.written == 1
    got = store.get("c_stale", ["private-now", "deleted", "new"], ("visibility",))
    assert got["private-now"]["visibility"] == "private" and "deleted" not in got and "new" in got
    store.close()


@pytest.mark.slow
def test_a_rebalance_mid_batch_with_two_consumers_loses_and_resurrects_nothing(
        tmp_path, broker, milvus_server_uri, tiny_model_dir, photo_bytes, caplog):
    """Consumer A embeds slowly; B joins the group while A has a batch in hand. A finishes and
    commits that batch before giving its partitions up; B takes over; the final state is
    exactly the newest event per id, deletes included."""
    caplog.set_level(logging.INFO, logger="vsearch.ingest.consumer")
    sc = build_scenario(tmp_path, photo_bytes, n_ids=40, n_events=240, seed=7)
    topic, group = f"rebal-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    ends = publish(broker, topic, sc.records, partitions=4)
    coll = f"c_rebal_{uuid.uuid4().hex[:8]}"

    class SlowEmbedder(Embedder):
        def embed_arrays(self, arrays):
            time.sleep(0.4)
            return super().embed_arrays(arrays)

    def consumer(idle: float):
        return IngestConsumer(IngestSettings(bootstrap=broker, topic=topic, group=group, collection=coll,
                                             alias=None, batch_size=20, batch_ms=200, exit_when_idle_s=idle),
                              SlowEmbedder(tiny_model_dir), MilvusStore(milvus_server_uri, timeout=30),
                              Fetcher(FetchConfig(file_roots=(tmp_path,))))

    a, b = consumer(8.0), consumer(8.0)
    codes = {}
    ta = threading.Thread(target=lambda: codes.__setitem__("a", a.run()))
    ta.start()
    wait_until(lambda: sum(committed(broker, group).values()), 60, 0.1, message=None)
    tb = threading.Thread(target=lambda: codes.__setitem__("b", b.run()))
    tb.start()
    ta.join(180)
    tb.join(180)
    assert codes == {"a": 0, "b": 0}
    assert committed(broker, group) == ends
    assert milvus_state(milvus_server_uri, coll) == sc.expected
    assert "partitions revoked" in caplog.text
    with MilvusStore(milvus_server_uri) as store:
        store.drop_collection(coll)
