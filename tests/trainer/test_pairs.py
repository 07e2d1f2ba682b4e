"""Supervised pairs: (query image, clicked image) from a CSV or from click events on a real
Kafka-protocol broker, trained with InfoNCE and in-batch negatives."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer

from vsearch.core import search_events
from vsearch.core.store import MilvusStore
from vsearch.predictor.inference import Embedder
from vsearch.predictor.model_dir import read_meta
from vsearch.predictor.preprocess import PreprocessConfig
from vsearch.trainer.data import DataError, ImageCache, click_pairs_from_kafka, read_pairs_csv
from vsearch.trainer.negatives import mine_hard_negatives
from vsearch.trainer.train import TrainConfig, train


def same_class_pairs(folder: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        pairs += [(files[i], files[i + 1]) for i in range(0, len(files) - 1, 2)]
    return pairs


def pair_config(data, out, init, **kw):
    base = dict(data=str(data), out=str(out), init=str(init), batch_size=16, lr=3e-3, temperature=0.1,
                warmup_steps=1, workers=0, log_every=1, progress=False, version="p1")
    return TrainConfig(**{**base, **kw})


def losses_of(out):
    return [json.loads(line)["loss"] for line in open(out / "train_log.jsonl")
            if json.loads(line)["event"] == "step"]


@pytest.mark.slow
def test_pairs_csv_trains_with_infonce(photo_folder, tiny_model_dir, tmp_path):
    pairs = same_class_pairs(photo_folder)
    csv = tmp_path / "pairs.csv"
    lines = ["query,clicked"] + [f"{q.relative_to(photo_folder.parent)},{c}" for q, c in pairs]
    csv.write_text("\n".join(lines) + "\n")
    # relative paths are relative to the CSV
    (tmp_path / photo_folder.name).symlink_to(photo_folder)
    assert len(read_pairs_csv(csv)) == 16

    out = train(pair_config(csv, tmp_path / "m", tiny_model_dir, max_steps=12))
    losses = losses_of(out)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    meta = read_meta(out)
    assert meta.training["method"] == "click-pairs-infonce"
    assert meta.training["data"]["usable_pairs"] == 16


def test_a_query_crop_is_cut_from_the_original_before_training(photo_folder, tmp_path):
    q, c = same_class_pairs(photo_folder)[0]
    csv = tmp_path / "pairs.csv"
    csv.write_text(f'query,clicked,crop\n{q},{c},"0,0,0.5,1"\n{q},{c},\n')
    (cropped, _), (whole, _) = read_pairs_csv(csv)
    assert cropped == f"{q}#crop=0,0,0.5,1" and whole == str(q)
    cache = ImageCache([cropped, whole], PreprocessConfig(image_size=32, resize_size=2000))
    (w, h), (w2, h2) = cache[whole].size, cache[cropped].size
    assert h2 == h and abs(w2 - w / 2) <= 1


def test_pairs_csv_errors_name_the_problem(tmp_path):
    bad = tmp_path / "p.csv"
    bad.write_text("a,b\nx,y\n")
    with pytest.raises(DataError, match="query column"):
        read_pairs_csv(bad)
    empty = tmp_path / "e.csv"
    empty.write_text("query,clicked\nx.jpg,\n")
    with pytest.raises(DataError, match="line 2"):
        read_pairs_csv(empty)
    crop = tmp_path / "c.csv"
    crop.write_text('query,clicked,crop\nx.jpg,y.jpg,"0.5,0,0.2,1"\n')
    with pytest.raises(DataError, match="line 2: crop box is empty"):
        read_pairs_csv(crop)


def test_unreadable_pair_images_are_reported_not_silently_lost(photo_folder, tiny_model_dir, tmp_path):
    pairs = same_class_pairs(photo_folder)
    csv = tmp_path / "pairs.csv"
    rows = [f"{q},{c}" for q, c in pairs] + [f"{pairs[0][0]},{tmp_path / 'missing.jpg'}"]
    csv.write_text("query,clicked\n" + "\n".join(rows) + "\n")
    out = train(pair_config(csv, tmp_path / "m", tiny_model_dir, max_steps=1))
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    unreadable = [r for r in log if r["event"] == "unreadable"]
    assert unreadable and str(tmp_path / "missing.jpg") in unreadable[0]["items"]
    assert read_meta(out).training["data"]["usable_pairs"] == 16


@pytest.mark.slow
def test_click_pairs_from_search_events_on_kafka(broker, photo_folder, tiny_model_dir, tmp_path):
    topic = f"search.events.{uuid.uuid4().hex[:8]}"
    pairs = same_class_pairs(photo_folder)
    producer = KafkaProducer(bootstrap_servers=broker)
    now = int(time.time() * 1000)
    for i, (q, c) in enumerate(pairs):
        base = {"schema": 1, "query_id": f"q{i}", "query_hash": "0" * 64, "query_uri": q.as_uri(),
                "crop": [0.0, 0.0, 0.5, 0.5] if i == 0 else None, "model_version": "m1", "ts": now}
        producer.send(topic, key=f"q{i}".encode(), value=search_events.encode(
            {**base, "type": "impression", "results": [{"id": c.name, "rank": 1, "score": 0.9}]}))
        producer.send(topic, key=f"q{i}".encode(), value=search_events.encode(
            {**base, "type": "click", "item_id": c.name, "item_uri": c.as_uri(), "rank": 1}))
    producer.send(topic, value=b"not json")
    producer.send(topic, value=search_events.encode(
        {"schema": 1, "type": "click", "query_id": "qx", "query_hash": "0", "query_uri": None,
         "item_id": "x", "item_uri": None, "rank": 1, "model_version": "m1", "ts": now}))
    producer.flush()
    producer.close()

    got, stats = click_pairs_from_kafka(broker, topic, idle_s=2.0)
    # the query of a click on a crop is that crop of the query image
    expected = [(q.as_uri() + ("#crop=0,0,0.5,0.5" if i == 0 else ""), c.as_uri())
                for i, (q, c) in enumerate(pairs)]
    assert sorted(got) == sorted(expected)
    # the click on "qx" has no impression on the log: it does not count
    assert stats == {"events": 2 * len(pairs) + 2, "clicks": len(pairs) + 1, "counted_clicks": len(pairs),
                     "clicks_not_counted": 1, "pairs": len(pairs), "bad_events": 1, "clicks_without_uris": 0}

    out = train(pair_config(f"kafka://{broker}/{topic}", tmp_path / "m", tiny_model_dir, max_steps=2))
    data = read_meta(out).training["data"]
    assert data["usable_pairs"] == len(pairs) and data["bad_events"] == 1


@pytest.mark.slow
def test_hard_negatives_mined_from_the_index_are_near_but_not_clicked(photo_folder, tiny_model_dir,
                                                                      milvus_lite_uri, tmp_path):
    files = sorted(photo_folder.rglob("*.jpg"))
    emb = Embedder(tiny_model_dir)
    vectors = emb.embed_bytes([f.read_bytes() for f in files])
    pairs = [(str(q), str(c)) for q, c in same_class_pairs(photo_folder)]
    with MilvusStore(milvus_lite_uri) as store:
        store.ensure_collection("images__tiny__1", dim=vectors.shape[1])
        store.upsert("images__tiny__1", [
            {"id": f"i{i}", "embedding": v, "uri": f.as_uri(), "metadata": {}, "visibility": "public",
             "updated_at": 1} for i, (f, v) in enumerate(zip(files, vectors))])
        negatives, stats = mine_hard_negatives(pairs, emb, store, "images__tiny__1", k=5, per_query=2)
        nearest = store.search("images__tiny__1", vectors[:1], k=5, output_fields=("uri",))[0]
    emb.close()
    assert stats["queries"] == 16 and stats["queries_with_negatives"] == 16 and stats["negatives"] == 32
    for q, c in pairs:
        uris = negatives[q]
        assert Path(q).as_uri() not in uris and Path(c).as_uri() not in uris
    # the first photo is a query: its negatives are its nearest neighbours minus itself and its click
    clicked = {Path(c).as_uri() for q, c in pairs if q == str(files[0])}
    expected = [h["uri"] for h in nearest if h["uri"] != files[0].as_uri() and h["uri"] not in clicked][:2]
    assert negatives[str(files[0])] == expected

    csv = tmp_path / "pairs.csv"
    csv.write_text("query,clicked\n" + "\n".join(f"{q},{c}" for q, c in pairs) + "\n")
    out = train(pair_config(csv, tmp_path / "m", tiny_model_dir, max_steps=2,
                            hard_negatives_from=milvus_lite_uri, hard_negatives_collection="images__tiny__1"))
    data = read_meta(out).training["data"]
    assert data["hard_negatives"]["negatives"] == 32 and data["usable_pairs"] == 16
