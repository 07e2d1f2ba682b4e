"""Retrieval metrics, pure numpy, with shape checks.

Everything starts from a *ranked relevance* matrix ``rel`` of shape [Q, N]: row q holds the
relevance grades (0 = not relevant, 1..5 = graded; binary labels are 0/1) of query q's
results in ranked order, and ``n_relevant`` [Q] says how many relevant items query q has in
the whole collection (a truncated top-k list may hold fewer). An item counts as relevant when
its grade is >= ``threshold`` (default 1).

Per-query functions return float64 [Q] with NaN for queries that have no relevant item: such
queries have no defined recall or AP, and :func:`summarise` reports how many there were
instead of averaging them in as zeros (or ones).

* ``reciprocal_rank``: 1 / rank of the first relevant result (0 if none is retrieved).
* ``recall_at_k``: relevant results in the top k / n_relevant.
* ``precision_at_k``: relevant results in the top k / k.
* ``average_precision``: mean over relevant items of the precision at their rank; relevant
  items never retrieved count as precision 0 (divides by n_relevant).
* ``average_precision_at_r``: mAP@R (Musgrave et al. 2020): AP over the top R only, R =
  n_relevant, divided by R.
* ``ndcg_at_k``: graded nDCG with linear gains ``grade / log2(rank + 1)`` (scikit-learn's
  ``ndcg_score`` convention); the ideal ordering comes from every judged grade of the query.

Scores -> ranking: :func:`rank_by_scores` sorts by descending score. Ties are broken
*pessimistically* by default (non-relevant before relevant), so a collapsed model that gives
everything the same score earns nothing from the order of the data; ``ties="optimistic"``
gives the upper bound. Candidates in ``exclude`` (the query itself) are removed.
"""

from __future__ import annotations

import csv
import io
from typing import Mapping, Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10, 100)


# --------------------------------------------------------------------------- checks

def _as_rel(rel) -> np.ndarray:
    rel = np.asarray(rel, dtype=np.float64)
    if rel.ndim != 2:
        raise ValueError(f"ranked relevance must be 2-D [queries, results], got shape {rel.shape}")
    if np.isnan(rel).any() or (rel < 0).any():
        raise ValueError("relevance grades must be finite and >= 0")
    return rel


def _as_n_relevant(n_relevant, rel: np.ndarray, threshold: float) -> np.ndarray:
    hits = (rel >= threshold).sum(axis=1)
    if n_relevant is None:
        return hits.astype(np.int64)
    n = np.asarray(n_relevant)
    if n.shape != (rel.shape[0],):
        raise ValueError(f"n_relevant must have shape ({rel.shape[0]},), got {n.shape}")
    if (n < hits).any():
        q = int(np.argmax(n < hits))
        raise ValueError(f"query {q}: n_relevant={int(n[q])} but {int(hits[q])} relevant results "
                         "are in its ranking")
    return n.astype(np.int64)


def _check_k(k: int) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _nan_where_none(values: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    values[n_relevant == 0] = np.nan
    return values


# --------------------------------------------------------------------------- per query

def reciprocal_rank(rel, n_relevant=None, threshold: float = 1) -> np.ndarray:
    rel = _as_rel(rel)
    n = _as_n_relevant(n_relevant, rel, threshold)
    hit = rel >= threshold
    first = hit.argmax(axis=1)
    rr = np.where(hit.any(axis=1), 1.0 / (first + 1), 0.0)
    return _nan_where_none(rr, n)


def recall_at_k(rel, k: int, n_relevant=None, threshold: float = 1) -> np.ndarray:
    rel, k = _as_rel(rel), _check_k(k)
    n = _as_n_relevant(n_relevant, rel, threshold)
    found = (rel[:, :k] >= threshold).sum(axis=1)
    return _nan_where_none(found / np.maximum(n, 1), n)


def precision_at_k(rel, k: int, n_relevant=None, threshold: float = 1) -> np.ndarray:
    rel, k = _as_rel(rel), _check_k(k)
    n = _as_n_relevant(n_relevant, rel, threshold)
    found = (rel[:, :k] >= threshold).sum(axis=1)
    return _nan_where_none(found / k, n)


def average_precision(rel, n_relevant=None, threshold: float = 1) -> np.ndarray:
    rel = _as_rel(rel)
    n = _as_n_relevant(n_relevant, rel, threshold)
    hit = (rel >= threshold).astype(np.float64)
    prec = np.cumsum(hit, axis=1) / np.arange(1, rel.shape[1] + 1)
    ap = (prec * hit).sum(axis=1) / np.maximum(n, 1)
    return _nan_where_none(ap, n)


def average_precision_at_r(rel, n_relevant=None, threshold: float = 1) -> np.ndarray:
    rel = _as_rel(rel)
    n = _as_n_relevant(n_relevant, rel, threshold)
    hit = (rel >= threshold).astype(np.float64)
    ranks = np.arange(1, rel.shape[1] + 1)
    prec = np.cumsum(hit, axis=1) / ranks
    within_r = ranks[None, :] <= n[:, None]
    ap_r = (prec * hit * within_r).sum(axis=1) / np.maximum(n, 1)
    return _nan_where_none(ap_r, n)


def dcg_at_k(gains, k: int) -> np.ndarray:
    gains, k = _as_rel(gains), _check_k(k)
    g = gains[:, :k]
    return (g / np.log2(np.arange(2, g.shape[1] + 2))).sum(axis=1)


def ndcg_at_k(rel, k: int, ideal=None, threshold: float = 1) -> np.ndarray:
    """``ideal`` [Q, M]: every judged grade of each query (any order); default: ``rel``."""
    rel = _as_rel(rel)
    ideal = rel if ideal is None else _as_rel(ideal)
    if ideal.shape[0] != rel.shape[0]:
        raise ValueError(f"ideal has {ideal.shape[0]} rows, ranking has {rel.shape[0]}")
    best = dcg_at_k(-np.sort(-ideal, axis=1), k)
    score = np.divide(dcg_at_k(rel, k), best, out=np.zeros(len(rel)), where=best > 0)
    n = (ideal >= threshold).sum(axis=1)
    return _nan_where_none(score, n)


# --------------------------------------------------------------------------- summaries

def summarise(rel, ks: Sequence[int] = DEFAULT_KS, n_relevant=None, ideal=None,
              threshold: float = 1) -> dict:
    """All metrics, averaged over the queries that have at least one relevant item."""
    rel = _as_rel(rel)
    n = _as_n_relevant(n_relevant, rel, threshold)
    valid = n > 0
    per_query = {"mrr": reciprocal_rank(rel, n, threshold),
                 "map": average_precision(rel, n, threshold),
                 "map@r": average_precision_at_r(rel, n, threshold)}
    for k in ks:
        per_query[f"recall@{k}"] = recall_at_k(rel, k, n, threshold)
        per_query[f"precision@{k}"] = precision_at_k(rel, k, n, threshold)
        per_query[f"ndcg@{k}"] = ndcg_at_k(rel, k, ideal, threshold)
    metrics = {name: (float(np.nanmean(v[valid])) if valid.any() else float("nan"))
               for name, v in per_query.items()}
    return {"queries": int(len(rel)), "queries_evaluated": int(valid.sum()),
            "queries_without_relevant": int((~valid).sum()), "metrics": metrics}


def curves(rel, n_relevant=None, max_k: int = 100, threshold: float = 1) -> dict:
    """Mean recall@k and precision@k for k = 1..max_k (for the recall curve and the
    precision-recall plot), over queries with a relevant item."""
    rel = _as_rel(rel)
    n = _as_n_relevant(n_relevant, rel, threshold)
    valid = n > 0
    hit = (rel[valid, :max_k] >= threshold).astype(np.float64)
    found = np.cumsum(hit, axis=1)
    ks = np.arange(1, hit.shape[1] + 1)
    return {"k": ks.tolist(),
            "recall": (found / n[valid, None]).mean(axis=0).tolist() if valid.any() else [],
            "precision": (found / ks).mean(axis=0).tolist() if valid.any() else []}


# --------------------------------------------------------------------------- from scores

def rank_by_scores(scores, relevance, exclude=None, ties: str = "pessimistic") -> np.ndarray:
    """Sort each row's relevance by descending score -> ranked relevance [Q, N - excluded].

    ``exclude`` [Q, N] bool marks candidates that must not be ranked (the query itself); every
    row must exclude the same number of candidates."""
    scores = np.asarray(scores, dtype=np.float64)
    relevance = _as_rel(relevance)
    if scores.shape != relevance.shape:
        raise ValueError(f"scores {scores.shape} and relevance {relevance.shape} differ in shape")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    drop = 0
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude {exclude.shape} and scores {scores.shape} differ in shape")
        counts = exclude.sum(axis=1)
        if len(counts) and (counts != counts[0]).any():
            raise ValueError("every query must exclude the same number of candidates")
        drop = int(counts[0]) if len(counts) else 0
        scores = np.where(exclude, -np.inf, scores)
    tie_key = relevance if ties == "pessimistic" else -relevance
    if exclude is not None:
        tie_key = np.where(exclude, np.inf, tie_key)
    # lexsort: last key is primary -> descending score, then the tie key ascending
    order = np.lexsort((tie_key, -scores), axis=1)
    ranked = np.take_along_axis(relevance, order, axis=1)
    return ranked[:, :ranked.shape[1] - drop] if drop else ranked


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinity")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def evaluate_embeddings(embeddings, labels: Sequence, ks: Sequence[int] = DEFAULT_KS,
                        ties: str = "pessimistic", curve_k: int = 100) -> dict:
    """Leave-one-out retrieval on a labelled set: every item queries all the others by cosine
    similarity; items with the same label are relevant; the query never matches itself."""
    emb = _normalise_rows(embeddings)
    labels = np.asarray(labels)
    if labels.shape != (len(emb),):
        raise ValueError(f"labels must have shape ({len(emb)},), got {labels.shape}")
    if len(emb) < 2:
        raise ValueError("need at least 2 items to evaluate retrieval")
    scores = emb @ emb.T
    relevance = (labels[:, None] == labels[None, :]).astype(np.float64)
    eye = np.eye(len(emb), dtype=bool)
    relevance[eye] = 0
    ranked = rank_by_scores(scores, relevance, exclude=eye, ties=ties)
    n_rel = relevance.sum(axis=1).astype(np.int64)
    report = summarise(ranked, ks, n_rel)
    map_r = average_precision_at_r(ranked, n_rel)
    per_class = {}
    for lab in np.unique(labels):
        m = labels == lab
        v = map_r[m]
        per_class[str(lab)] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    report["per_class_map@r"] = per_class
    report["curves"] = curves(ranked, n_rel, curve_k)
    return report


class JudgmentsError(ValueError):
    """A judgments CSV that cannot be used; the message names the source and the line."""


def parse_judgments(text: str, source: str = "judgments") -> dict[str, dict[str, float]]:
    """``query,candidate,grade`` CSV text (grade 0..5) -> ``{query: {candidate: grade}}``: the
    format of ``vsearch evaluate`` and of the rollout gate's golden set."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"query", "candidate", "grade"} <= set(rows[0]):
        raise JudgmentsError(f"{source}: a judgments CSV needs the columns query,candidate,grade")
    out: dict[str, dict[str, float]] = {}
    for i, r in enumerate(rows, start=2):
        try:
            g = float(r["grade"])
        except (TypeError, ValueError) as exc:
            raise JudgmentsError(f"{source} line {i}: grade {r['grade']!r} is not a number") from exc
        if not 0 <= g <= 5:
            raise JudgmentsError(f"{source} line {i}: grade {g} is outside 0..5")
        q, c = (r["query"] or "").strip(), (r["candidate"] or "").strip()
        if not q or not c:
            raise JudgmentsError(f"{source} line {i}: empty query or candidate")
        out.setdefault(q, {})[c] = g
    return out


def evaluate_ranked_lists(rankings: Mapping[str, Sequence[str]],
                          judgments: Mapping[str, Mapping[str, float]],
                          ks: Sequence[int] = DEFAULT_KS, threshold: float = 1,
                          exclude_self: bool = True, curve_k: int = 100) -> dict:
    """Metrics of ranked result lists against graded judgments (query -> {candidate: 0..5}).

    Made for a golden query set: ``rankings`` are what a system returned (e.g. the top-k ids of
    a Milvus search), unjudged results count as grade 0, and a judged query that got no
    ranking scores 0. Queries that were ranked but have no judgments are counted in
    ``queries_without_judgments`` and left out."""
    queries = list(judgments)
    if not queries:
        raise ValueError("no judged queries")
    unjudged = [q for q in rankings if q not in judgments]
    lists = []
    for q in queries:
        items = [c for c in rankings.get(q, []) if not (exclude_self and c == q)]
        lists.append([float(judgments[q].get(c, 0.0)) for c in items])
    width = max(1, max(len(x) for x in lists), max(ks))
    rel = np.zeros((len(queries), width))
    for i, row in enumerate(lists):
        rel[i, :len(row)] = row
    grades = [[float(g) for c, g in judgments[q].items() if not (exclude_self and c == q)]
              for q in queries]
    ideal = np.zeros((len(queries), max(1, max(len(g) for g in grades))))
    for i, g in enumerate(grades):
        ideal[i, :len(g)] = g
    if (ideal > 5).any():
        raise ValueError("judgment grades must be in 0..5")
    n_rel = (ideal >= threshold).sum(axis=1)
    report = summarise(rel, ks, n_rel, ideal, threshold)
    report["queries_without_judgments"] = len(unjudged)
    report["curves"] = curves(rel, n_rel, curve_k, threshold)
    return report


def evaluate_judgments(query_embeddings, query_ids: Sequence[str], candidate_embeddings,
                       candidate_ids: Sequence[str], judgments: Mapping[str, Mapping[str, float]],
                       ks: Sequence[int] = DEFAULT_KS, threshold: float = 1) -> dict:
    """Rank every candidate for each query by cosine similarity, then
    :func:`evaluate_ranked_lists`. Ties are broken pessimistically (unjudged/low grades first)."""
    q = _normalise_rows(query_embeddings)
    c = _normalise_rows(candidate_embeddings)
    if len(q) != len(query_ids) or len(c) != len(candidate_ids):
        raise ValueError("embeddings and ids differ in length")
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != candidate dim {c.shape[1]}")
    cand = np.asarray(candidate_ids, dtype=object)
    scores = q @ c.T
    grades = np.array([[float(judgments.get(qid, {}).get(cid, 0.0)) for cid in candidate_ids]
                       for qid in query_ids]).reshape(len(q), len(c))
    order = np.lexsort((grades, -scores), axis=1)
    rankings = {qid: list(cand[order[i]]) for i, qid in enumerate(query_ids)}
    return evaluate_ranked_lists(rankings, judgments, ks, threshold)
