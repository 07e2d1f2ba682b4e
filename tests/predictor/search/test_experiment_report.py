"""``vsearch experiment report`` reads the experiments' search events from a real broker (Tansu):
the newest experiment by default, a table, JSON and a PNG of CTR per arm over time."""

from __future__ import annotations

import json
import uuid

from kafka import KafkaProducer
from PIL import Image

from bench.experiment import Simulation, World, experiment_events, simulate
from vsearch.cli import main
from vsearch.core import search_events


def test_report_of_the_newest_experiment_as_table_json_and_png(broker, tmp_path, capsys):
    topic = f"search.events.exp.{uuid.uuid4().hex[:8]}"
    world = World(candidate_signal=3.0, bank=2000)
    older = experiment_events(simulate(Simulation(world, 1), "ab", 300, 0.5), exp_id="exp-000000000000000a")
    newer = experiment_events(simulate(Simulation(world, 2), "interleave", 600, 1.0), exp_id="exp-000000000000000b")
    start = 1_764_670_000_000
    for recs, offset in ((older, 0), (newer, 3_600_000)):
        for r in recs:
            r["ts"] = start + offset + r["ts"] * 1000
    producer = KafkaProducer(bootstrap_servers=broker)
    for rec in older + newer:
        producer.send(topic, key=rec["query_id"].encode(), value=search_events.encode(rec))
    producer.send(topic, value=b"garbage")
    producer.flush()
    producer.close()

    args = ["experiment", "report", "--bootstrap", broker, "--topic", topic, "--idle-timeout", "3"]
    png = tmp_path / "ctr.png"
    assert main([*args, "--json", "--plot", str(png)]) == 0           # the `vsearch` entry point's main
    r = json.loads(capsys.readouterr().out)
    assert (r["experiment"], r["design"]) == ("exp-000000000000000b", "interleave")       # the newest
    assert set(r["experimentsSeen"]) == {"exp-000000000000000a", "exp-000000000000000b"}
    assert r["decision"] == "promote" and r["interleave"]["wins"] > r["interleave"]["losses"]
    assert r["counts"]["undecodable"] == 1 and len(r["timeline"]) > 10
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 600

    # a table of the older experiment; a missing one
    assert main([*args, "--experiment", "exp-000000000000000a"]) == 0
    table = capsys.readouterr().out
    assert "experiment exp-000000000000000a (ab)" in table and "decision: " in table
    assert table.count("\nserving ") == 1 and "\ncandidate " in table
    assert main([*args, "--experiment", "exp-ffffffffffffffff"]) == 1
    assert "is not on the topic" in capsys.readouterr().err
