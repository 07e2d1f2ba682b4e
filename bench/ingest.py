"""Catalog ingest throughput and freshness, through the real Tansu broker and, with
``--milvus standalone`` (the default), the Milvus 2.3.5 standalone server of the test extras
(``--milvus lite``: Milvus Lite files):

- precomputed: ``vsearch ingest``'s pipeline (poll, validate, version check, file fetch,
  upsert, commit) with embeddings looked up from a table computed beforehand, so the figure is
  the pipeline's own overhead. Baselines in the same run: the same pipeline without the
  consumer's version cache (``version_cache=0``: a Strong read of every batch's ids), a bare
  kafka-python consume+commit loop over the same records, and bare ``MilvusStore.upsert`` of
  the same rows (``--batch-size`` rows per call, the consumer's batch size too).
- in-process embedding: the same pipeline embedding every image in process with the served
  model (``models/default``; a random-init ResNet-18 at 224 px where it is absent), against
  that Embedder's own throughput on the same photos (``try_preprocess`` + ``embed_arrays``,
  batch 32).
- freshness: 200 single upserts one after the other, each timed from the publish call to the
  moment a Strong search finds it (tiny model, default batching: --batch-ms 500);
- freshness under load (``--paced-rate``, default 5,000 events/s, the goal): precomputed
  events published at that steady rate for ``--paced-seconds``; every 100th is timed from its
  publish to the moment a Strong read by id finds it (p50/p95), and the rate reached.

Where the precomputed rate is short of the goal, the table's baselines say which stage bounds
it: the bare consume+commit loop (Kafka) and the bare upsert (Milvus) of the same rows, each
alone; the pipeline cannot be faster than the slower of the two.

    python -m bench.ingest [--milvus standalone|lite] [--events 20000] [--embed-events 192] [--batch-size 256]
                           [--fresh 200] [--paced-rate 5000] [--paced-seconds 10] [--quick]

Prints a table with the ratios. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient

from vsearch.core.kafka import GROUP_SETTINGS, ensure_topics, send_and_confirm
from vsearch.core.naming import collection_name
from vsearch.core.store import MilvusStore
from vsearch.ingest.consumer import IngestConsumer, IngestSettings
from vsearch.ingest.events import encode, encode_key, upsert_event
from vsearch.local import services
from vsearch.local.samples import TINY
from vsearch.local.samples import photos as sample_photos
from vsearch.predictor.inference import Embedder
from vsearch.predictor.model_dir import default_model_dir, read_meta
from vsearch.predictor.zoo import init_model_dir


class PrecomputedEmbedder:
    """Embeddings looked up by the image bytes' hash: the pipeline without the model."""

    def __init__(self, table: dict[str, np.ndarray], dim: int):
        self.table, self.dim = table, dim

    def embed_bytes(self, blobs, crops=None) -> np.ndarray:
        return np.stack([self.table[hashlib.sha1(b).hexdigest()] for b in blobs])

    def embed_each(self, blobs) -> list[np.ndarray]:
        return [self.table[hashlib.sha1(b).hexdigest()] for b in blobs]


def produce(bootstrap: str, topic: str, events: list[dict]) -> dict:
    return send_and_confirm(bootstrap, topic, [(encode_key(e["id"]), encode(e)) for e in events],
                            timeout=60, linger_ms=10, batch_size=256 * 1024)


def wait_committed(bootstrap: str, group: str, ends: dict, timeout: float = 600) -> float:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            got = {tp: om.offset for tp, om in admin.list_group_offsets(group).get(group, {}).items()}
            if all(got.get(tp, -1) >= off for tp, off in ends.items()):
                return time.perf_counter()
            time.sleep(0.05)
    finally:
        admin.close()
    raise TimeoutError(f"group {group} did not commit {ends} in {timeout}s")


def run_consumer(consumer: IngestConsumer) -> threading.Thread:
    t = threading.Thread(target=consumer.run, daemon=True)
    t.start()
    return t


def stop_process(stop, child) -> None:
    """Ask the consumer process to stop (``stop``: its event), and kill it after 60 s."""
    stop.set()
    child.join(60)
    if child.is_alive():
        child.kill()


def _consumer_process(kind: str, source, bootstrap: str, topic: str, group: str, coll: str,
                      milvus_uri: str, batch_size: int, stop, version_cache: int = 200_000) -> None:
    """Child process: the consumer on its own, as in production (no GIL shared with the bench)."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.ERROR)
    if kind == "precomputed":
        embedder = PrecomputedEmbedder(*source)
    else:
        embedder = Embedder(source, batch_size=32)
    store = MilvusStore(milvus_uri, timeout=60)
    consumer = IngestConsumer(IngestSettings(bootstrap=bootstrap, topic=topic, group=group, collection=coll,
                                             alias=None, batch_size=batch_size, batch_ms=200,
                                             version_cache=version_cache),
                              embedder, store)
    threading.Thread(target=lambda: (stop.wait(), consumer.request_stop()), daemon=True).start()
    consumer.run()
    store.close()


def ingest_rate(bootstrap: str, milvus_uri: str, kind: str, source, events: list[dict], tag: str,
                batch_size: int = 256, version_cache: int = 200_000) -> float:
    """events/s from the first publish to the last commit, with the consumer (its own process)
    already joined and warm."""
    topic, group = f"bench-{tag}", f"bench-{tag}"
    coll = collection_name("bench", tag)
    ensure_topics(bootstrap, {topic: 3, topic + ".dlq": 1}, compact={topic})
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    child = ctx.Process(target=_consumer_process, args=(kind, source, bootstrap, topic, group, coll,
                                                        milvus_uri, batch_size, stop, version_cache))
    child.start()
    try:
        warm = produce(bootstrap, topic, events[:1])
        wait_committed(bootstrap, group, warm, timeout=180)     # joined and warm
        t0 = time.perf_counter()
        ends = produce(bootstrap, topic, events[1:])
        t1 = wait_committed(bootstrap, group, ends)
    finally:
        stop_process(stop, child)
    with MilvusStore(milvus_uri, timeout=60) as store:
        assert store.count(coll) == len({e["id"] for e in events}), "not every event landed"
        store.drop_collection(coll)
    return (len(events) - 1) / (t1 - t0)


def paced_freshness(bootstrap: str, milvus_uri: str, source, uris: list[str], rate: float, seconds: float,
                    probe_every: int = 100, batch_size: int = 256) -> tuple[float, float, list[float]]:
    """Precomputed events published at ``rate``/s for ``seconds`` to a warm consumer (its own
    process); every ``probe_every``-th is timed from its send to a Strong read that finds it.
    Returns (publish rate reached, ingest rate to the last commit, probe latencies)."""
    topic, group, tag = "bench-paced", "bench-paced", "paced"
    coll = collection_name("bench", tag)
    ensure_topics(bootstrap, {topic: 3, topic + ".dlq": 1}, compact={topic})
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    child = ctx.Process(target=_consumer_process, args=("precomputed", source, bootstrap, topic, group, coll,
                                                        milvus_uri, batch_size, stop))
    child.start()
    pending: dict[str, float] = {}
    lat: list[float] = []
    lock = threading.Lock()
    done = threading.Event()

    def watch():
        store = MilvusStore(milvus_uri, timeout=60)
        while not (done.is_set() and not pending):
            with lock:
                ids = list(pending)
            if ids:
                found = store.get(coll, ids, ("updated_at",))     # Strong: sees every finished write
                now = time.perf_counter()
                with lock:
                    for i in found:
                        lat.append(now - pending.pop(i))
            time.sleep(0.01)
        store.close()

    try:
        warm = produce(bootstrap, topic, [upsert_event("warm", uri=uris[0])])
        wait_committed(bootstrap, group, warm, timeout=180)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, batch_size=256 * 1024)
        n = int(rate * seconds)
        futs = []
        t0 = time.perf_counter()
        for i in range(n):
            ahead = t0 + i / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
            ev = upsert_event(f"q-{i}", uri=uris[i % len(uris)], ts=1 + i)
            if i % probe_every == 0:
                with lock:
                    pending[ev["id"]] = time.perf_counter()
            futs.append(producer.send(topic, key=encode_key(ev["id"]), value=encode(ev)))
        producer.flush()
        sent = time.perf_counter()
        ends: dict = {}
        for f in futs:
            md = f.get(60)
            ends[(md.topic, md.partition)] = max(ends.get((md.topic, md.partition), 0), md.offset + 1)
        producer.close()
        from kafka import TopicPartition
        t1 = wait_committed(bootstrap, group, {TopicPartition(*k): v for k, v in ends.items()})
        done.set()
        watcher.join(120)
    finally:
        stop_process(stop, child)
    with MilvusStore(milvus_uri, timeout=60) as store:
        store.drop_collection(coll)
    return n / (sent - t0), n / (t1 - t0), lat


def raw_consume_rate(bootstrap: str, events: list[dict]) -> float:
    """Baseline: kafka-python poll + commit of the same records, nothing else."""
    topic = "bench-raw"
    ensure_topics(bootstrap, {topic: 3})
    produce(bootstrap, topic, events)
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id="bench-raw", enable_auto_commit=False,
                      auto_offset_reset="earliest", max_poll_records=256, **GROUP_SETTINGS)
    n, t0 = 0, None
    deadline = time.monotonic() + 120
    while n < len(events) and time.monotonic() < deadline:
        recs = [r for rs in c.poll(timeout_ms=200).values() for r in rs]
        if recs:
            t0 = t0 or time.perf_counter()
            n += len(recs)
            c.commit()
    t1 = time.perf_counter()
    c.close()
    return n / (t1 - t0)


def raw_upsert_rate(store: MilvusStore, rows: list[dict], batch: int = 256) -> float:
    coll = collection_name("bench", "raw-upsert")
    store.ensure_collection(coll, len(rows[0]["embedding"]))
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch):
        store.upsert(coll, rows[i:i + batch])
    dt = time.perf_counter() - t0
    store.drop_collection(coll)
    return len(rows) / dt


def freshness(bootstrap: str, store: MilvusStore, model_dir: Path, photos: list[bytes], n: int,
              folder: Path) -> list[float]:
    emb = Embedder(model_dir)
    topic, group = "bench-fresh", "bench-fresh"
    coll = collection_name("bench", "fresh")
    ensure_topics(bootstrap, {topic: 3, topic + ".dlq": 1}, compact={topic})
    consumer = IngestConsumer(IngestSettings(bootstrap=bootstrap, topic=topic, group=group,
                                             collection=coll, alias=None), emb, store)
    thread = run_consumer(consumer)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    uris = []
    for i, b in enumerate(photos):
        p = folder / f"fresh-{i}.jpg"
        p.write_bytes(b)
        uris.append(p.as_uri())
    query = np.zeros((1, emb.dim), np.float32)
    query[0, 0] = 1.0
    lat = []
    warm = produce(bootstrap, topic, [upsert_event("warm", uri=uris[0])])
    wait_committed(bootstrap, group, warm)
    for i in range(n):
        ev = upsert_event(f"fresh-{i}", uri=uris[i % len(uris)])
        t0 = time.perf_counter()
        producer.send(topic, key=encode_key(ev["id"]), value=encode(ev))
        producer.flush()
        flt = f'id == "fresh-{i}"'
        while not store.search(coll, query, k=1, filter=flt, output_fields=(), consistency="Strong")[0]:
            if time.perf_counter() - t0 > 30:
                raise TimeoutError(f"event {i} not visible after 30s")
            time.sleep(0.005)
        lat.append(time.perf_counter() - t0)
    producer.close()
    consumer.request_stop()
    thread.join(30)
    store.drop_collection(coll)
    return lat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20000, help="events for the precomputed run")
    ap.add_argument("--embed-events", type=int, default=192, help="events for the in-process embedding run")
    ap.add_argument("--fresh", type=int, default=200, help="single events for freshness")
    ap.add_argument("--paced-rate", type=float, default=5000.0, help="events/s of the freshness-under-load run")
    ap.add_argument("--paced-seconds", type=float, default=10.0, help="seconds of the freshness-under-load run (0: skip)")
    ap.add_argument("--milvus", choices=("standalone", "lite"), default="standalone",
                    help="the Milvus 2.3.5 standalone server, or Milvus Lite files")
    ap.add_argument("--batch-size", type=int, default=256, help="consumer batch size of the precomputed runs")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.events, args.embed_events, args.fresh, args.paced_seconds = 2000, 64, 20, 2
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.ERROR)

    torch.set_num_threads(max(1, torch.get_num_threads()))

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    photos = sample_photos(64)
    folder = tmp / "photos"
    folder.mkdir()
    uris = []
    for i, b in enumerate(photos):
        (folder / f"{i}.jpg").write_bytes(b)
        uris.append((folder / f"{i}.jpg").as_uri())

    broker = services.start_broker(log_path=tmp / "broker.log")
    milvus = None
    if args.milvus == "standalone":
        milvus = services.start_milvus_standalone(tmp / "milvus", log_path=tmp / "milvus.log", timeout=900)
    where = "Milvus 2.3.5 standalone" if milvus else "Milvus Lite"

    def uri(name: str) -> str:
        # Milvus Lite: one file per measurement (a file is opened by one process at a time)
        return milvus.uri if milvus else str(tmp / f"{name}.db")

    rows_out = []

    class Rows(list):
        def append(self, row):
            print("  " + " | ".join(str(c) for c in row[:3]), flush=True)
            super().append(row)

        def __iadd__(self, rows):
            for r in rows:
                self.append(r)
            return self

    rows_out = Rows()
    try:
        # 1. pipeline overhead with precomputed embeddings
        dim = 512
        rng = np.random.default_rng(0)
        table = {}
        for b in photos:
            v = rng.normal(size=dim).astype(np.float32)
            table[hashlib.sha1(b).hexdigest()] = v / np.linalg.norm(v)
        events = [upsert_event(f"p-{i}", uri=uris[i % len(uris)], metadata={"i": i}, ts=1 + i)
                  for i in range(args.events)]
        # the same events without the version cache (a Strong read of every batch's ids, and
        # again before its write): what the cache buys, side by side
        strong = ingest_rate(broker.bootstrap, uri("strong"), "precomputed", (table, dim), events, "strong",
                             batch_size=args.batch_size, version_cache=0)
        pre = ingest_rate(broker.bootstrap, uri("pre"), "precomputed", (table, dim), events, "pre",
                          batch_size=args.batch_size)
        raw = raw_consume_rate(broker.bootstrap, events)
        vecs = list(table.values())
        with MilvusStore(uri("raw"), timeout=60) as store:
            up = raw_upsert_rate(store, [{"id": f"r-{i}", "embedding": vecs[i % len(vecs)], "uri": uris[0],
                                          "metadata": {"i": i}, "visibility": "public", "updated_at": 1}
                                         for i in range(args.events)], batch=args.batch_size)
        bound = "Kafka consume+commit" if raw < up else "Milvus upsert"
        rows_out += [(f"ingest, precomputed embeddings (dim {dim}, {args.events} events, batches of "
                      f"{args.batch_size}, {where})", f"{pre:,.0f} events/s",
                      f"the same without the version cache (Strong reads): {strong:,.0f} events/s", pre / strong),
                     ("", "", f"bare consume+commit {raw:,.0f} msg/s", pre / raw),
                     ("", "", f"bare MilvusStore.upsert, batches of {args.batch_size}: {up:,.0f} rows/s", pre / up),
                     ("", f"goal 5,000: {pre / 5000:.2f}", f"slower stage alone: {bound}", pre / min(raw, up))]
        if args.paced_seconds > 0:
            sent, got, lat = paced_freshness(broker.bootstrap, uri("paced"), (table, dim), uris, args.paced_rate,
                                             args.paced_seconds, batch_size=args.batch_size)
            p50, p95 = np.percentile(lat, 50), np.percentile(lat, 95)
            rows_out.append((f"freshness at a steady {args.paced_rate:,.0f} events/s offered ({where}, "
                             f"{len(lat)} probes)", f"p50 {p50:.3f} s, p95 {p95:.3f} s",
                             f"published {sent:,.0f}/s, ingested {got:,.0f}/s; goal p95 <= 1 s", p95 / 1.0))

        # 2. in-process embedding vs the embedder's own throughput
        # the served model (models/default) when present, else a ResNet-18 (random init, 224 px)
        model_dir = default_model_dir()
        if not (model_dir / "config.json").exists():
            model_dir = tmp / "resnet18"
            init_model_dir("resnet18", model_dir, name="bench-resnet18", version="1")
        model_label = f"{read_meta(model_dir).name}, {read_meta(model_dir).image_size} px"
        sample = [photos[i % len(photos)] for i in range(args.embed_events)]

        def embedder_alone() -> float:
            emb = Embedder(model_dir, batch_size=32)
            emb.embed_arrays(np.stack(emb.try_preprocess(sample[:32])))          # warm-up
            t0 = time.perf_counter()
            for i in range(0, len(sample), 32):
                emb.embed_arrays(np.stack(emb.try_preprocess(sample[i:i + 32])))
            rate = len(sample) / (time.perf_counter() - t0)
            emb.close()
            return rate

        own_before = embedder_alone()
        # distinct bytes per event, so that no embedding is shared
        embed_events = []
        for i in range(args.embed_events):
            p = folder / f"e-{i}.jpg"
            p.write_bytes(sample[i] + f"{i}".encode())     # trailing bytes after JPEG EOI: same image
            embed_events.append(upsert_event(f"e-{i}", uri=p.as_uri(), ts=1 + i))
        inproc = ingest_rate(broker.bootstrap, uri("embed"), "model", str(model_dir), embed_events, "embed",
                             batch_size=64)
        own_after = embedder_alone()
        own = max(own_before, own_after)
        rows_out.append((f"ingest, in-process embedding ({model_label}, {where})", f"{inproc:,.1f} events/s",
                         f"Embedder alone {own_before:,.1f} / {own_after:,.1f} img/s (before / after; "
                         "ratio to the faster)", inproc / own))

        # 3. freshness
        tiny = tmp / "tiny"
        init_model_dir("resnet18", tiny, name="bench-tiny", version="1", **TINY["resnet18"])
        with MilvusStore(uri("fresh"), timeout=60) as store:
            lat = np.array(freshness(broker.bootstrap, store, tiny, photos, args.fresh, folder))
        p50, p95 = np.percentile(lat, 50), np.percentile(lat, 95)
        rows_out.append((f"freshness, publish -> visible in a Strong search ({args.fresh} events, "
                         "--batch-ms 500)", f"p50 {p50:.3f} s, p95 {p95:.3f} s", "goal p95 <= 2 s", p95 / 2.0))
    finally:
        broker.stop()
        if milvus is not None:
            milvus.stop()

    print()
    print("| measurement | result | baseline (same run) | ratio |")
    print("| --- | --- | --- | --- |")
    for name, result, base, ratio in rows_out:
        print(f"| {name} | {result} | {base} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
