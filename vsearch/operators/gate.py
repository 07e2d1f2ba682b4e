"""The quality gate a candidate model version passes before any switch.

1. Self-consistency: a deterministic sample of the candidate collection's items, each queried
   with its own stored image through the candidate path (the candidate's embedder, then a
   search of the candidate's collection), must find itself first with a score of at least
   ``min_self_score`` (ties with identical images count as found). This catches a wrong model,
   wrong preprocessing or a broken index, not an untrained one (any model finds an identical
   image): the offline verdict (3) is on by default for that. The sample never reads the whole
   collection (:func:`sample_items`).
2. Golden set (when given): a judgments CSV ``query,candidate,grade`` (grade 0..5; ``query`` is
   an image URI or path, or ``catalog:<id>`` for a catalog item's own image; ``candidate`` is a
   catalog id), the format ``vsearch evaluate`` reads. Every query is answered by the candidate
   path and by the serving path (the serving version's embedder and collection); candidate
   nDCG@10 and recall@10 (``trainer.metrics.evaluate_ranked_lists``) must not be below the
   serving version's by more than ``margin``.
3. Offline verdict (``requireOfflineVerdict``): the candidate's embedder reports the model it
   serves (``GET /vsearch/v1/model``, from its ``vsearch_model.json``); its ``evaluation.verdict``
   (written by ``vsearch train --holdout`` or ``vsearch evaluate --write-meta``) must say that it
   beats its baselines. A model never evaluated fails this check. On by default: a randomly
   initialised model passes 1 and 2 (against a serving version as bad) but has no verdict.

What the gate reads: catalog images through the catalog fetcher (``file://`` only under the
operator's ``--catalog-file-roots``, default none); the golden set's query images through the
query fetcher, ``http(s)://`` only. A golden query naming a local file (``file://``, a path) is
refused before anything is fetched (:func:`check_golden_queries`): the operator never reads a
local file for a SearchIndex author.

The figures go into the SearchIndex status and the operator's log, pass or fail."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import time

import numpy as np

from ..core.store import filter_expr
from ..trainer.metrics import evaluate_ranked_lists

log = logging.getLogger(__name__)

K = 10
VISIBLE = filter_expr(visible_only=True)


@dataclasses.dataclass
class VersionPath:
    """How to ask one model version: its embedder (``embed_bytes``) and its concrete collection."""
    name: str                  # the version, for messages
    collection: str
    embedder: object


class GoldenSetError(ValueError):
    pass


QUERY_SCHEMES = ("http://", "https://")
SCAN_AT_MOST = 2000          # a collection up to this many visible rows is sampled from a full read
NEAREST = 4                  # items taken per random direction in larger ones


def check_golden_queries(queries) -> None:
    """Refuse (:class:`GoldenSetError`) a golden set whose queries are not ``catalog:<id>`` or an
    ``http(s)://`` URL: a ``file://`` URI or a path would have the operator read its own files
    (a service-account token, ``/proc/self/environ``) and send them to an embedder."""
    bad = [q for q in queries if not (q.startswith("catalog:") or q.lower().startswith(QUERY_SCHEMES))]
    if bad:
        raise GoldenSetError(f"golden set: {len(bad)} queries name neither catalog:<id> nor an http(s):// URL "
                             f"(the operator reads no local files), e.g. {bad[0][:200]!r}")


def fetch_query(fetcher, uri: str) -> bytes:
    """A golden query image: ``http(s)://`` only, whatever ``fetcher`` allows."""
    check_golden_queries([uri])
    return fetcher.fetch(uri)


def sample_items(store, collection: str, n: int, *, seed: str) -> list[dict]:
    """Up to ``n`` distinct visible items (``{"id", "uri"}``) with a stored image, chosen without
    reading the whole collection. Up to :data:`SCAN_AT_MOST` visible rows: a uniform sample of
    all of them (ids and URIs only). More: the :data:`NEAREST` items nearest to each of ``n``
    seeded random directions (every item can be reached; memory and time bounded by ``n`` x
    :data:`NEAREST` rows whatever the collection's size: a 200k-row collection read whole cost
    567 MiB and 414 s)."""
    rng = random.Random(seed)
    if n <= 0:
        return []
    total = store.count(collection, filter=VISIBLE)
    if total <= SCAN_AT_MOST:
        rows = list(itertools.islice(store.scan(collection, ("uri",), filter=VISIBLE), SCAN_AT_MOST))
    else:
        dim = store.dim(collection)
        gen = np.random.default_rng(rng.getrandbits(32))
        rows, seen = [], set()
        for start in range(0, n, 256):
            q = gen.standard_normal((min(256, n - start), dim)).astype(np.float32)
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            for hits in store.search(collection, q, k=NEAREST, filter=VISIBLE, output_fields=("uri",)):
                for h in hits:
                    if h["id"] not in seen:
                        seen.add(h["id"])
                        rows.append({"id": h["id"], "uri": h.get("uri")})
    rows = [r for r in rows if r.get("uri") and not str(r["uri"]).startswith("inline:")]
    rows.sort(key=lambda r: r["id"])
    return rng.sample(rows, min(n, len(rows)))


def self_consistency(store, path: VersionPath, *, sample_size: int, min_score: float, fetcher,
                     seed: int = 0) -> dict:
    """Sample items of ``path.collection`` (with fetchable images) and search each with its own
    image through ``path``. Returns the figures and the ids that did not find themselves."""
    t0 = time.monotonic()
    sample = sample_items(store, path.collection, sample_size, seed=f"{seed}:{path.collection}")
    found, missed, scores, unreadable = 0, [], [], 0
    batch = 16
    for start in range(0, len(sample), batch):
        chunk = sample[start:start + batch]
        blobs, kept = [], []
        for r in chunk:
            try:
                blobs.append(fetcher.fetch(r["uri"]))
                kept.append(r)
            except Exception as exc:  # noqa: BLE001  (a vanished image is not the model's fault)
                unreadable += 1
                log.info("gate: cannot read %s (%s): %s", r["id"], r["uri"], exc)
        if not blobs:
            continue
        vectors = path.embedder.embed_bytes(blobs)
        hits = store.search(path.collection, vectors, k=5, filter=VISIBLE, output_fields=(),
                            consistency="Strong")
        for r, h in zip(kept, hits):
            top = h[0]["score"] if h else -1.0
            mine = next((x["score"] for x in h if x["id"] == r["id"]), None)
            ok = mine is not None and mine >= top - 1e-4 and mine >= min_score
            scores.append(mine if mine is not None else top)
            if ok:
                found += 1
            else:
                missed.append(r["id"])
    checked = found + len(missed)
    return {"sampled": len(sample), "checked": checked, "found": found,
            "rate": round(found / checked, 4) if checked else None,
            "minScore": round(min(scores), 4) if scores else None,
            "unreadable": unreadable, "missed": missed[:10],
            "seconds": round(time.monotonic() - t0, 2)}


def ranked_lists(store, path: VersionPath, queries: list[str], fetcher, query_fetcher, *,
                 k: int = K) -> dict[str, list[str]]:
    """Top-``k`` catalog ids for each golden query through ``path`` (``catalog:<id>`` queries
    read the item's image with the catalog ``fetcher``, URLs with ``query_fetcher``)."""
    check_golden_queries(queries)
    out: dict[str, list[str]] = {}
    for q in queries:
        if q.startswith("catalog:"):
            item = q.split(":", 1)[1]
            rows = store.get(path.collection, [item], ("uri",))
            if item not in rows or not rows[item].get("uri"):
                raise GoldenSetError(f"golden query {q}: item {item!r} is not in {path.collection}")
            data = fetcher.fetch(rows[item]["uri"])
        else:
            data = fetch_query(query_fetcher, q)
        vec = path.embedder.embed_bytes([data])
        hits = store.search(path.collection, vec, k=k, filter=VISIBLE, output_fields=())[0]
        out[q] = [h["id"] for h in hits]
    return out


def golden_figures(store, path: VersionPath, judgments: dict, fetcher, query_fetcher) -> dict:
    rankings = ranked_lists(store, path, list(judgments), fetcher, query_fetcher)
    rep = evaluate_ranked_lists(rankings, judgments, ks=(K,))["metrics"]
    return {f"ndcg@{K}": _num(rep.get(f"ndcg@{K}")), f"recall@{K}": _num(rep.get(f"recall@{K}")),
            "queries": len(judgments)}


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)


def offline_verdict(path: VersionPath) -> tuple[dict, str | None]:
    """The candidate model's own offline evaluation, as its embedder reports it: ``(figures for
    the status, the reason it fails or None)``."""
    info = path.embedder.model_info()
    if info is None:
        return {"reported": False}, (f"offline verdict: the embedder of {path.name} does not report its model "
                                     "(GET /vsearch/v1/model: 404; an image older than the operator?)")
    model = f"{info.get('name')}:{info.get('version')}"
    ev = info.get("evaluation") or {}
    verdict = ev.get("verdict") or {}
    beats = verdict.get("beats_baselines")
    figures = {"model": model, "beatsBaselines": beats, "evaluated": ev.get("evaluated"),
               "data": (ev.get("data") or {}).get("source"),
               "metrics": {m: _num((ev.get("metrics") or {}).get(m)) for m in verdict.get("metrics") or ()},
               "against": sorted(verdict.get("against") or ())}
    if not ev:
        return figures, (f"offline verdict: {model} was never evaluated (train it with --holdout, or run "
                         "`vsearch evaluate --model-dir DIR --data ... --write-meta` before publishing)")
    if beats is None:
        return figures, f"offline verdict: {model}'s evaluation has no verdict against baselines"
    if not beats:
        lost = [line for line in (verdict.get("text") or "").splitlines() if "DOES NOT BEAT" in line]
        return figures, f"offline verdict: {'; '.join(lost) or model + ' does not beat its baselines'}"
    return figures, None


def run_gate(store, candidate: VersionPath, serving: VersionPath | None, gate, *, fetcher,
             query_fetcher=None, judgments: dict | None = None) -> dict:
    """The checks ``gate`` asks for (``fetcher`` reads catalog images, ``query_fetcher`` the golden
    set's URL queries); returns ``{"verdict": "Passed" | "Failed", "reasons": [...], "selfConsistency":
    {...}, "golden": {...}}``."""
    reasons = []
    result: dict = {}
    if gate.sample_size > 0:
        sc = self_consistency(store, candidate, sample_size=gate.sample_size,
                              min_score=gate.min_self_score, fetcher=fetcher)
        result["selfConsistency"] = sc
        if sc["checked"] == 0:
            reasons.append("self-consistency: no sampled item with a readable image")
        elif sc["rate"] < gate.min_self_consistency:
            reasons.append(f"self-consistency: {sc['found']}/{sc['checked']} sampled items found "
                           f"themselves first with score >= {gate.min_self_score} (need "
                           f"{gate.min_self_consistency:.0%}); e.g. {', '.join(sc['missed'][:3])}")
    if judgments:
        margin = gate.golden.margin
        cand = golden_figures(store, candidate, judgments, fetcher, query_fetcher)
        golden = {"candidate": cand, "margin": margin}
        if serving is not None:
            serv = golden_figures(store, serving, judgments, fetcher, query_fetcher)
            golden["serving"] = serv
            for metric in (f"ndcg@{K}", f"recall@{K}"):
                c, s = cand[metric], serv[metric]
                if c is not None and s is not None and c < s - margin:
                    reasons.append(f"golden set: candidate {metric} {c:.4f} is below the serving "
                                   f"version's {s:.4f} by more than the margin {margin}")
        result["golden"] = golden
    if gate.require_offline_verdict:
        figures, reason = offline_verdict(candidate)
        result["offline"] = figures
        if reason:
            reasons.append(reason)
    result["verdict"] = "Failed" if reasons else "Passed"
    result["reasons"] = reasons
    return result
