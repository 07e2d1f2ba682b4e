"""The offline verdict of a trained model (``vsearch judge``, ``vsearch train --judge-against``):
held-out click pairs of real Caltech photos, searched in the catalog with the new model, the
serving one, raw pixels and random init; the verdict written where the rollout gate reads it."""

from __future__ import annotations

import csv
import json
import uuid

import pytest
from kafka import KafkaProducer

from bench.clicks import simulate
from tests.fixtures.operators import model_copy
from vsearch.cli import build_parser
from vsearch.core import search_events
from vsearch.predictor.model_dir import default_model_dir, read_meta
from vsearch.predictor.zoo import init_model_dir
from vsearch.trainer.data import DataError
from vsearch.trainer.judge import LOST, held_out, read_pairs, split_pairs
from vsearch.trainer.train import TrainConfig, load_pairs


def run(*argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return args.handler(args)


@pytest.fixture(scope="module")
def pairs_csv(photo_folder, tmp_path_factory):
    """Each photo searched, the next two photos of its class clicked (as users of a good search
    would): 64 pairs of 32 queries."""
    by_class: dict[str, list] = {}
    for p in sorted(photo_folder.rglob("*.jpg")):
        by_class.setdefault(p.parent.name, []).append(p)
    path = tmp_path_factory.mktemp("judge") / "pairs.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["query", "clicked"])
        for photos in by_class.values():
            for i, p in enumerate(photos):
                for step in (1, 2):
                    w.writerow([p, photos[(i + step) % len(photos)]])
    return path


def test_a_random_model_loses_to_the_serving_default_and_the_verdict_says_why(pairs_csv, photo_folder, tmp_path,
                                                                              capsys):
    serving = model_copy(default_model_dir(), tmp_path / "serving", "2")
    init_model_dir("resnet-tiny", tmp_path / "new", name="vsearch-default", version="random", seed=7)
    rc = run("judge", "--model-dir", str(tmp_path / "new"), "--against", str(serving), "--data", str(pairs_csv),
             "--catalog", str(photo_folder), "--holdout", "0.5")
    assert rc == LOST, capsys.readouterr()
    ev = read_meta(tmp_path / "new").evaluation
    v = ev["verdict"]
    assert v["beats_all"] is False and v["beats_serving"] is False and v["serving"] == "vsearch-default:2"
    lost = v["against"]["serving vsearch-default:2"]
    assert lost["kind"] == "serving" and lost["beats"] is False
    assert lost["metrics"]["mrr"]["model"] < lost["metrics"]["mrr"]["reference"]
    assert "vsearch-default:random DOES NOT BEAT serving vsearch-default:2 (mrr" in v["text"]
    ci = lost["mrr_difference"]
    assert ci["low"] <= ci["mean"] <= ci["high"] and ci["queries"] == ev["data"]["held_out_queries"]
    assert ci["mean"] == pytest.approx(lost["metrics"]["mrr"]["model"] - lost["metrics"]["mrr"]["reference"], abs=2e-4)
    assert {a["kind"] for a in v["against"].values()} == {"serving", "raw-pixels", "random-init"}
    # what the gate reads: the verdict's metric names are figures of evaluation.metrics
    assert set(v["metrics"]) <= set(ev["metrics"]) and ev["serving"]["metrics"]["mrr"] == lost["metrics"]["mrr"][
        "reference"]
    held = ev["data"]["held_out_queries"]
    assert 8 <= held <= 24 and ev["data"]["candidates"] == 32 and ev["queries_evaluated"] == held
    assert (tmp_path / "new" / "evaluation" / "judge.json").exists()

    # the other way round: the trained default beats the random model serving
    run("judge", "--model-dir", str(serving), "--against", str(tmp_path / "new"), "--data", str(pairs_csv),
        "--catalog", str(photo_folder), "--holdout", "0.5")
    v = read_meta(serving).evaluation["verdict"]
    assert v["beats_serving"] is True and v["against"]["serving vsearch-default:random"]["beats"] is True, v["text"]
    assert v["beats_all"] == all(a["beats"] for a in v["against"].values())


def test_the_split_is_by_query_and_seeded_and_bad_input_is_refused(pairs_csv, tmp_path):
    pairs, _ = read_pairs(str(pairs_csv))
    train, held = split_pairs(pairs, 0.5, 0)
    assert {pairs[i][0] for i in train}.isdisjoint({pairs[i][0] for i in held}) and len(train) + len(held) == 64
    assert split_pairs(pairs, 0.5, 0) == (train, held) and split_pairs(pairs, 0.5, 1) != (train, held)
    assert held_out(f"{pairs[held[0]][0]}#crop=0,0,0.5,0.5", 0.5, 0)     # every crop of an image on its side
    with pytest.raises(DataError, match="pairs CSV or kafka"):
        read_pairs(str(tmp_path))
    init_model_dir("resnet-tiny", tmp_path / "m", seed=1)
    assert run("judge", "--model-dir", str(tmp_path / "m"), "--against", str(tmp_path / "nothing"),
               "--data", str(pairs_csv)) == 2


def test_train_judges_against_the_serving_model_on_clicks_it_never_trained_on(broker, photo_folder, tiny_model_dir,
                                                                              tmp_path):
    photos = sorted(photo_folder.rglob("*.jpg"))
    records, _ = simulate(queries=12, sessions=6, items=6, seed=5, uri=lambda q, i: photos[(3 * q + i) % 32].as_uri(),
                          query_uri=lambda q: photos[(3 * q + 15) % 32].as_uri())
    topic = f"search.events.{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=broker, linger_ms=20)
    for rec in records:
        producer.send(topic, key=rec["query_id"].encode(), value=search_events.encode(rec))
    producer.flush()
    producer.close()
    data, out = f"kafka://{broker}/{topic}", tmp_path / "new"
    assert run("train", "--data", data, "--init", str(tiny_model_dir), "--catalog", str(photo_folder),
               "--out", str(out), "--max-steps", "2", "--batch-size", "16", "--workers", "0", "--no-progress",
               "--judge-against", str(default_model_dir()), "--version", "j1") == 0
    meta = read_meta(out)
    trained = meta.training["data"]
    assert trained["holdout"] == 0.2 and trained["held_out_pairs"] > 0
    assert trained["pairs"] + trained["held_out_pairs"] == trained["counted_clicks"]
    # the training side never sees a held-out query
    got = load_pairs(TrainConfig(data=data, out="", holdout=0.2))
    assert got.pairs and not any(held_out(q, 0.2, 0) for q, _ in got.pairs)
    assert not any(held_out(q, 0.2, 0) for q in got.negatives)
    v = meta.evaluation["verdict"]
    serving = f"{read_meta(default_model_dir()).name}:{read_meta(default_model_dir()).version}"
    assert v["serving"] == serving and f"serving {serving}" in v["against"]
    assert v["beats_all"] == all(a["beats"] for a in v["against"].values())
    assert meta.evaluation["data"]["held_out_queries"] == trained["held_out_queries"]
    report = json.loads((out / "evaluation" / "judge.json").read_text())
    assert [r["kind"] for r in report["results"]] == ["model", "serving", "raw-pixels", "random-init"]
