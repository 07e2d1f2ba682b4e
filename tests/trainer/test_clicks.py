"""Clicks -> training data: the position-based click model recovers a known position bias,
inverse-propensity weights undo it, skipped results above a click become negatives; read from
a real ``search.events`` topic and trained on with the catalog's SimCLR batches mixed in."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from kafka import KafkaProducer

from bench.clicks import per_item_ctr, simulate
from vsearch.core import search_events
from vsearch.predictor.model_dir import read_meta
from vsearch.trainer.clicks import click_pairs, fit_pbm
from vsearch.trainer.train import TrainConfig, train

THETA = (1.0, 0.7, 0.5, 0.35, 0.25, 0.2)


def test_em_recovers_the_known_examination_and_ips_removes_the_position_bias():
    records, truth = simulate(queries=150, sessions=30, items=6, theta=THETA, seed=1)
    log = search_events.count_clicks(records)
    got = click_pairs(log)
    assert got.model.identifying_pairs > 0.9 * len(truth)     # items seen at several ranks
    assert np.abs(got.model.examination - np.array(THETA)).max() < 0.03, got.model.examination

    # raw click-through rates credit the position; the IPS-weighted ones are unbiased
    ctr = per_item_ctr(log, got.model)
    raw, ips = (np.array([ctr[k][i] - g for k, g in truth.items()]) for i in (0, 1))
    assert raw.mean() < -0.15 and abs(ips.mean()) < 0.02
    assert np.abs(ips).mean() < 0.6 * np.abs(raw).mean()
    table = {r["rank"]: r for r in got.stats["propensities"]}
    assert table[1]["ctr"] / table[6]["ctr"] > 1.5 * table[1]["ips_ctr"] / table[6]["ips_ctr"]

    # one pair per click, weighted by its rank's inverse propensity (mean 1); the results shown
    # above a click and not clicked are the query's negatives
    clicks = log.clicks
    assert len(got.pairs) == len(clicks) and np.mean(got.weights) == pytest.approx(1.0)
    w_of = {c["rank"]: w for c, w in zip(clicks, got.weights)}
    assert w_of[4] / w_of[1] == pytest.approx(got.model.examination[0] / got.model.examination[3], rel=1e-6)
    # (unless the same query clicked them in another search)
    first = next(c for c in clicks if c["rank"] == 3)
    imp = log.impressions[first["query_id"]]
    ever_clicked = {c["item_uri"] for c in clicks if c["query_uri"] == first["query_uri"]}
    skipped = {r["uri"] for r in imp["results"] if r["rank"] < 3} - ever_clicked
    negatives = set(got.negatives.get(first["query_uri"], []))
    assert skipped <= negatives and not negatives & ever_clicked


def test_only_the_clicks_since_a_time_make_pairs_while_the_propensities_see_the_whole_log():
    """The learning loop trains on the clicks since the serving version was trained; the
    position bias is the page's, so it is fitted on all of them."""
    records, _ = simulate(queries=150, sessions=30, items=6, theta=THETA, seed=1)
    log = search_events.count_clicks(records)
    stamps = sorted(int(c["ts"]) for c in log.clicks)
    since = stamps[len(stamps) // 2]
    everything, recent = click_pairs(log), click_pairs(log, since_ms=since)
    later = [c for c in log.clicks if int(c["ts"]) > since]
    assert 0 < len(recent.pairs) == len(later) < len(everything.pairs)
    assert recent.stats["clicks_before_since"] == len(log.clicks) - len(later)
    assert recent.stats["clicks_since_ms"] == since
    assert np.allclose(recent.model.examination, everything.model.examination)
    assert np.mean(recent.weights) == pytest.approx(1.0)
    assert click_pairs(log, since_ms=stamps[-1]).pairs == []


def test_without_rank_variation_the_pairs_stay_unweighted_and_bad_input_is_refused():
    # one query, always the same order: position and relevance cannot be told apart
    records, _ = simulate(queries=1, sessions=20, items=4, noise=0.0, seed=2)
    got = click_pairs(search_events.count_clicks(records))
    assert got.stats["weighted"] is False and set(got.weights) == {1.0}
    with pytest.raises(ValueError, match="one length"):
        fit_pbm(["q"], ["a", "b"], [1], [True])
    with pytest.raises(ValueError, match="1-based"):
        fit_pbm(["q"], ["a"], [0], [True])
    with pytest.raises(ValueError, match="clip"):
        click_pairs(search_events.count_clicks(records), clip=0.5)


def test_click_pairs_from_a_real_topic_train_with_the_catalog_mixed_in(broker, photo_folder, tiny_model_dir,
                                                                      tmp_path):
    photos = sorted(photo_folder.rglob("*.jpg"))
    queries, items = photos[:6], photos[6:12]
    records, _ = simulate(queries=6, sessions=40, items=6, theta=THETA, seed=3,
                          uri=lambda q, i: items[(q + i) % 6].as_uri(), query_uri=lambda q: queries[q].as_uri())
    topic = f"search.events.{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=broker, linger_ms=20)
    for rec in records:
        producer.send(topic, key=rec["query_id"].encode(), value=search_events.encode(rec))
    producer.send(topic, value=b"not json")
    producer.flush()
    producer.close()

    out = train(TrainConfig(data=f"kafka://{broker}/{topic}", out=str(tmp_path / "m"), init=str(tiny_model_dir),
                            catalog=str(photo_folder), batch_size=16, max_steps=2, warmup_steps=1, workers=0,
                            log_every=1, progress=False, version="c1", temperature=0.07))
    data = read_meta(out).training["data"]
    expected = click_pairs(search_events.count_clicks(records))     # the same log, read in memory
    assert data["events"] == len(records) + 1 and data["bad_events"] == 1
    # a seeded tenth of the pairs is held out for the trainer's own validation (checkpoint choice)
    assert data["pairs"] == len(expected.pairs) == data["usable_pairs"] + data["validation_pairs"]
    assert 0 < data["validation_pairs"] <= 0.1 * data["pairs"] + 1
    assert data["weighted"] is True and data["negatives"] == expected.stats["negatives"] > 0
    assert [r["examination"] for r in data["propensities"]] == [r["examination"] for r in
                                                                expected.stats["propensities"]]
    assert np.abs(np.array([r["examination"] for r in data["propensities"]]) - THETA).max() < 0.15
    assert data["catalog"]["train_images"] == 32 and data["catalog"]["simclr_ratio"] == 0.5
    assert read_meta(out).training["method"] == "click-pairs-infonce + catalog simclr-nt-xent"
    steps = [s for s in map(json.loads, open(out / "train_log.jsonl")) if "step" in s and "loss" in s]
    assert len(steps) == 2 and all(np.isfinite(s["loss"]) and s["grad_norm"] > 0 for s in steps)
