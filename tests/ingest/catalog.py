"""Helpers for the ingest tests: a catalog scenario with its exact expected Milvus state, and
the Kafka-side checks (committed offsets, dead-letter records). Nothing here relies on the
broker's end offsets (Tansu reports them wrong): completion is judged from the offsets the
producer was given for each record and the group's committed offsets."""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import time
from pathlib import Path

from vsearch.core.store import MilvusStore
from vsearch.ingest.events import encode, encode_key
from vsearch.local import services

BASE_TS = 1_700_000_000_000


@dataclasses.dataclass
class Scenario:
    records: list[tuple[bytes | None, bytes | None]]        # (key, value) in publish order
    expected: dict[str, dict]                               # id -> {uri, metadata, visibility}
    bad: dict[bytes, str]                                   # value -> expected dlq.stage

    @property
    def n_valid(self) -> int:
        return len(self.records) - len(self.bad)


def write_images(folder: Path, photos: list[bytes]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for i, b in enumerate(photos):
        p = folder / f"photo-{i:03d}.jpg"
        p.write_bytes(b)
        uris.append(p.as_uri())
    return uris


def build_scenario(folder: Path, photos: list[bytes], *, n_ids: int = 300, n_events: int = 3000,
                   seed: int = 0, id_prefix: str = "img") -> Scenario:
    """Initial upserts for every id, then a random mix of re-uploads, updates (uri, metadata,
    visibility), deletes of present and absent ids, out-of-order (older) upserts and deletes,
    resurrections, inline images and malformed events of every kind. The expected state is,
    for each id, its valid event with the highest (ts, position in the log)."""
    rng = random.Random(seed)
    uris = write_images(folder / "photos", photos)
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 10)
    missing = (folder / "missing.jpg").as_uri()
    ids = [f"{id_prefix}-{i:04d}" for i in range(n_ids)]
    ghosts = [f"{id_prefix}-ghost-{i:03d}" for i in range(40)]

    records: list[tuple[bytes | None, bytes | None]] = []
    valid: dict[str, tuple[tuple[int, int], dict | None]] = {}     # id -> ((ts, seq), state|None)
    cur: dict[str, int] = {}
    bad: dict[bytes, str] = {}
    seq = 0

    def put(key: str | None, ev: dict | None, raw: bytes | None = None, stage: str | None = None):
        nonlocal seq
        value = raw if raw is not None else (encode(ev) if ev is not None else None)
        records.append((encode_key(key) if key is not None else None, value))
        if stage:
            assert value not in bad
            bad[value] = stage
        elif ev is not None:
            order = (ev["ts"], seq)
            state = None if ev["op"] == "delete" else {
                "uri": ev.get("uri") or f"inline:{ev['id']}", "metadata": ev.get("metadata", {}),
                "visibility": ev.get("visibility", "public")}
            if ev["id"] not in valid or order > valid[ev["id"]][0]:
                valid[ev["id"]] = (order, state)
            cur[ev["id"]] = max(cur.get(ev["id"], 0), ev["ts"])
        seq += 1

    def upsert(i: str, ts: int, inline: bool = False, uri: str | None = None):
        ev = {"schema": 1, "op": "upsert", "id": i, "metadata": {"n": seq, "tag": rng.choice("abc")},
              "visibility": rng.choice(["public", "public", "private"]), "ts": ts}
        if inline:
            ev["image_b64"] = base64.b64encode(rng.choice(photos)).decode()
        else:
            ev["uri"] = uri or rng.choice(uris)
        return ev

    def delete(i: str, ts: int):
        return {"schema": 1, "op": "delete", "id": i, "ts": ts}

    for n, i in enumerate(ids):
        put(i, upsert(i, BASE_TS + n, inline=n % 10 == 0))
    while len(records) < n_events:
        i = rng.choice(ids)
        newer = cur.get(i, BASE_TS) + rng.randint(1, 1000)
        older = max(0, cur.get(i, BASE_TS) - rng.randint(1, 1000))
        r = rng.random()
        if r < 0.30:
            put(i, upsert(i, newer, inline=rng.random() < 0.1))            # update / re-upload
        elif r < 0.40:
            put(i, delete(i, newer))                                       # delete (present or not)
        elif r < 0.52:
            put(i, upsert(i, older))                                       # out of order: ignored
        elif r < 0.57:
            put(i, delete(i, older))                                       # out-of-order delete: ignored
        elif r < 0.62:
            g = rng.choice(ghosts)
            put(g, delete(g, BASE_TS + rng.randint(0, 10**6)))             # delete of an absent id
        elif r < 0.66:
            g = rng.choice(ghosts)                                         # older than its delete?
            put(g, upsert(g, BASE_TS + rng.randint(0, 10**6)))
        elif r < 0.80:
            put(i, upsert(i, newer, uri=rng.choice(uris)))                 # same image, new metadata
        else:
            kind = rng.randrange(10)
            tag = f"{seq}"
            if kind == 0:
                put(i, None, raw=f"{{not json {tag}".encode(), stage="validate")
            elif kind == 1:
                ev = upsert(i, newer)
                ev["schema"] = 2
                ev["metadata"]["bad"] = tag
                put(i, None, raw=encode(ev), stage="validate")
            elif kind == 2:
                ev = upsert(i, newer)
                del ev["ts"]
                ev["metadata"]["bad"] = tag
                put(i, None, raw=encode(ev), stage="validate")
            elif kind == 3:
                ev = upsert(i, newer)
                ev["visibility"] = "hidden"
                ev["metadata"]["bad"] = tag
                put(i, None, raw=encode(ev), stage="validate")
            elif kind == 4:
                ev = upsert(i, newer, uri=missing)
                ev["metadata"]["bad"] = tag
                put(i, None, raw=encode(ev), stage="fetch")
            elif kind == 5:
                ev = upsert(i, newer, uri=corrupt.as_uri())
                ev["metadata"]["bad"] = tag
                put(i, None, raw=encode(ev), stage="decode")
            elif kind == 6:
                ev = upsert(i, newer)
                ev.pop("uri")
                ev["image_b64"] = base64.b64encode(f"garbage {tag}".encode()).decode()
                put(i, None, raw=encode(ev), stage="decode")
            elif kind == 7:
                ev = upsert(i, newer)
                ev["metadata"]["bad"] = tag
                put("someone-else", None, raw=encode(ev), stage="validate")       # key != id
            elif kind == 8:
                ev = delete(i, newer)
                ev["op"] = "purge"
                ev["tag"] = tag
                put(i, None, raw=encode(ev), stage="validate")
            else:
                put(i, None, raw=json.dumps({"schema": 1, "op": "upsert", "id": i, "ts": newer,
                                             "uri": "s3://bucket/" + tag}).encode(), stage="validate")
    expected = {i: st for i, (_, st) in valid.items() if st is not None}
    return Scenario(records=records, expected=expected, bad=bad)


def publish(bootstrap: str, topic: str, records, partitions: int = 3) -> dict:
    """Send (key, value) records in order; returns {TopicPartition: last offset + 1} as the
    producer was told by the broker (not the broker's end offsets)."""
    from vsearch.core.kafka import ensure_topics, send_and_confirm
    ensure_topics(bootstrap, {topic: partitions}, compact={topic})
    return send_and_confirm(bootstrap, topic, records)


def committed(bootstrap: str, group: str) -> dict:
    from kafka.admin import KafkaAdminClient
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        return {tp: om.offset for tp, om in admin.list_group_offsets(group).get(group, {}).items()
                if om.offset >= 0}
    finally:
        admin.close()


def wait_committed(bootstrap: str, group: str, target: dict, timeout: float = 120.0, consumer=None) -> dict:
    """Wait until the group committed at least ``target`` on every partition."""
    deadline = time.monotonic() + timeout
    got: dict = {}
    while time.monotonic() < deadline:
        got = committed(bootstrap, group)
        if all(got.get(tp, 0) >= off for tp, off in target.items()):
            return got
        if consumer is not None and not consumer.alive():
            raise AssertionError(f"consumer exited ({consumer.proc.returncode}):\n{consumer.log_tail(60)}")
        time.sleep(0.3)
    tail = consumer.log_tail(60) if consumer is not None else ""
    raise AssertionError(f"group {group} committed {got}, expected {target} within {timeout}s\n{tail}")


def read_topic(bootstrap: str, topic: str, n: int, timeout: float = 30.0) -> list:
    """The first ``n`` records of ``topic`` (all partitions), or what arrived within ``timeout``."""
    from kafka import KafkaConsumer, TopicPartition
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        deadline = time.monotonic() + timeout
        parts = None
        while parts is None and time.monotonic() < deadline:
            parts = c.partitions_for_topic(topic)
            if parts is None:
                time.sleep(0.2)
        if not parts:
            return []
        c.assign([TopicPartition(topic, p) for p in parts])
        c.seek_to_beginning()
        out = []
        while len(out) < n and time.monotonic() < deadline:
            for recs in c.poll(timeout_ms=500).values():
                out += recs
        return out
    finally:
        c.close()


def milvus_state(uri: str, collection: str) -> dict[str, dict]:
    with MilvusStore(uri, timeout=30) as store:
        rows = list(store.scan(collection, ("uri", "metadata", "visibility")))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate rows in Milvus"
    return {r["id"]: {"uri": r["uri"], "metadata": r["metadata"], "visibility": r["visibility"]}
            for r in rows}


def start_consumer(tmp: Path, bootstrap: str, topic: str, group: str, milvus_uri: str, model_dir: Path,
                   *extra: str, name: str = "consumer", env: dict | None = None) -> services.Service:
    """``vsearch ingest`` as its own process, ready once its /metrics answers."""
    port = services.free_port()
    svc = services.Service(
        name, services.vsearch_argv(
            "ingest", "--bootstrap", bootstrap, "--topic", topic, "--group", group,
            "--milvus-uri", milvus_uri, "--model-dir", str(model_dir), "--threads", "1",
            "--metrics-port", str(port), "--retry-max-s", "1", "--file-roots", str(tmp), *extra),
        port=port, ready=lambda: services.http_ok(f"http://127.0.0.1:{port}/metrics"),
        log_path=tmp / f"{name}.log", env=env)
    return svc.wait_ready(60)


def metric(svc: services.Service, name: str) -> float:
    """Sum of a Prometheus metric's samples (all labels) from the consumer's /metrics, parsed
    by prometheus_client's own parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"{svc.url}/metrics", timeout=5).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)
