"""The offline verdict of a trained model: does it beat raw pixels, random init and the model
that serves now, on click pairs it was never trained on?

    vsearch train --data kafka://127.0.0.1:9092/search.events --catalog <folder> \\
        --init models/serving --out runs/new --judge-against models/serving
    vsearch judge --model-dir runs/new --against models/serving \\
        --data kafka://127.0.0.1:9092/search.events --catalog <folder>

Held-out pairs. A query is held out when ``sha256("<seed>:<query image's file name>")`` falls
below the fraction (:func:`held_out`; the name without the crop, so every search of one image is
on one side; the query store names its files by content hash): stable as the click log grows,
the same on every rank, in every process and wherever the files lie, with nothing to hand over. ``vsearch train --holdout F --split-seed S`` on click data (a pairs CSV
or ``kafka://``) trains on the other queries only; ``--judge-against`` without ``--holdout``
holds out :data:`DEFAULT_HOLDOUT`. ``vsearch judge`` takes the fraction and seed from the
model's training record (``training.data.holdout``/``split_seed``) unless given.

The task is the one users did: search the catalog with the query image; the clicked item is the
relevant result (several clicks of one query: several relevant results). The pool is the
``--catalog`` folder's images plus every clicked item of the log (identified by content: a
clicked ``file://`` URI and the catalog file with the same bytes are one candidate); the query's
own image (same bytes, uncropped) is left out of its ranking, as nobody searches for the photo
they hold. Metrics: :data:`CLICK_METRICS` (MRR of the clicked items, recall@10; ties broken
pessimistically). A model *beats* a reference when it is not worse on any of them and better on
at least one; the serving model is compared on MRR alone (:data:`SERVING_METRICS`: the clicks
were made on its top 10, so its recall@10 on its own log is 1 by construction). The log still
favours the model that made it (clicked items are ones it ranked high): a new model has to be
clearly better to win offline; an online experiment is the fair test. Each comparison also
carries the per-query MRR difference with its 95% paired bootstrap interval
(``mrr_difference``, :func:`paired_interval`): how much the held-out sample can tell. With ``--data`` a labelled folder (no clicks), the held-out split of
:mod:`vsearch.trainer.evaluate` is used instead (mAP@R, recall@1, nDCG@10, better on all).

References: ``raw-pixels 32x32``, ``random-init <arch>`` (the new model's architecture, fresh
weights) and ``serving <name>:<version>`` (``--against``).

The contract, for the rollout gate and a Kubernetes operator: the verdict lives in the new
model directory's ``vsearch_model.json`` under ``evaluation`` (what ``GET /vsearch/v1/model``
of its embedder reports too)::

    evaluation.data        {"kind": "clicks" | "labelled", "source", "holdout", "split_seed",
                            "held_out_queries", "held_out_pairs", "candidates", ...}
    evaluation.metrics     the new model's figures
    evaluation.baselines   {"raw-pixels": {...}, "random-init": {...}}
    evaluation.serving     {"model": "<name>:<version>", "model_dir", "metrics": {...}}
    evaluation.verdict     {"metrics": [names],
                            "beats_baselines": bool,   # raw pixels and random init (the gate)
                            "beats_serving": bool,
                            "beats_all": bool,         # all three: roll it out or not
                            "serving": "<name>:<version>",
                            "against": {reference name: {"kind": "raw-pixels" | "random-init"
                                        | "serving", "beats": bool, "metrics": {m: {"model",
                                        "reference"}}, "mrr_difference": {"mean", "low",
                                        "high", "queries"}}},
                            "text": one line per reference, "... beats ..." or "... DOES NOT BEAT ..."}

The full report goes to ``<model dir>/evaluation/judge.json``. ``vsearch judge`` exits 0 when
the model beats all three, 4 when it does not (the verdict written either way), 2 on an error;
``vsearch train --judge-against`` exits 0 once the model and its verdict are written.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core import jsonsafe
from ..core.images import image_files
from ..predictor.model_dir import read_meta, write_meta
from ..predictor.preprocess import InvalidImage, apply_crop, decode_image
from . import metrics
from .data import DataError, read_click_log, read_pairs_csv, read_source, split_crop
from .evaluate import candidates_for, evaluate_models

log = logging.getLogger(__name__)

DEFAULT_HOLDOUT = 0.2
CLICK_METRICS = ("mrr", "recall@10")
# The serving model made the log: every click is on its top 10, so its recall@10 on its own
# log is 1 by construction (users who look at 10 results) and says nothing; it is compared on MRR.
SERVING_METRICS = ("mrr",)
KS = (1, 5, 10)
LOST = 4                          # exit code of `vsearch judge` when the model does not beat all


# --------------------------------------------------------------------------- the split

def held_out(query: str, fraction: float, seed: int) -> bool:
    """Whether the query (a source key, its crop ignored) is in the held-out part."""
    if fraction <= 0:
        return False
    name = split_crop(query)[0].rstrip("/").rsplit("/", 1)[-1]
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64 < fraction


def split_pairs(pairs: Sequence[tuple[str, str]], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training pairs and of the held-out ones (split by query)."""
    if not 0 <= fraction < 1:
        raise DataError(f"--holdout must be in [0, 1), got {fraction}")
    train, held = [], []
    for i, (q, _) in enumerate(pairs):
        (held if held_out(q, fraction, seed) else train).append(i)
    return train, held


def training_pairs(got, fraction: float, seed: int):
    """The training side of click pairs (``train.Pairs``): held-out queries dropped, with their
    weights (the rest scaled back to a mean of 1) and negatives; the stats say how many."""
    if fraction <= 0:
        return got
    keep, held = split_pairs(got.pairs, fraction, seed)
    if not keep:
        raise DataError(f"every query of the {len(got.pairs)} pairs is held out (--holdout {fraction}); "
                        f"need click pairs of more queries")
    held_queries = {split_crop(got.pairs[i][0])[0] for i in held}
    got.pairs = [got.pairs[i] for i in keep]
    if got.weights is not None:
        w = np.asarray([got.weights[i] for i in keep], dtype=float)
        got.weights = (w / w.mean()).tolist() if w.mean() > 0 else w.tolist()
    if got.negatives is not None:
        queries = {q for q, _ in got.pairs}
        got.negatives = {q: v for q, v in got.negatives.items() if q in queries}
    got.stats = {**got.stats, "holdout": fraction, "split_seed": seed, "held_out_pairs": len(held),
                 "held_out_queries": len(held_queries)}
    return got


# --------------------------------------------------------------------------- reading

def read_pairs(source: str) -> tuple[list[tuple[str, str]], dict]:
    """(query, clicked) pairs of a pairs CSV or ``kafka://HOST:PORT[/TOPIC]``, and what was read."""
    if source.startswith("kafka://"):
        from .clicks import click_pairs
        bootstrap, _, topic = source[len("kafka://"):].partition("/")
        clicks, events = read_click_log(bootstrap, topic or None)
        got = click_pairs(clicks, ips=False)
        return got.pairs, {"events": events, "counted_clicks": len(clicks.clicks)}
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".csv":
        pairs = read_pairs_csv(path)
        return pairs, {"pairs": len(pairs)}
    raise DataError(f"--data {source!r}: a pairs CSV or kafka://HOST:PORT[/TOPIC] of search events")


@dataclass
class Loaded:
    key: str                  # the source key (with its crop)
    digest: str               # sha256 of the source's bytes (before any crop)
    cropped: bool
    image: object             # PIL image


def _load(keys: Sequence[str], workers: int = 2) -> tuple[dict[str, Loaded], dict[str, str]]:
    import concurrent.futures as futures

    def one(key):
        src, box = split_crop(key)
        try:
            data = read_source(src)
            img = apply_crop(decode_image(data), box)
            return key, Loaded(key, hashlib.sha256(data).hexdigest(), box is not None, img), None
        except (InvalidImage, OSError, DataError) as exc:
            return key, None, f"{type(exc).__name__}: {exc}"
    got, failed = {}, {}
    with futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for key, im, err in pool.map(one, list(dict.fromkeys(keys))):
            if im is None:
                failed[key] = err
            else:
                got[key] = im
    return got, failed


# --------------------------------------------------------------------------- judging

def compare(model: dict, ref: dict, names: Sequence[str], rule: str) -> tuple[bool, dict]:
    cmp = {k: {"model": model.get(k), "reference": ref.get(k)} for k in names if k in model and k in ref}
    if not cmp:
        return False, cmp
    if rule == "all-better":
        return all(c["model"] > c["reference"] for c in cmp.values()), cmp
    return (all(c["model"] >= c["reference"] for c in cmp.values())
            and any(c["model"] > c["reference"] for c in cmp.values())), cmp


def verdict_of(new: dict, refs: list[dict], names: Sequence[str], rule: str = "no-worse-and-better",
               serving_names: Sequence[str] | None = None) -> dict:
    """``new``/``refs``: ``{"name", "kind", "metrics"}``; the verdict as the gate reads it.
    ``serving_names``: the metrics the serving model is compared on (default ``names``)."""
    against, lines = {}, []
    for ref in refs:
        beats, cmp = compare(new["metrics"], ref["metrics"],
                             serving_names or names if ref["kind"] == "serving" else names, rule)
        against[ref["name"]] = {"kind": ref["kind"], "beats": beats, "metrics": cmp}
        figures = ", ".join(f"{k} {c['model']:.4f} vs {c['reference']:.4f}" for k, c in cmp.items())
        lines.append(f"{new['name']} {'beats' if beats else 'DOES NOT BEAT'} {ref['name']} ({figures})")
    base = [a["beats"] for a in against.values() if a["kind"] in ("raw-pixels", "random-init")]
    serving = [(n, a["beats"]) for n, a in against.items() if a["kind"] == "serving"]
    return {"metrics": list(names), "beats_baselines": all(base) if base else None,
            "beats_serving": serving[0][1] if serving else None,
            "beats_all": all(a["beats"] for a in against.values()) if against else None,
            "serving": serving[0][0][len("serving "):] if serving else None,
            "against": against, "text": "\n".join(lines)}


def judge_clicks(model_dir: str, against: str | None, data: str, *, catalog: str | None = None,
                 holdout: float = DEFAULT_HOLDOUT, split_seed: int = 0, workers: int = 2) -> dict:
    """The report of the held-out click pairs of ``data`` (see the module's docstring)."""
    t0 = time.time()
    pairs, read = read_pairs(data)
    _, held = split_pairs(pairs, holdout, split_seed)
    if not held:
        raise DataError(f"no held-out click pairs: none of the {len(pairs)} pairs' queries falls in the "
                        f"held-out {holdout:.0%} (split seed {split_seed}); more clicks, or a larger --holdout")
    held_pairs = [pairs[i] for i in held]
    catalog_keys = [str(p) for p in image_files(Path(catalog))] if catalog else []
    if catalog and not catalog_keys:
        raise DataError(f"--catalog {catalog}: no images in it")
    queries = list(dict.fromkeys(q for q, _ in held_pairs))
    pool_keys = list(dict.fromkeys(catalog_keys + [c for _, c in pairs]))
    images, failed = _load(queries + pool_keys, workers)
    # candidates by content: one per distinct image
    pool: dict[str, Loaded] = {}
    for k in pool_keys:
        if k in images and images[k].digest not in pool:
            pool[images[k].digest] = images[k]
    digests = list(pool)
    relevant: dict[str, set[str]] = {}
    for q, c in held_pairs:
        if q in images and c in images:
            relevant.setdefault(q, set()).add(images[c].digest)
    queries = [q for q in queries if q in relevant]
    if not queries:
        raise DataError(f"no held-out pair could be read ({len(failed)} unreadable, e.g. "
                        f"{next(iter(failed.items()), None)})")
    if len(digests) < 2:
        raise DataError("fewer than 2 candidate images to rank: give the --catalog")
    judgments = {q: {d: 1.0 for d in relevant[q]} for q in queries}
    cands = candidates_for([model_dir] + ([against] if against else []), ["raw-pixels", "random-init"])
    results, per_query_rr = [], []
    for i, cand in enumerate(cands):
        t = time.time()
        q_emb = metrics._normalise_rows(cand.embed([images[q].image for q in queries]))
        c_emb = metrics._normalise_rows(cand.embed([pool[d].image for d in digests]))
        scores = q_emb @ c_emb.T
        rankings = {}
        for qi, q in enumerate(queries):
            own = images[q].digest if not images[q].cropped else None
            grades = np.array([judgments[q].get(d, 0.0) for d in digests])
            order = np.lexsort((grades, -scores[qi]))          # pessimistic ties
            rankings[q] = [digests[j] for j in order[:100]
                           if digests[j] != own or digests[j] in judgments[q]]
        rep = metrics.evaluate_ranked_lists(rankings, judgments, KS, exclude_self=False)
        per_query_rr.append([next((1.0 / (r + 1) for r, d in enumerate(rankings[q]) if d in judgments[q]), 0.0)
                             for q in queries])
        kind = ("model" if i == 0 else "serving") if cand.kind == "model" else cand.kind
        name = f"serving {cand.name}" if kind == "serving" else cand.name
        results.append({"name": name, "kind": kind, "model_dir": cand.model_dir,
                        "metrics": {k: v for k, v in rep["metrics"].items()},
                        "queries_evaluated": rep["queries_evaluated"],
                        "queries_without_relevant": rep["queries_without_relevant"],
                        "embed_s": round(time.time() - t, 2)})
    report = {"data": {"kind": "clicks", "source": data, **read, "pairs": len(pairs), "holdout": holdout,
                       "split_seed": split_seed, "held_out_pairs": len(held_pairs),
                       "held_out_queries": len(queries), "candidates": len(digests),
                       "catalog": catalog, "unreadable": len(failed)},
              "ks": list(KS), "ties": "pessimistic",
              "evaluated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "wall_s": round(time.time() - t0, 1), "results": results}
    verdict = verdict_of(results[0], results[1:], CLICK_METRICS, serving_names=SERVING_METRICS)
    lines = verdict["text"].splitlines()
    for i, r in enumerate(results[1:], start=1):
        ci = paired_interval(per_query_rr[0], per_query_rr[i])
        verdict["against"][r["name"]]["mrr_difference"] = ci
        lines[i - 1] += (f"; MRR difference {ci['mean']:+.4f}, 95% interval [{ci['low']:+.4f}, {ci['high']:+.4f}] "
                         f"over {ci['queries']} queries")
    verdict["text"] = "\n".join(lines)
    report["verdict"] = verdict
    return report


def paired_interval(model: Sequence[float], reference: Sequence[float], *, resamples: int = 2000,
                    seed: int = 0) -> dict:
    """The mean per-query difference and its 95% paired bootstrap interval (percentile): how
    sure the held-out sample is of a difference (informational: the verdict's rule is on the
    means)."""
    d = np.asarray(model, dtype=float) - np.asarray(reference, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return {"mean": round(float(d.mean()), 4), "low": round(float(low), 4), "high": round(float(high), 4),
            "queries": len(d)}


def judge_labelled(model_dir: str, against: str | None, data: str, *, holdout: float, split_seed: int) -> dict:
    """A labelled folder's held-out split (:func:`vsearch.trainer.evaluate.evaluate_models`),
    in the same report shape as :func:`judge_clicks`."""
    from .evaluate import VERDICT_METRICS
    rep = evaluate_models([model_dir] + ([against] if against else []), data, split="held-out",
                          holdout=holdout, split_seed=split_seed, baselines=["raw-pixels", "random-init"])
    results = []
    for i, r in enumerate(rep["results"]):
        kind = ("model" if i == 0 else "serving") if r["kind"] == "model" else r["kind"]
        name = f"serving {r['name']}" if kind == "serving" else r["name"]
        results.append({**{k: v for k, v in r.items() if k not in ("curves", "per_class_map@r")},
                        "name": name, "kind": kind})
    report = {**{k: v for k, v in rep.items() if k != "verdicts"}, "results": results}
    report["data"] = {k: v for k, v in rep["data"].items() if k != "unreadable"}
    report["verdict"] = verdict_of(results[0], results[1:], VERDICT_METRICS, rule="all-better")
    return report


def judge(model_dir: str, against: str | None, data: str, *, catalog: str | None = None,
          holdout: float | None = None, split_seed: int | None = None) -> dict:
    """Judge ``model_dir`` on ``data``, write the verdict into its metadata (``evaluation``) and
    the report to ``<model_dir>/evaluation/judge.json``; returns the report."""
    meta = read_meta(model_dir)
    if against:
        read_meta(against)                      # a clear error before any work
    trained_on = (meta.training or {}).get("data") or {}
    if holdout is None:
        holdout = trained_on.get("holdout") or DEFAULT_HOLDOUT
    if split_seed is None:
        split_seed = int(trained_on.get("split_seed") or 0)
    if not 0 < holdout < 1:
        raise DataError(f"--holdout must be in (0, 1), got {holdout}")
    path = Path(data)
    if path.is_dir():
        report = judge_labelled(str(model_dir), against, data, holdout=holdout, split_seed=split_seed)
    else:
        report = judge_clicks(str(model_dir), against, data, catalog=catalog, holdout=holdout,
                              split_seed=split_seed)
    store(model_dir, report)
    return report


def store(model_dir: str | Path, report: dict) -> None:
    """The compact evaluation in ``vsearch_model.json`` and the report beside it."""
    new = report["results"][0]
    meta = read_meta(model_dir)
    ev = {"data": report["data"], "evaluated": report["evaluated"], "ties": report["ties"],
          "queries_evaluated": new["queries_evaluated"],
          "queries_without_relevant": new["queries_without_relevant"],
          "metrics": new["metrics"],
          "baselines": {r["kind"]: r["metrics"] for r in report["results"] if r["kind"] in
                        ("raw-pixels", "random-init")},
          "verdict": report["verdict"]}
    serving = next((r for r in report["results"] if r["kind"] == "serving"), None)
    if serving:
        ev["serving"] = {"model": serving["name"][len("serving "):], "model_dir": serving["model_dir"],
                         "metrics": serving["metrics"]}
    meta.evaluation = ev
    write_meta(model_dir, meta)
    out = Path(model_dir) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    (out / "judge.json").write_text(jsonsafe.dumps(report, indent=1) + "\n")


def format_report(report: dict) -> str:
    names = list(dict.fromkeys(list(report["verdict"]["metrics"]) + ["mrr", "recall@1", "recall@10"]))
    w = max(len("model"), *(len(r["name"]) for r in report["results"]))
    lines = ["  ".join([f"{'model':<{w}}"] + [f"{n:>10}" for n in names])]
    for r in report["results"]:
        lines.append("  ".join([f"{r['name']:<{w}}"] + [f"{r['metrics'].get(n, float('nan')):>10.4f}"
                                                          for n in names]))
    d = report["data"]
    lines.append(f"held out: {d.get('held_out_queries', d.get('images'))} queries "
                 f"({d.get('holdout')} of {d.get('source')}, split seed {d.get('split_seed')})")
    lines.append(report["verdict"]["text"])
    return "\n".join(lines)


