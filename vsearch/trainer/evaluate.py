"""Offline evaluation: is this model better than that one?

    vsearch evaluate --model-dir models/default --data ../shared/data/caltech101 \\
        --split held-out --baselines raw-pixels,random-init --out reports/default

Data is a labelled folder (same label = relevant; leave-one-out retrieval over the set) or a
judgments CSV (``query,candidate,grade`` with grades 0..5; every candidate of the file is
ranked for each query). Several ``--model-dir`` and the baselines are compared in one run:

* ``raw-pixels``: the image shrunk to 32x32 (the serving resize + centre crop), flattened;
* ``random-init``: the first model's architecture with fresh random weights.

Every model is compared with each baseline, and the first model with the other models too (a
fine-tune with the model it started from), on mAP@R, recall@1 and nDCG@10: the verdict says
plainly whether it beats them (:func:`verdicts`) and is printed under the table, written to
``report.json`` and stored in the model's metadata (``evaluation.verdict``) for the rollout gate.

Output: a table on stdout, ``report.json`` and ``report.png`` (recall@k and precision-recall).
From code, :func:`evaluate_models` returns the same report; the metric functions themselves
are in :mod:`vsearch.trainer.metrics` (``evaluate_embeddings``, ``evaluate_judgments``,
``evaluate_ranked_lists``).
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..core import jsonsafe
from ..predictor.model_dir import read_meta, write_meta
from ..predictor.preprocess import InvalidImage, PreprocessConfig, decode_image, image_to_array, stack
from ..predictor.zoo import EmbeddingNet, load_model_dir
from . import metrics
from .data import DataError, _resolve, list_images, read_source, select_split

log = logging.getLogger(__name__)

BASELINES = ("raw-pixels", "random-init")
VERDICT_METRICS = ("map@r", "recall@1", "ndcg@10")
RAW_PIXELS = PreprocessConfig(image_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@dataclass
class Candidate:
    """Something that turns decoded images into embeddings."""
    name: str
    kind: str                          # model | random-init | raw-pixels
    model_dir: str | None
    embed: object                      # callable(list[PIL.Image]) -> np.ndarray [N, D]
    meta: dict | None = None


# --------------------------------------------------------------------------- embedders

def net_embedder(net: EmbeddingNet, cfg: PreprocessConfig, batch_size: int = 64):
    """Embed decoded images with a network and the serving preprocessing."""
    net.eval()

    def embed(images):
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(stack([image_to_array(im, cfg) for im in images[i:i + batch_size]]))
                out.append(net.embed(x).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)
    return embed


def raw_pixel_embed(images) -> np.ndarray:
    return np.stack([image_to_array(im, RAW_PIXELS).reshape(-1) for im in images]).astype(np.float32)


def candidates_for(model_dirs: Sequence[str], baselines: Sequence[str]) -> list[Candidate]:
    out = []
    for d in model_dirs:
        net, meta = load_model_dir(d)
        out.append(Candidate(f"{meta.name}:{meta.version}", "model", str(d),
                             net_embedder(net, meta.preprocess), meta.to_json()))
    for b in baselines:
        if b not in BASELINES:
            raise DataError(f"unknown baseline {b!r}: expected {', '.join(BASELINES)}")
        if b == "raw-pixels":
            out.append(Candidate("raw-pixels 32x32", b, None, raw_pixel_embed))
        elif b == "random-init":
            if not model_dirs:
                raise DataError("the random-init baseline needs a --model-dir for its architecture")
            net, meta = load_model_dir(model_dirs[0], random_init=True)
            out.append(Candidate(f"random-init {meta.arch or meta.family}", b, None,
                                 net_embedder(net, meta.preprocess)))
    return out


# --------------------------------------------------------------------------- data

def decode_all(sources: Sequence[str], workers: int = 2):
    """Decoded images of the sources, plus {source: reason} for those that failed."""
    def one(src):
        try:
            return src, decode_image(read_source(src)), None
        except (InvalidImage, OSError, DataError) as exc:
            return src, None, f"{type(exc).__name__}: {exc}"
    images, failed = {}, {}
    with futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for src, img, err in pool.map(one, sources):
            if img is None:
                failed[src] = err
            else:
                images[src] = img
    return images, failed


def read_judgments(path: str | Path) -> dict[str, dict[str, float]]:
    """A judgments CSV file -> {query: {candidate: grade}}; relative image paths are resolved
    against the file's folder."""
    path = Path(path)
    try:
        judged = metrics.parse_judgments(path.read_text(), str(path))
    except metrics.JudgmentsError as exc:
        raise DataError(str(exc)) from exc
    out: dict[str, dict[str, float]] = {}
    for q, grades in judged.items():
        for c, g in grades.items():
            out.setdefault(_resolve(q, path.parent), {})[_resolve(c, path.parent)] = g
    return out


# --------------------------------------------------------------------------- evaluation

def evaluate_models(model_dirs: Sequence[str], data: str, *, ks: Sequence[int] = metrics.DEFAULT_KS,
                    baselines: Sequence[str] = (), split: str = "all", holdout: float = 0.3,
                    split_seed: int = 0) -> dict:
    """Evaluate models and baselines on one data set; returns the report (JSON-able)."""
    t0 = time.time()
    cands = candidates_for(model_dirs, baselines)
    path = Path(data)
    if path.is_file() and path.suffix.lower() == ".csv":
        judgments = read_judgments(path)
        pool = list(dict.fromkeys([q for q in judgments] + [c for j in judgments.values() for c in j]))
        images, failed = decode_all(pool)
        if failed:
            raise DataError(f"{len(failed)} judged images cannot be read, e.g. {next(iter(failed.items()))}")
        qids = list(judgments)
        data_info = {"kind": "judgments", "source": str(data), "queries": len(qids),
                     "candidates": len(pool), "judgments": sum(len(j) for j in judgments.values())}
        results = []
        for c in cands:
            emb = c.embed([images[s] for s in pool])
            index = {s: i for i, s in enumerate(pool)}
            rep = metrics.evaluate_judgments(emb[[index[q] for q in qids]], qids, emb, pool,
                                             judgments, ks)
            results.append({"name": c.name, "kind": c.kind, "model_dir": c.model_dir, **rep})
    else:
        records = select_split(list_images(data), split, holdout, split_seed)
        records = [r for r in records if r.label is not None]
        if len(records) < 2:
            raise DataError(f"{data} ({split} split) has fewer than 2 labelled images")
        images, failed = decode_all([r.source for r in records])
        records = [r for r in records if r.source in images]
        labels = [r.label for r in records]
        data_info = {"kind": "labelled", "source": str(data), "split": split,
                     "holdout": holdout if split != "all" else None,
                     "split_seed": split_seed if split != "all" else None,
                     "images": len(records), "classes": len(set(labels)), "unreadable": failed}
        results = []
        for c in cands:
            t = time.time()
            emb = c.embed([images[r.source] for r in records])
            rep = metrics.evaluate_embeddings(emb, labels, ks)
            rep["embed_s"] = round(time.time() - t, 2)
            results.append({"name": c.name, "kind": c.kind, "model_dir": c.model_dir, **rep})
    report = {"data": data_info, "ks": list(ks), "ties": "pessimistic",
              "evaluated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "wall_s": round(time.time() - t0, 1), "results": results}
    report["verdicts"] = verdicts(report)
    return report


def verdicts(report: dict) -> list[dict]:
    """For each model of the report: does it beat each baseline (and, for the first model, the
    other models) on every one of :data:`VERDICT_METRICS`? A model that is not better on all
    of them does not beat that reference, and the text says so."""
    models = [r for r in report["results"] if r["kind"] == "model"]
    baselines = [r for r in report["results"] if r["kind"] != "model"]
    out = []
    for i, m in enumerate(models):
        refs = baselines + (models[1:] if i == 0 else [])
        against, lines = {}, []
        for ref in refs:
            cmp = {k: {"model": m["metrics"].get(k), "reference": ref["metrics"].get(k)}
                   for k in VERDICT_METRICS if k in m["metrics"] and k in ref["metrics"]}
            beats = bool(cmp) and all(c["model"] > c["reference"] for c in cmp.values())
            against[ref["name"]] = {"kind": ref["kind"], "beats": beats, "metrics": cmp}
            figures = ", ".join(f"{k} {c['model']:.4f} vs {c['reference']:.4f}" for k, c in cmp.items())
            lines.append(f"{m['name']} {'beats' if beats else 'DOES NOT BEAT'} {ref['name']} ({figures})")
        beats_baselines = all(a["beats"] for a in against.values() if a["kind"] != "model")
        out.append({"model": m["name"], "model_dir": m["model_dir"], "metrics": list(VERDICT_METRICS),
                    "beats_baselines": beats_baselines if baselines else None,
                    "beats_all": all(a["beats"] for a in against.values()) if against else None,
                    "against": against, "text": "\n".join(lines)})
    return out


def table_columns(ks: Sequence[int]) -> list[str]:
    ks = sorted(ks)
    ndcg_k = 10 if 10 in ks else ks[-1]
    return ["map@r", "map", "mrr"] + [f"recall@{k}" for k in ks] + [f"ndcg@{ndcg_k}"]


def format_table(report: dict) -> str:
    cols = table_columns(report["ks"])
    name_w = max([len("model")] + [len(r["name"]) for r in report["results"]])
    lines = ["  ".join([f"{'model':<{name_w}}"] + [f"{c:>10}" for c in cols])]
    for r in report["results"]:
        m = r["metrics"]
        lines.append("  ".join([f"{r['name']:<{name_w}}"] + [f"{m.get(c, float('nan')):>10.4f}" for c in cols]))
    first = report["results"][0] if report["results"] else {}
    lines.append(f"queries: {first.get('queries_evaluated', 0)} evaluated, "
                 f"{first.get('queries_without_relevant', 0)} without a relevant item (left out)")
    lines += [v["text"] for v in report.get("verdicts") or verdicts(report) if v["text"]]
    return "\n".join(lines)


def plot_report(report: dict, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in report["results"]:
        c = r["curves"]
        if not c["k"] or len(c["recall"]) != len(c["k"]):       # no query with a relevant item
            continue
        label = f"{r['name']} (mAP@R {r['metrics']['map@r']:.3f})"
        ax1.plot(c["k"], c["recall"], label=label)
        ax2.plot(c["recall"], c["precision"], label=label)
    ax1.set_xscale("log")
    ax1.set(xlabel="k", ylabel="recall@k", title="Recall@k")
    ax2.set(xlabel="recall@k", ylabel="precision@k", title="Precision-recall (k = 1..100)")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    if ax1.get_lines():
        ax1.legend(fontsize=8)
    else:
        ax1.text(0.5, 0.5, "no query has a relevant item", ha="center", transform=ax1.transAxes)
    d = report["data"]
    fig.suptitle(f"{d['source']} ({d.get('split', d['kind'])}, "
                 f"{d.get('images', d.get('queries'))} queries)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summary_for_meta(report: dict, result: dict) -> dict:
    """The compact evaluation stored in a model's ``vsearch_model.json``."""
    base = {r["kind"]: r["metrics"] for r in report["results"] if r["kind"] != "model"}
    others = {r["name"]: r["metrics"] for r in report["results"]
              if r["kind"] == "model" and r is not result}
    verdict = next((v for v in report.get("verdicts") or verdicts(report)
                    if v["model_dir"] == result["model_dir"]), None)
    out = {"data": {k: v for k, v in report["data"].items() if k != "unreadable"},
           "evaluated": report["evaluated"], "ties": report["ties"],
           "queries_evaluated": result["queries_evaluated"],
           "queries_without_relevant": result["queries_without_relevant"],
           "metrics": result["metrics"]}
    if base:
        out["baselines"] = base
    if others:
        out["other_models"] = others
    if verdict:
        out["verdict"] = {k: verdict[k] for k in ("metrics", "beats_baselines", "beats_all", "against", "text")}
    return out


def write_outputs(report: dict, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "report.json"
    js.write_text(jsonsafe.dumps(report, indent=1) + "\n")
    return js, plot_report(report, out / "report.png")


def store_in_meta(model_dir: str | Path, report: dict) -> None:
    """Write the model's own result into its ``vsearch_model.json`` (``evaluation``)."""
    meta = read_meta(model_dir)
    for r in report["results"]:
        if r["model_dir"] == str(model_dir):
            meta.evaluation = summary_for_meta(report, r)
            write_meta(model_dir, meta)
            return
    raise DataError(f"{model_dir} is not among the evaluated models")
