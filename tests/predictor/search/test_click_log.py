"""The click log counts a click once per (query, item), and only with its impression: through a
real search service, the real broker, ``vsearch ctr`` and the trainer's click pairs (one rule,
``core.search_events.count_clicks``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import requests
from kafka import KafkaProducer

from vsearch.core import search_events
from vsearch.predictor.search.ctr import read_events
from vsearch.trainer.data import click_pairs_from_kafka


def post_events(server, events: list[dict]) -> None:
    for i in range(0, len(events), 100):
        r = requests.post(f"{server.url}/events", json=events[i:i + 100], timeout=30)
        assert r.status_code == 200, r.text[:300]


def wait_for(bootstrap: str, query_ids: set[str], n: int, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    got: list[dict] = []
    while time.monotonic() < deadline:
        got = [r for r in read_events(bootstrap, idle_timeout=1.5) if r.get("query_id") in query_ids]
        if len(got) >= n:
            return got
        time.sleep(0.5)
    raise AssertionError(f"{len(got)} of {n} search events arrived")


def test_replayed_clicks_count_once_and_clicks_need_their_impression(search_server, tmp_path):
    cat = search_server.catalog
    # one search (k=5, impression deferred), 3 replayed impressions, 500 replayed clicks on one result
    body = search_server.search(cat.photos["photo-04"], k=5, log_impression="false").json()
    qid, item = body["query_id"], body["results"][1]["id"]
    post_events(search_server, [{"type": "impression", "token": body["token"]}] * 3)
    post_events(search_server, [{"type": "click", "token": body["token"], "item_id": item}] * 500)
    # another search whose impression never comes: its click is logged, but never counted
    lone = search_server.search(cat.photos["photo-06"], k=5, log_impression="false").json()
    post_events(search_server, [{"type": "click", "token": lone["token"], "item_id": lone["results"][0]["id"]}])

    raw = wait_for(search_server.bootstrap, {qid, lone["query_id"]}, 3 + 500 + 1)
    assert len([r for r in raw if r["type"] == "click"]) == 501

    # the same records on a topic of their own: what `vsearch ctr` and the trainer read
    topic = f"search.events.replay.{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=search_server.bootstrap)
    for rec in raw:
        producer.send(topic, key=rec["query_id"].encode(), value=search_events.encode(rec))
    producer.flush()
    producer.close()

    out = subprocess.run([sys.executable, "-m", "vsearch", "ctr", "--bootstrap", search_server.bootstrap,
                          "--topic", topic, "--idle-timeout", "2", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads(out.stdout)
    assert stats[body["model_version"]] == {"impressions": 1, "clicks": 1, "ctr": 1.0, "searches_with_click": 1.0}
    assert stats["_clicks_not_counted"] == {"duplicate": 499, "without_impression": 1, "not_in_results": 0}

    pairs, pstats = click_pairs_from_kafka(search_server.bootstrap, topic, idle_s=2.0)
    assert len(pairs) == 1 and pstats["counted_clicks"] == 1 and pstats["clicks"] == 501
    assert pstats["clicks_not_counted"] == 500
    assert pairs[0][0].startswith("file://") and pairs[0][1].startswith("file://")   # item_uri read at click time
