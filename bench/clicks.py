"""Position bias on a simulated click log with a known bias: what the trainer's click model
(:mod:`vsearch.trainer.clicks`, a position-based model fitted by EM) recovers, and what
inverse-propensity weighting does to the click counts.

Users examine rank k with probability ``theta_k`` (the known bias) and click an examined
result with probability ``gamma`` (its true relevance to the query). The ranker orders each
query's items by a noisy score correlated with relevance, with fresh noise per search, so
better items sit higher (raw clicks confound position with relevance) and every item is seen
at several ranks (what lets the PBM tell the two apart).

    python -m bench.clicks [--queries 300] [--sessions 40] [--items 8] [--seed 0]

Prints, per rank, the true and the estimated examination, raw CTR and IPS-weighted CTR; and,
per (query, item), how far the raw and the IPS click-through rates are from the true
relevance (bias and mean absolute error).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from vsearch.core.search_events import count_clicks
from vsearch.trainer.clicks import click_pairs, format_propensities

THETA = (1.0, 0.75, 0.55, 0.42, 0.33, 0.26, 0.21, 0.17, 0.14, 0.12)


def simulate(queries: int = 300, sessions: int = 40, items: int = 8, theta=THETA, seed: int = 0,
             noise: float = 0.3, uri=lambda q, i: f"file:///catalog/q{q}-{i}.jpg",
             query_uri=lambda q: f"file:///queries/q{q}.jpg"):
    """Search events (impressions and clicks, as the search service writes them) of a
    position-biased user population, and the true relevance {(query_hash, item_id): gamma}."""
    rng = np.random.default_rng(seed)
    theta = np.asarray(theta[:items], dtype=float)
    records, truth, n = [], {}, 0
    for q in range(queries):
        gamma = rng.uniform(0.05, 0.95, items)
        base = gamma + rng.normal(0, noise, items)
        qhash = f"h{q}"
        for i in range(items):
            truth[(qhash, f"q{q}-{i}")] = float(gamma[i])
        for _ in range(sessions):
            order = np.argsort(-(base + rng.normal(0, noise, items)))
            qid = f"s{n}"
            n += 1
            common = {"schema": 1, "query_id": qid, "query_hash": qhash, "query_uri": query_uri(q),
                      "crop": None, "model_version": "sim", "ts": n}
            results = [{"id": f"q{q}-{i}", "rank": r + 1, "score": 1.0 - r / items, "uri": uri(q, i)}
                       for r, i in enumerate(order)]
            records.append({**common, "type": "impression", "results": results})
            for r, i in enumerate(order):
                if rng.random() < theta[r] * gamma[i]:
                    records.append({**common, "type": "click", "item_id": f"q{q}-{i}", "item_uri": uri(q, i),
                                    "rank": r + 1})
    return records, truth


def per_item_ctr(click_log, model, clip: float = 10.0):
    """{(query_hash, item_id): (raw CTR, IPS CTR)} over the impressions."""
    shown, raw, ips = {}, {}, {}
    clicked = {(c["query_id"], c["item_id"]) for c in click_log.clicks}
    for qid, imp in click_log.impressions.items():
        for r in imp["results"]:
            key = (imp["query_hash"], r["id"])
            shown[key] = shown.get(key, 0) + 1
            if (qid, r["id"]) in clicked:
                raw[key] = raw.get(key, 0) + 1
                ips[key] = ips.get(key, 0) + model.weight(r["rank"], clip)
    return {k: (raw.get(k, 0) / n, ips.get(k, 0) / n) for k, n in shown.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--sessions", type=int, default=40)
    p.add_argument("--items", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    records, truth = simulate(args.queries, args.sessions, args.items, seed=args.seed)
    t0 = time.perf_counter()
    log = count_clicks(records)
    got = click_pairs(log)
    dt = time.perf_counter() - t0
    print(f"{args.queries} queries x {args.sessions} searches x {args.items} results: "
          f"{sum(1 for r in records if r['type'] == 'click')} clicks; EM {got.model.iterations} iterations, "
          f"{dt:.2f} s for counting, fitting and pairing")
    print(format_propensities(got.stats["propensities"]))
    print("true examination: " + " ".join(f"{t:.3f}" for t in THETA[:args.items]))
    ctr = per_item_ctr(log, got.model)
    diffs = np.array([(ctr[k][0] - g, ctr[k][1] - g) for k, g in truth.items() if k in ctr])
    print(f"\nper (query, item), against the true relevance: raw CTR bias {diffs[:, 0].mean():+.4f}, "
          f"MAE {np.abs(diffs[:, 0]).mean():.4f}; IPS CTR bias {diffs[:, 1].mean():+.4f}, "
          f"MAE {np.abs(diffs[:, 1]).mean():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
