"""Search events: the producer never fails a search, keeps records while Kafka is down (bounded,
counted) and delivers them once it is back; ``vsearch ctr`` reads them per model version."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from kafka import KafkaProducer

from tests.fixtures.waiting import wait_until
from vsearch.core import search_events
from vsearch.local.services import free_port, start_broker
from vsearch.predictor.search.ctr import ctr_table, read_events
from vsearch.predictor.search.event_log import EventLog


def impression(qid, mv="m__1", n=3):
    return {"schema": 1, "type": "impression", "query_id": qid, "query_hash": "h", "query_uri": None,
            "crop": None, "model_version": mv, "ts": 1,
            "results": [{"id": f"i{r}", "rank": r + 1, "score": 0.5} for r in range(n)]}


def click(qid, item, mv="m__1"):
    return {"schema": 1, "type": "click", "query_id": qid, "query_hash": "h", "query_uri": None,
            "crop": None, "item_id": item, "item_uri": None, "rank": 1, "model_version": mv, "ts": 2}


def test_events_wait_for_kafka_bounded_then_arrive(tmp_path):
    port = free_port()
    events = EventLog(f"127.0.0.1:{port}", max_buffer=3, send_timeout=2.0)   # nothing listens yet
    try:
        for i in range(4):
            events.emit(impression(f"q{i}"))        # returns at once: Kafka is not even there
        # the sender tries, fails, and keeps them
        wait_until(lambda: events.failures != 0, 30, 0.1, message=None)
        assert events.failures >= 1 and events.sent == 0
        assert events.dropped == 1                  # bounded: the oldest went, and it was counted
        assert events.pending() == 3
        assert "NoBrokersAvailable" in events.last_error or "Kafka" in events.last_error
        with start_broker(port=port, log_path=tmp_path / "broker.log") as broker:
            assert events.flush(timeout=60), f"not delivered: {events.last_error}"
            assert events.sent == 3
            got = [r for r in read_events(broker.bootstrap, idle_timeout=2.0)]
            assert sorted(r["query_id"] for r in got) == ["q1", "q2", "q3"]
    finally:
        events.close(timeout=2)


def test_ctr_per_model_version_counts_each_event_once():
    # an online experiment's failed search (an "error" event) is neither impression nor click;
    # interleaved results (two versions merged) have a row of their own
    exp = {"id": "exp-0123456789abcdef", "design": "interleave", "arm": "interleaved", "unit": "0" * 16}
    error = {"schema": 1, "type": "error", "query_id": "e", "model_version": "new", "collection": "c",
             "experiment": {**exp, "arm": "candidate"}, "status": 503, "reason": "down", "ts": 3}
    assert search_events.decode(search_events.encode(error)) == error
    records = [impression("a", "old"), impression("b", "old"), impression("c", "new"),
               impression("d", "new"), click("a", "i0", "old"), click("a", "i0", "old"),   # duplicate
               click("c", "i0", "new"), click("c", "i1", "new"), click("d", "i2", "new"),
               impression("a", "old"), {"_bad": "not JSON"}, error,
               {**impression("x", "old"), "experiment": exp}, {**click("x", "i0", "old"), "experiment": exp}]
    stats = ctr_table(records)
    assert stats["old"] == {"impressions": 2, "clicks": 1, "ctr": 0.5, "searches_with_click": 0.5}
    assert stats["new"] == {"impressions": 2, "clicks": 3, "ctr": 1.5, "searches_with_click": 1.0}
    assert stats["old (interleaved)"] == {"impressions": 1, "clicks": 1, "ctr": 1.0, "searches_with_click": 1.0}
    assert stats["_undecodable_records"] == {"count": 1}
    assert stats["_clicks_not_counted"] == {"duplicate": 1, "without_impression": 0, "not_in_results": 0}


def test_vsearch_ctr_reads_the_topic(tmp_path):
    with start_broker(log_path=tmp_path / "broker.log") as broker:
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        for rec in [impression("a"), impression("b"), click("a", "i1")]:
            producer.send(search_events.TOPIC, key=rec["query_id"].encode(), value=search_events.encode(rec))
        producer.send(search_events.TOPIC, value=b"garbage")
        producer.flush()
        producer.close()
        out = subprocess.run([sys.executable, "-m", "vsearch", "ctr", "--bootstrap", broker.bootstrap,
                              "--idle-timeout", "2", "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout)
        assert stats["m__1"]["impressions"] == 2 and stats["m__1"]["clicks"] == 1
        assert stats["m__1"]["ctr"] == 0.5 and stats["_undecodable_records"]["count"] == 1
        table = subprocess.run([sys.executable, "-m", "vsearch", "ctr", "--bootstrap", broker.bootstrap,
                                "--idle-timeout", "2"], capture_output=True, text=True, timeout=60)
        assert "m__1" in table.stdout and "0.500" in table.stdout


def test_an_oversized_event_is_dropped_and_the_queue_behind_it_flows(broker):
    """The audit's 1.38 MB impression ahead of 20 ordinary ones: it is dropped with a logged
    reason and a count, the 20 arrive. Twice: once caught when emitted (over the log's record
    limit), once refused by the producer itself (the log's limit raised past the producer's 1 MiB)."""
    for limit, reason in ((900_000, "too_large"), (4_000_000, "refused")):
        topic = f"search.events.big.{uuid.uuid4().hex[:8]}"
        events = EventLog(broker, topic=topic, send_timeout=5.0, max_record_bytes=limit)
        try:
            big = impression("big", n=100)
            for r in big["results"]:
                r["note"] = "x" * 13_800
            assert 1_300_000 < len(search_events.encode(big)) < 1_500_000
            events.emit(big)
            for i in range(20):
                events.emit(impression(f"q{i}"))
            assert events.flush(timeout=30), (reason, events.pending(), events.last_error)
            assert events.sent == 20 and events.dropped == 1, (reason, events.sent, events.dropped)
            got = list(read_events(broker, topic, idle_timeout=2.0))
            assert sorted(r["query_id"] for r in got) == sorted(f"q{i}" for i in range(20))
        finally:
            events.close(timeout=2)
