"""From the impressions and clicks of ``search.events`` to weighted training pairs.

Every counted click (:func:`vsearch.core.search_events.count_clicks`) becomes a pair: the query
image (``query_uri``, from the query store: a file:// folder or s3://, the ``crop`` cut out as
serving does) -> the clicked item as its positive. The items its impression showed *above* the
click and skipped ("skip above", Joachims 2002) become the query's hard negatives, unless the
same query clicked them in another search.

Clicks are position-biased: a result at rank 1 is clicked more because it is at rank 1. The
bias is estimated from the log itself with the position-based click model (PBM; Chuklin,
Markov and de Rijke, "Click Models for Web Search", 2015, ch. 3 and 4.2): a result at rank k is
clicked when it is examined (probability theta_k, a property of the rank) and found
attractive (gamma_qd, a property of the query and the item), fitted by expectation-maximisation
over every (query, item, rank, clicked or not) of the impressions. Each click's pair is then
weighted by the inverse of its rank's examination propensity relative to rank 1,
theta_1 / theta_k, clipped at ``clip`` (propensity clipping: bounded variance for a little
bias; Joachims, Swaminathan and Schnabel, "Unbiased Learning-to-Rank with Biased Feedback",
2017), the weights scaled to a mean of 1 so the loss keeps its scale.

The PBM separates position from relevance only when the same (query, item) is seen at more
than one rank (a query repeated while the ranking changed, a new model version, randomised
or interleaved traffic). ``identifying_pairs`` in the stats counts them; with none, the
propensities cannot be told from relevance and the pairs are left unweighted (the stats say
so). Queries are keyed by ``query_hash`` (the same image and crop searched again is the same
query), items by ``item_id``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..core.search_events import ClickLog
from ..predictor.preprocess import InvalidImage
from .data import with_crop

log = logging.getLogger(__name__)


@dataclass
class PositionBasedModel:
    """A fitted PBM: ``examination[k-1]`` = theta_k relative to rank 1, ``attractiveness``
    {(query, item): gamma} on the same scale (theta_1 * gamma: rank 1's click probability)."""
    examination: np.ndarray
    attractiveness: dict[tuple[str, str], float]
    observations: int
    identifying_pairs: int           # (query, item) seen at two ranks or more
    iterations: int
    log_likelihood: float

    def propensity(self, rank: int) -> float:
        return float(self.examination[min(rank, len(self.examination)) - 1])

    def weight(self, rank: int, clip: float) -> float:
        """Inverse propensity of a click at ``rank`` (1-based), at most ``clip``."""
        return float(min(clip, 1.0 / max(self.propensity(rank), 1e-12)))


def fit_pbm(queries, items, ranks, clicked, *, max_rank: int | None = None, iterations: int = 500,
            tol: float = 1e-9) -> PositionBasedModel:
    """EM for the position-based model over observations (query, item, rank 1-based, clicked).

    E-step (a click means examined and attractive; for a skip):
    P(E=1 | C=0) = theta (1 - gamma) / (1 - theta gamma), P(A=1 | C=0) = (1 - theta) gamma / (1 - theta gamma);
    M-step: theta_k = mean posterior examination of the observations at rank k, gamma_qd =
    mean posterior attractiveness of (q, d)'s observations. Stops when the mean log-likelihood
    gains less than ``tol``. Ranks above ``max_rank`` share the last rank's theta."""
    ranks = np.asarray(ranks, dtype=np.int64)
    clicked = np.asarray(clicked, dtype=bool)
    if not (len(queries) == len(items) == len(ranks) == len(clicked)):
        raise ValueError("fit_pbm: queries, items, ranks and clicked must have one length")
    if len(ranks) == 0:
        raise ValueError("fit_pbm: no observations")
    if ranks.min() < 1:
        raise ValueError(f"fit_pbm: ranks are 1-based, got {ranks.min()}")
    k = int(min(ranks.max(), max_rank or ranks.max()))
    r = np.minimum(ranks, k) - 1
    keys = list(zip(map(str, queries), map(str, items)))
    index: dict[tuple[str, str], int] = {}
    p = np.fromiter((index.setdefault(key, len(index)) for key in keys), dtype=np.int64, count=len(keys))
    n_r = np.bincount(r, minlength=k).astype(float)
    n_p = np.bincount(p, minlength=len(index)).astype(float)
    theta, gamma = np.full(k, 0.5), np.full(len(index), 0.5)
    eps, ll_prev, ll, it = 1e-6, -np.inf, 0.0, 0
    while it < iterations:
        it += 1
        t, g = theta[r], gamma[p]
        tg = t * g
        skip = 1.0 - tg
        exam = np.where(clicked, 1.0, t * (1 - g) / skip)
        attr = np.where(clicked, 1.0, (1 - t) * g / skip)
        theta = np.clip(np.bincount(r, exam, minlength=k) / np.maximum(n_r, 1), eps, 1 - eps)
        gamma = np.clip(np.bincount(p, attr, minlength=len(index)) / n_p, eps, 1 - eps)
        tg = theta[r] * gamma[p]
        ll = float(np.mean(np.where(clicked, np.log(tg), np.log1p(-tg))))
        if ll - ll_prev < tol:
            break
        ll_prev = ll
    ll_prev = ll
    seen_at: dict[int, set] = {}
    for pi, ri in zip(p.tolist(), r.tolist()):
        seen_at.setdefault(pi, set()).add(ri)
    identifying = sum(1 for s in seen_at.values() if len(s) > 1)
    scale = theta[0]
    keys_by_index = list(index)
    return PositionBasedModel(examination=theta / scale,
                              attractiveness={keys_by_index[i]: float(gamma[i] * scale) for i in range(len(index))},
                              observations=len(ranks), identifying_pairs=identifying, iterations=it,
                              log_likelihood=ll_prev)


def observations(click_log: ClickLog) -> tuple[list[str], list[str], list[int], list[bool]]:
    """(query, item, rank, clicked) for every result of every impression: the PBM's data."""
    clicked = {(c["query_id"], str(c.get("item_id"))) for c in click_log.clicks}
    qs, items, ranks, cs = [], [], [], []
    for qid, imp in click_log.impressions.items():
        qkey = imp.get("query_hash") or qid
        for res in imp.get("results") or ():
            if not isinstance(res, dict) or not isinstance(res.get("rank"), int) or res["rank"] < 1:
                continue
            qs.append(str(qkey))
            items.append(str(res.get("id")))
            ranks.append(res["rank"])
            cs.append((qid, str(res.get("id"))) in clicked)
    return qs, items, ranks, cs


@dataclass
class ClickPairs:
    """What the trainer takes from the click log: pairs, their weights and hard negatives."""
    pairs: list[tuple[str, str]]                 # (query source [#crop=...], clicked item uri)
    weights: list[float]                         # one per pair, mean 1 (all 1 without propensities)
    negatives: dict[str, list[str]]              # query source -> items shown above a click, skipped
    model: PositionBasedModel | None
    stats: dict = field(default_factory=dict)


def click_pairs(click_log: ClickLog, *, ips: bool = True, clip: float = 10.0,
                max_rank: int | None = None, since_ms: int | None = None) -> ClickPairs:
    """Pairs, inverse-propensity weights and skip-above negatives from a counted click log.

    With ``since_ms`` only the clicks logged after it (``ts``, ms) make pairs (the clicks since
    the serving version was trained); the examination propensities are still fitted on the whole
    log: the position bias is the result page's, not a version's, and more of the log fits it
    better."""
    if clip < 1:
        raise ValueError(f"the propensity clip must be at least 1, got {clip}")
    stats = {"clicks_without_uris": 0, "bad_crops": 0, "negatives": 0, "negatives_without_uri": 0}
    if since_ms:
        stats.update(clicks_since_ms=int(since_ms), clicks_before_since=0)
    qs, items, ranks, cs = observations(click_log)
    model = fit_pbm(qs, items, ranks, cs, max_rank=max_rank) if qs and any(cs) else None
    weighted = ips and model is not None and model.identifying_pairs > 0
    if ips and model is not None and not weighted:
        log.warning("click propensities cannot be estimated: no (query, item) was shown at two ranks; "
                    "the click pairs are not weighted")
    clicked_by_query: dict[str, set[str]] = {}
    for c in click_log.clicks:
        clicked_by_query.setdefault(c["query_id"], set()).add(str(c.get("item_id")))
    pairs, weights, negatives = [], [], {}
    for c in click_log.clicks:
        if since_ms and int(c.get("ts") or 0) <= since_ms:
            stats["clicks_before_since"] += 1
            continue
        imp = click_log.impressions[c["query_id"]]
        results = [r for r in imp.get("results") or () if isinstance(r, dict)]
        rank = next((r.get("rank") for r in results if str(r.get("id")) == str(c.get("item_id"))), None)
        rank = rank if isinstance(rank, int) and rank >= 1 else c.get("rank") or 1
        if not c.get("query_uri") or not c.get("item_uri"):
            stats["clicks_without_uris"] += 1
            continue
        try:
            query = with_crop(c["query_uri"], c.get("crop"))
        except InvalidImage:
            stats["bad_crops"] += 1
            continue
        pairs.append((query, c["item_uri"]))
        weights.append(model.weight(rank, clip) if weighted else 1.0)
        for r in results:
            if not isinstance(r.get("rank"), int) or r["rank"] >= rank:
                continue
            if str(r.get("id")) in clicked_by_query[c["query_id"]]:
                continue
            if not r.get("uri"):
                stats["negatives_without_uri"] += 1
                continue
            negs = negatives.setdefault(query, [])
            if r["uri"] not in negs:
                negs.append(r["uri"])
    positives: dict[str, set[str]] = {}
    for q, item in pairs:
        positives.setdefault(q, set()).add(item)
    for q in list(negatives):                     # clicked in another search of the same query
        negatives[q] = [n for n in negatives[q] if n not in positives[q]]
        if not negatives[q]:
            del negatives[q]
    stats["negatives"] = sum(len(v) for v in negatives.values())
    if weights:
        mean = float(np.mean(weights))
        weights = [w / mean for w in weights]
    stats.update(pairs=len(pairs), queries_with_negatives=len(negatives), weighted=weighted,
                 propensity_clip=clip if weighted else None, propensities=propensity_table(click_log, model, clip)
                 if model is not None else [],
                 identifying_pairs=model.identifying_pairs if model else 0)
    return ClickPairs(pairs, weights, negatives, model, stats)


def propensity_table(click_log: ClickLog, model: PositionBasedModel, clip: float) -> list[dict]:
    """Per rank: results shown, clicks, raw CTR, the estimated examination relative to rank 1,
    the clipped weight of a click there and the inverse-propensity-weighted CTR."""
    _, _, ranks, cs = observations(click_log)
    ranks, cs = np.asarray(ranks), np.asarray(cs)
    rows = []
    for k in range(1, int(ranks.max()) + 1):
        at = ranks == k
        shown, clicks = int(at.sum()), int(cs[at].sum())
        if not shown:
            continue
        w = model.weight(k, clip)
        rows.append({"rank": k, "shown": shown, "clicks": clicks, "ctr": round(clicks / shown, 4),
                     "examination": round(model.propensity(k), 4), "weight": round(w, 3),
                     "ips_ctr": round(clicks * w / shown, 4)})
    return rows


def format_propensities(rows: list[dict]) -> str:
    lines = [f"{'rank':>4} {'shown':>7} {'clicks':>7} {'CTR':>7} {'examined':>9} {'weight':>7} {'IPS CTR':>8}"]
    for r in rows:
        lines.append(f"{r['rank']:>4} {r['shown']:>7} {r['clicks']:>7} {r['ctr']:>7.3f} "
                     f"{r['examination']:>9.3f} {r['weight']:>7.2f} {r['ips_ctr']:>8.3f}")
    return "\n".join(lines)
