"""Online experiments with simulated users: ``python -m bench.experiment [--quick]``.

Users search a labelled catalog and click by a position-based click model (each shown result is
examined with a probability that falls with its rank, and clicked when examined with a
probability that depends on whether it is relevant, i.e. has the query's label: the ClickModel
of ``vsearch.local.simusers``, here times the user's own propensity): position bias is in the
logs as in real ones. Two rankers score the same candidate pool (relevance signal + correlated noise); the candidate weighs relevance more,
so it places relevant items higher: a known true CTR lift (computed exactly from the model).
Each simulated session is one randomisation unit with a few queries.

Reports, with the decision rule of :mod:`vsearch.core.experiment_stats` (the functions the
operator's ``analyze`` calls, fed the same cumulative sums at each look):

1. sessions until a decision at the configured error rate, A/B vs team-draft interleaving
   (median over repetitions; the ratio);
2. the false-positive rate of A/A experiments (both arms the same ranker) looked at every
   ``--look-every`` sessions, with its binomial (Clopper-Pearson) interval, against alpha; the
   baseline in the same run: a fixed-horizon 95 % interval checked at every look (peeking);
3. the search service's p50/p99 and QPS with no experiment, an A/B and an interleaving experiment
   (the price of interleaving's two retrievals), on live local processes (:func:`service_latency`;
   ``--no-service`` skips it).

The click model is :class:`vsearch.local.simusers.ClickModel`'s (the demo's simulated users), and
the vectorised team draft is checked against :func:`vsearch.core.experiment.team_draft` in every
run (:func:`check_product_parts`; exit 1 when they differ).

``analyze()`` itself is run on the events of one simulated experiment of each design, to check
that the fast path here decides as the operator does at the same look.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

from vsearch.core.experiment import (
    CANDIDATE,
    EXPERIMENT_KEY,
    INTERLEAVED,
    SERVING,
    Experiment,
    in_experiment,
    new_experiment,
)
from vsearch.core.experiment import team_draft as core_team_draft
from vsearch.core.experiment_stats import (
    Policy,
    analyze,
    beta_binomial_log_evalue,
    decide_interval,
    lift_moments,
    lift_threshold,
    normal_mixture_halfwidth,
    preference_threshold,
    ratio_moments,
)
from vsearch.core.naming import collection_name
from vsearch.core.store import MilvusStore
from vsearch.local.samples import caltech_photos, write_sample_catalog
from vsearch.local.services import free_port, start_embedder, start_milvus_lite_server, start_search
from vsearch.local.simusers import USER_HEADER, ClickModel
from vsearch.predictor.client import EmbedderClient
from vsearch.predictor.model_dir import default_model_dir, read_meta


@dataclass
class World:
    """The simulated catalog, rankers and users."""

    pool: int = 30                   # candidate items a ranker orders per query
    k: int = 10                      # results shown
    relevant_beta: tuple = (1.0, 4.0)  # share of a pool with the query's label ~ Beta: queries differ
    serving_signal: float = 1.0      # score = signal * relevant + noise
    candidate_signal: float = 1.2
    noise_corr: float = 0.8          # correlation of the two rankers' noise
    # the position-based click model of the demo's simulated users (vsearch.local.simusers):
    # P(examined at rank r) = 1 / r ** eta; P(click | examined) = relevant or irrelevant, here
    # times the user's own propensity
    click: ClickModel = ClickModel(eta=1.0, relevant=0.3, irrelevant=0.02)
    queries_per_session: float = 2.0  # 1 + Poisson(this)
    propensity_shape: float = 1.0    # user propensity ~ Gamma(shape, 1/shape): mean 1, users differ
    bank: int = 20000                # queries drawn once; sessions sample from them

    @property
    def exam(self) -> np.ndarray:
        """P(examined) of each rank 1..k: the click model's ``examine``."""
        return np.array([self.click.examine(r) for r in range(1, self.k + 1)])

    def attract(self, rel: np.ndarray) -> np.ndarray:
        """P(click | examined) of results of relevance ``rel``, for a user of propensity 1."""
        return np.where(rel, self.click.relevant, self.click.irrelevant)


class Simulation:
    """Banks of ranked result lists (relevance per position) and team-draft interleavings; fresh
    sessions, users and clicks sampled from them."""

    def __init__(self, world: World, seed: int = 0, aa: bool = False):
        self.w, self.rng, self.aa = world, np.random.default_rng(seed), aa
        w, rng = world, self.rng
        rel = rng.random((w.bank, w.pool)) < rng.beta(*w.relevant_beta, (w.bank, 1))
        e1 = rng.standard_normal((w.bank, w.pool))
        e2 = w.noise_corr * e1 + np.sqrt(1 - w.noise_corr ** 2) * rng.standard_normal((w.bank, w.pool))
        ra = np.argsort(-(w.serving_signal * rel + e1), axis=1)
        rb = ra if aa else np.argsort(-(w.candidate_signal * rel + e2), axis=1)
        rows = np.arange(w.bank)[:, None]
        self.rel_serving = rel[rows, ra[:, :w.k]]
        self.rel_candidate = rel[rows, rb[:, :w.k]]
        items, teams = team_draft(ra, rb, w.k, rng)
        self.rel_inter, self.team_inter = rel[rows, items], teams         # team True: candidate's item

    def true_ctr(self) -> tuple[float, float]:
        """Expected clicks per impression of each ranker (exact for the bank: E[propensity] = 1)."""
        f = [(self.w.exam * self.w.attract(r)).sum(1).mean() for r in (self.rel_serving, self.rel_candidate)]
        return float(f[0]), float(f[1])

    def sessions(self, n: int):
        """n sessions: per query its session, bank row, and the propensity of its user."""
        q = 1 + self.rng.poisson(self.w.queries_per_session, n)
        sess = np.repeat(np.arange(n), q)
        prop = self.rng.gamma(self.w.propensity_shape, 1 / self.w.propensity_shape, n)[sess]
        return sess, self.rng.integers(0, self.w.bank, len(sess)), prop

    def clicks(self, rel: np.ndarray, prop: np.ndarray) -> np.ndarray:
        """Position-based click model: [queries, k] booleans."""
        w = self.w
        examined = self.rng.random(rel.shape) < w.exam
        attract = np.minimum(1.0, w.attract(rel) * prop[:, None])
        return examined & (self.rng.random(rel.shape) < attract)


def team_draft(ra: np.ndarray, rb: np.ndarray, k: int, rng, first: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Team-draft interleaving (Radlinski et al. 2008) of many queries at once: rankings ra
    (serving) and rb (candidate), [queries, pool] item indices -> shown items and whether each
    came from the candidate, [queries, k]. The team with fewer picks picks its best item not
    shown yet; a coin decides between equals, as ``vsearch.core.experiment.team_draft`` does
    (:func:`check_product_parts` checks they agree). The coin is ``rng``'s here (the service's is
    a hash seeded by the query id), or ``first[:, j]``: whether the candidate picks first in the
    j-th pair of picks (with a pool of at least ``k`` items, the picks tie before each pair)."""
    n, pool = ra.shape
    rows = np.arange(n)
    shown = np.zeros((n, pool), bool)
    items, teams = np.empty((n, k), np.int64), np.empty((n, k), bool)
    picks_a, picks_b = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for pos in range(k):
        coin = rng.random(n) < 0.5
        if first is not None:
            coin = first[:, pos // 2]
        cand = (picks_b < picks_a) | ((picks_a == picks_b) & coin)
        ranking = np.where(cand[:, None], rb, ra)
        first_free = (~shown[rows[:, None], ranking]).argmax(1)
        item = ranking[rows, first_free]
        shown[rows, item] = True
        items[:, pos], teams[:, pos] = item, cand
        picks_b += cand
        picks_a += ~cand
    return items, teams


def check_product_parts(world: World, n: int = 2000, seed: int = 0) -> list[str]:
    """This benchmark's vectorised parts against the product's: the team draft against
    ``vsearch.core.experiment.team_draft`` on ``n`` pairs of correlated rankings (given the same
    coins: the service's coin, a hash of the query id, is read off its own merge), and the click
    probabilities against ``vsearch.local.simusers.ClickModel.probabilities``. Problems found."""
    rng = np.random.default_rng(seed)
    w = world
    e1 = rng.standard_normal((n, w.pool))
    ra = np.argsort(-e1, axis=1)
    rb = np.argsort(-(w.noise_corr * e1 + np.sqrt(1 - w.noise_corr ** 2) * rng.standard_normal((n, w.pool))), axis=1)
    product = [core_team_draft([str(x) for x in ra[i]], [str(x) for x in rb[i]], w.k, seed=f"q{i}") for i in range(n)]
    first = np.array([[product[i][2 * j][1] == CANDIDATE for j in range((w.k + 1) // 2)] for i in range(n)])
    items, teams = team_draft(ra, rb, w.k, rng, first=first)
    problems = []
    differ = [i for i in range(n) if [(str(x), CANDIDATE if t else SERVING) for x, t in zip(items[i], teams[i])]
              != product[i]]
    if differ:
        problems.append(f"team draft: {len(differ)}/{n} merges differ from vsearch.core.experiment.team_draft "
                        f"(first: query {differ[0]})")
    rel = rng.random((200, w.k)) < 0.3
    mine = w.exam * w.attract(rel)
    theirs = np.array([w.click.probabilities(r) for r in rel])
    if not np.allclose(mine, theirs, rtol=1e-12, atol=0):
        problems.append("click model: P(click) differs from vsearch.local.simusers.ClickModel.probabilities")
    return problems


def looks(n_sessions: int, every: int) -> np.ndarray:
    return np.arange(every, n_sessions + 1, every)


@dataclass
class Sample:
    """One simulated experiment, per query: its session (the unit), bank row, whether it is in
    the experiment (A/B: the candidate arm; interleave: interleaved), the relevance of each shown
    result, its team (interleaved queries: True = the candidate's) and the clicks."""

    design: str
    n_sessions: int
    sess: np.ndarray
    row: np.ndarray
    inside: np.ndarray
    rel: np.ndarray
    team: np.ndarray
    clk: np.ndarray


def simulate(sim: Simulation, design: str, n_sessions: int, share: float) -> Sample:
    sess, row, prop = sim.sessions(n_sessions)
    inside = (sim.rng.random(n_sessions) < share)[sess]
    team = np.zeros((len(sess), sim.w.k), bool)
    if design == "ab":
        rel = np.where(inside[:, None], sim.rel_candidate[row], sim.rel_serving[row])
    elif sim.aa:
        rel, team[inside] = sim.rel_serving[row], aa_teams(sim.rng, int(inside.sum()), sim.w.k)
    else:
        rel = np.where(inside[:, None], sim.rel_inter[row], sim.rel_serving[row])
        team[inside] = sim.team_inter[row[inside]]
    return Sample(design, n_sessions, sess, row, inside, rel, team, sim.clicks(rel, prop))


def decisions(s: Sample, policy: Policy, every: int, fixed: bool = False):
    """The decision at each look (every ``every`` sessions): +1 promote, -1 abort, 0 none; the
    sessions seen at each look; the estimate (relative CTR lift or preference) at each look. The rule of ``experiment_stats`` on the cumulative sums of the
    look; ``fixed``: a fixed-horizon 1-alpha interval instead of the confidence sequence (peeking)."""
    at = looks(s.n_sessions, every) - 1
    if s.design == "ab":
        arm = np.bincount(s.sess, s.inside, s.n_sessions) > 0           # per session: the candidate arm
        c = np.bincount(s.sess, s.clk.sum(1), s.n_sessions)
        n = np.bincount(s.sess, None, s.n_sessions)
        stats = {}
        for name, mask in (("serving", ~arm), ("candidate", arm)):
            cum = [np.cumsum(x * mask)[at] for x in (n, c, n * n, c * c, n * c, np.ones(s.n_sessions))]
            stats[name] = ratio_moments(*cum), cum[-1]
        (rs, vs), ks = stats["serving"]
        (rc, vc), kc = stats["candidate"]
        est, var = lift_moments(rs, vs, rc, vc)
        z = norm.ppf(1 - policy.alpha / 2)
        hw = z * np.sqrt(var) if fixed else normal_mixture_halfwidth(var, ks + kc, policy.alpha, policy.rho2)
        d = decide_interval(est - hw, est + hw, lift_threshold(policy))
        return np.where(np.isfinite(hw) & (ks + kc >= policy.min_units), d, 0), at + 1, est
    cand, serv = (s.clk & s.team).sum(1), (s.clk & ~s.team).sum(1)
    w = np.cumsum(np.bincount(s.sess, s.inside & (cand > serv), s.n_sessions))[at]
    l_ = np.cumsum(np.bincount(s.sess, s.inside & (cand < serv), s.n_sessions))[at]
    p0 = preference_threshold(policy)
    if fixed:
        lo, hi = proportion_confint(w, np.maximum(w + l_, 1), policy.alpha, method="wilson")
        d = decide_interval(lo, hi, p0)
    else:
        excluded = beta_binomial_log_evalue(w, l_, p0, policy.beta_a) >= np.log(1 / policy.alpha)
        d = np.where(excluded, np.sign(w / np.maximum(w + l_, 1) - p0), 0).astype(int)
    with np.errstate(invalid="ignore"):
        pref = w / (w + l_)
    return np.where(w + l_ >= policy.min_units, d, 0), at + 1, pref


def aa_teams(rng, n: int, k: int) -> np.ndarray:
    """Team draft of two identical rankings: the list itself; each pair of picks is (serving,
    candidate) or (candidate, serving) by a coin."""
    first = rng.random((n, (k + 1) // 2)) < 0.5
    return np.stack([first, ~first], axis=2).reshape(n, -1)[:, :k]



def first_decision(d: np.ndarray, sessions: np.ndarray) -> tuple[int, int | None]:
    hit = np.flatnonzero(d != 0)
    return (int(d[hit[0]]), int(sessions[hit[0]])) if len(hit) else (0, None)


def sessions_to_decision(world: World, design: str, reps: int, cap: int, share: float, policy: Policy,
                         every: int, seed: int) -> dict:
    sim = Simulation(world, seed)
    found, correct = [], 0
    for _ in range(reps):
        d, s, _ = decisions(simulate(sim, design, cap, share), policy, every)
        verdict, at = first_decision(d, s)
        correct += verdict > 0
        found.append(at if at is not None else np.inf)
    found = np.array(found, float)
    return {"median": float(np.median(found)), "p90": float(np.percentile(found, 90)),
            "correct": correct, "reps": reps}


def aa_false_positives(world: World, design: str, reps: int, horizon: int, share: float, policy: Policy,
                       every: int, seed: int, fixed: bool = False) -> dict:
    sim = Simulation(world, seed, aa=True)
    decided = 0
    for _ in range(reps):
        d, s, _ = decisions(simulate(sim, design, horizon, share), policy, every, fixed=fixed)
        decided += first_decision(d, s)[0] != 0
    lo, hi = proportion_confint(decided, reps, policy.alpha, method="beta")
    return {"decided": decided, "reps": reps, "rate": decided / reps, "interval": (float(lo), float(hi))}


# ---- the operator's path on the events of one simulated experiment

def experiment_events(s: Sample, exp_id: str = "exp-bench") -> list[dict]:
    """The ``search.events`` records of a simulated experiment as the search service writes them
    (impressions with the arm and, interleaved, each result's team; clicks)."""
    arms = ("serving", "candidate") if s.design == "ab" else ("outside", "interleaved")
    records = []
    for q in range(len(s.sess)):
        arm = arms[int(s.inside[q])]
        exp = {"id": exp_id, "design": s.design, "arm": arm, "unit": f"u{s.sess[q]}"}
        interleaved = s.design == "interleave" and s.inside[q]
        results = [{"id": f"r{s.row[q]}-{i}", "rank": i + 1, "score": 0.0,
                    **({"team": "candidate" if s.team[q, i] else "serving"} if interleaved else {})}
                   for i in range(s.rel.shape[1])]
        qid = f"q{q}"
        records.append({"schema": 1, "type": "impression", "query_id": qid, "model_version": arm,
                        "ts": int(s.sess[q]), "results": results, "experiment": exp, "took_ms": 10.0})
        for i in np.flatnonzero(s.clk[q]):
            records.append({"schema": 1, "type": "click", "query_id": qid, "item_id": results[i]["id"],
                            "rank": int(i) + 1, "model_version": arm, "ts": int(s.sess[q]) + 1,
                            "experiment": {**exp, **({"team": results[i]["team"]} if interleaved else {})}})
    return records


def check_operator_path(world: World, policy: Policy, share: dict, n_sessions: int, seed: int) -> list[dict]:
    """The operator's ``analyze()`` on the events of one simulated experiment per design, with the
    decision this benchmark's fast path takes at the same (last) look: they must agree."""
    out = []
    for design in ("ab", "interleave"):
        s = simulate(Simulation(world, seed), design, n_sessions, share[design])
        r = analyze(experiment_events(s), "exp-bench", policy)
        d, _, est = decisions(s, policy, n_sessions)
        out.append({"design": design, "sessions": n_sessions, "decision": r["decision"], "code": r["code"],
                    "metric": r["effect"]["metric"], "estimate": r["effect"]["estimate"],
                    "interval": r["effect"]["interval"], "fastEstimate": round(float(est[-1]), 6),
                    "fast": {1: "promote", -1: "abort", 0: "continue"}[int(d[-1])]})
    return out


# ---- (3) the search service's latency with an experiment running vs without

SERVICE_DESIGNS = (("no experiment", None), ("A/B", "ab"), ("interleaving", "interleave"))
INSIDE_LABEL = {"ab": "its candidate arm", "interleave": "its interleaved queries"}


def _catalog(n: int, workdir: Path) -> list[tuple[str, bytes, str]]:
    """(id, JPEG bytes, label) of ``n`` real Caltech-101 photos (every class in turn), or of the
    demo's sample catalog (scikit-image photos and variants) when the subset is absent."""
    photos = caltech_photos(n_classes=1000, per_class=max(1, n // 100 + 1))
    if photos:
        photos = photos[::max(1, len(photos) // n)][:n]
        return [(f"c{i:04d}", p.read_bytes(), label) for i, (p, label) in enumerate(photos)]
    items = write_sample_catalog(workdir / "samples")
    return [(it["id"], Path(it["path"]).read_bytes(), it["metadata"]["label"]) for it in items[:n]]


def _candidate_model(workdir: Path) -> Path:
    """A second model version: a copy of the default model under another version. Same weights,
    so the same cost per query as serving: the difference measured is the experiment's."""
    src = default_model_dir()
    dst = workdir / "candidate-model"
    shutil.copytree(src, dst)
    meta = json.loads((dst / "vsearch_model.json").read_text())
    meta["version"] = f"{meta['version']}-bench"
    (dst / "vsearch_model.json").write_text(json.dumps(meta, indent=2))
    return dst


def _build(store: MilvusStore, url: str, version: str, names: list[str], catalog) -> list[str]:
    """Collections ``names`` of ``catalog`` embedded by the embedder at ``url``, each with the
    model record the operator writes (model, version, embedder_url, served_version)."""
    client = EmbedderClient(url, timeout=120.0)
    vecs = client.embed_bytes([b for _, b, _ in catalog])
    now = int(time.time() * 1000)
    out = []
    for name in names:
        coll = collection_name(name, version)
        store.ensure_model_collection(coll, int(vecs.shape[1]), {
            "model": name, "version": version, "embedder_url": url, "served_version": str(client.version or "")})
        store.upsert(coll, [{"id": i, "embedding": v, "uri": f"file:///catalog/{i}.jpg",
                             "metadata": {"label": label, "content_hash": hashlib.sha256(b).hexdigest()},
                             "visibility": "public", "updated_at": now}
                            for (i, b, label), v in zip(catalog, vecs)])
        store.flush(coll)
        out.append(coll)
    return out


def _users(exp: Experiment | None, n: int, share: float) -> list[str]:
    """An ``X-User-Id`` per query: with an experiment, ids chosen so that exactly
    ``round(n * share)`` of the queries, spread evenly (every other one at 0.5), land in it."""
    inside = {int(i) for i in np.round(np.arange(round(n * share)) / share)} & set(range(n))
    out = []
    for q in range(n):
        j = 0
        while True:
            u = f"user-{q}-{j}"
            if exp is None or in_experiment(exp, u) == (q in inside):
                break
            j += 1
        out.append(u)
    return out


class _Clients:
    """``n`` client threads, each with its own keep-alive HTTP session, for the whole run."""

    def __init__(self, n: int):
        self.n, self.pool, self.local = n, ThreadPoolExecutor(n), threading.local()

    def _one(self, url: str, photo: bytes, user: str, k: int = 10) -> tuple[float, str | None]:
        if not hasattr(self.local, "s"):
            self.local.s = requests.Session()
        t0 = time.perf_counter()
        r = self.local.s.post(f"{url}/search", files={"image": ("q.jpg", photo, "image/jpeg")},
                              data={"k": str(k)}, headers={USER_HEADER: user}, timeout=60)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"search answered {r.status_code}: {r.text[:300]}")
        return dt, (r.json().get("experiment") or {}).get("arm")

    def send(self, url: str, photos: list[bytes], users: list[str]) -> tuple[list, float]:
        """Each query once, ``n`` at a time: per query the seconds and the arm the answer names;
        the wall time of all."""
        t0 = time.perf_counter()
        out = list(self.pool.map(lambda q: self._one(url, photos[q], users[q]), range(len(photos))))
        return out, time.perf_counter() - t0

    def close(self):
        self.pool.shutdown()


def service_latency(args) -> list[dict] | None:
    """(3): the search service's latency with no experiment, an A/B and an interleaving
    experiment (share ``args.service_share``), measured in one run on live local processes: a
    ``milvus-lite server``; two model versions (the default model and a copy under another
    version: the same cost per query), each with its own embedder server; a candidate
    collection and three serving collections of the same catalog, built through the embedders
    with the operator's model records, each behind its own alias with its own ``vsearch serve
    search --embedder-url`` (one search service per setting, so the settings alternate query by
    query and a slow moment of the shared machine touches all three alike). The experiments are
    the serving collections' ``vsearch.experiment`` property, as the operator writes it.

    A fixed set of queries, each with an ``X-User-Id`` (exactly the experiment's share of them in
    it), is sent by 1 client (the three settings in turn at each query) and by
    ``args.service_clients`` concurrent ones (in blocks of 4 per client, the settings in turn),
    ``args.service_rounds`` times. Latency is the client's. Rows ``{"label", "clients", "p50",
    "p99", "qps", "n"}`` (ms; qps None for a subset of a run's queries), per client count the
    baseline first; None when ``args.no_service``."""
    if args.no_service:
        return None
    workdir = Path(tempfile.mkdtemp(prefix="bench-experiment-"))
    services, store, made, clients = [], None, [], []
    aliases = {d: f"bench_exp_{d or 'none'}" for _, d in SERVICE_DESIGNS}
    try:
        milvus = start_milvus_lite_server(workdir / "milvus", log_path=workdir / "milvus.log")
        services.append(milvus)
        ports = free_port(), free_port()
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        with ThreadPoolExecutor(5) as pool:        # the five servers start together
            started = [pool.submit(start_embedder, d, port=port, log_path=workdir / f"embedder-{i}.log",
                                   extra=("--threads", "1"), timeout=240)
                       for i, (d, port) in enumerate(zip((default_model_dir(), _candidate_model(workdir)), ports))]
            started += [pool.submit(start_search, "--milvus-uri", milvus.uri, "--alias", aliases[d],
                                    "--embedder-url", urls[0], "--allowed-embedder-urls", urls[1],
                                    "--query-store", "", "--threads", "1",
                                    log_path=workdir / f"search-{d}.log", timeout=240)
                        for _, d in SERVICE_DESIGNS]
            catalog = _catalog(args.service_catalog, workdir)
            try:
                serving_emb, cand_emb, *searches = [f.result() for f in started]
            finally:
                services += [f.result() for f in started if f.exception() is None]
        store = MilvusStore(milvus.uri, timeout=60)
        smeta, cmeta = read_meta(default_model_dir()), read_meta(workdir / "candidate-model")
        made += _build(store, serving_emb.url, smeta.version, [f"bench_serving_{d or 'none'}"
                                                                for _, d in SERVICE_DESIGNS], catalog)
        made += _build(store, cand_emb.url, cmeta.version, ["bench_candidate"], catalog)
        serving, candidate = dict(zip((d for _, d in SERVICE_DESIGNS), made[:3])), made[3]
        url = {d: s.url for (_, d), s in zip(SERVICE_DESIGNS, searches)}
        step = max(1, len(catalog) // args.service_queries)
        photos = [b for _, b, _ in catalog[::step][:args.service_queries]]
        now = int(time.time() * 1000)
        exps = {d: None if d is None else new_experiment(d, args.service_share, candidate, serving[d], now)
                for _, d in SERVICE_DESIGNS}
        users = {d: _users(e, len(photos), args.service_share) for d, e in exps.items()}
        one, many = _Clients(1), _Clients(args.service_clients)
        clients += [one, many]
        for _, d in SERVICE_DESIGNS:
            with _quiet("pymilvus"):               # it logs the alias it looks up first as an error
                store.switch_alias(aliases[d], serving[d])
            if exps[d] is not None:
                store.set_collection_property(serving[d], EXPERIMENT_KEY, exps[d].to_json())
            _wait_for(url[d], photos[0], users[d][0], exps[d])
            one.send(url[d], photos[:4], users[d][:4])                 # warm-up
        got: dict[tuple, list] = {}
        walls: dict[tuple, float] = {}
        order = [d for _, d in SERVICE_DESIGNS]

        def run(c: _Clients, d, qs: list[int]):
            out, wall = c.send(url[d], [photos[q] for q in qs], [users[d][q] for q in qs])
            got.setdefault((d, c.n), []).extend(out)
            walls[(d, c.n)] = walls.get((d, c.n), 0.0) + wall

        block = 4 * many.n
        for rnd in range(args.service_rounds):
            for q in range(len(photos)):
                turn = (q + rnd) % 3
                for d in order[turn:] + order[:turn]:
                    run(one, d, [q])
            qs = list(range(len(photos))) * 2                          # each query twice: a steadier load
            for b in range(0, len(qs), block):
                turn = (b // block + rnd) % 3
                for d in order[turn:] + order[:turn]:
                    run(many, d, qs[b:b + block])
        rows = []
        for c in (one, many):
            for label, d in SERVICE_DESIGNS:
                out = got[(d, c.n)]
                ms = np.array([dt for dt, _ in out]) * 1000
                name = label if d is None else f"{label}, share {args.service_share:g}"
                rows.append({"label": name, "clients": c.n, "p50": float(np.percentile(ms, 50)),
                             "p99": float(np.percentile(ms, 99)), "qps": len(ms) / walls[(d, c.n)], "n": len(ms)})
                arms = {arm for _, arm in out}
                if d is None:
                    if arms != {None}:
                        raise RuntimeError(f"answers without an experiment named arms {arms}")
                    continue
                inside = np.array([dt for dt, arm in out if arm in (CANDIDATE, INTERLEAVED)]) * 1000
                if abs(len(inside) / len(out) - args.service_share) > 1 / len(photos):
                    raise RuntimeError(f"{label}: {len(inside)} of {len(out)} answers in the experiment")
                rows.append({"label": "  " + INSIDE_LABEL[d], "clients": c.n, "p50": float(np.percentile(inside, 50)),
                             "p99": float(np.percentile(inside, 99)), "qps": None, "n": len(inside)})
        return rows
    finally:
        for c in clients:
            c.close()
        for svc in reversed(services):
            svc.stop()
        if store is not None:
            store.close()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _quiet(logger: str):
    lg = logging.getLogger(logger)
    level = lg.level
    lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        lg.setLevel(level)


def _wait_for(url: str, photo: bytes, user: str, exp: Experiment | None, timeout: float = 15.0) -> None:
    """Until the service answers with ``exp`` (or with none): it re-reads the property every
    ``resolve_ttl`` (1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        r = requests.post(f"{url}/search", files={"image": ("q.jpg", photo, "image/jpeg")}, data={"k": "10"},
                          headers={USER_HEADER: user}, timeout=60)
        r.raise_for_status()
        seen = (r.json().get("experiment") or {}).get("id")
        if seen == (exp.id if exp else None):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the search service still answers with experiment {seen}, not {exp and exp.id}")
        time.sleep(0.2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (tests)")
    p.add_argument("--reps", type=int, default=40, help="experiments per design for (1)")
    p.add_argument("--aa", type=int, default=200, help="A/A experiments per design for (2)")
    p.add_argument("--cap", type=int, default=60000, help="most sessions of one experiment in (1)")
    p.add_argument("--horizon", type=int, default=10000, help="sessions of each A/A experiment in (2)")
    p.add_argument("--look-every", type=int, default=50, help="sessions between two looks")
    p.add_argument("--ab-share", type=float, default=0.5, help="A/B: share of sessions in the candidate arm")
    p.add_argument("--interleave-share", type=float, default=1.0, help="interleaving: share of sessions interleaved")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--min-units", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-service", action="store_true",
                   help="skip (3), the live search service's latency (it starts Milvus Lite, two embedders, a search service)")
    p.add_argument("--service-share", type=float, default=0.5, help="(3): the experiments' share of users")
    p.add_argument("--service-clients", type=int, default=4, help="(3): concurrent clients of the second run")
    p.add_argument("--service-queries", type=int, default=20, help="(3): queries per setting, run and round")
    p.add_argument("--service-rounds", type=int, default=3, help="(3): rounds over the three settings")
    p.add_argument("--service-catalog", type=int, default=300, help="(3): catalog photos in each collection")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.aa, args.cap, args.horizon = 8, 60, 20000, 3000
        args.service_queries, args.service_rounds, args.service_catalog = 12, 1, 100
    world = World()
    policy = Policy(alpha=args.alpha, min_units=args.min_units, promote_when="better")
    t0 = time.perf_counter()
    cs, cc = Simulation(world, args.seed).true_ctr()
    print(f"bench.experiment: simulated users, position-based clicks; true CTR serving {cs:.4f}, candidate "
          f"{cc:.4f} (lift {cc / cs - 1:+.1%}); alpha {policy.alpha}, promote when better, min units "
          f"{policy.min_units}, a look every {args.look_every} sessions; A/B: {args.ab_share:.0%} of sessions in the "
          f"candidate arm, interleaving: {args.interleave_share:.0%} of sessions interleaved")
    problems = check_product_parts(world, 500 if args.quick else 2000, args.seed + 4)
    print("checked against the product: the team draft (vsearch.core.experiment.team_draft) and the click "
          "model (vsearch.local.simusers.ClickModel): " + ("; ".join(problems) or "the same"))
    print(f"\n(1) sessions until a decision ({args.reps} experiments per design, at most {args.cap} sessions)")
    print(f"{'design':<44} {'median':>8} {'p90':>8} {'promoted':>9} {'vs A/B':>8}")
    share = {"ab": args.ab_share, "interleave": args.interleave_share}
    rows = {d: sessions_to_decision(world, d, args.reps, args.cap, share[d], policy, args.look_every, args.seed + 1)
            for d in ("ab", "interleave")}
    names = {"ab": "A/B (CTR lift, normal-mixture sequence)", "interleave": "interleaving (team draft, beta-binomial)"}
    for d, r in rows.items():
        ratio = rows["ab"]["median"] / r["median"]
        med, p90 = (f"{x:.0f}" if np.isfinite(x) else f">{args.cap}" for x in (r["median"], r["p90"]))
        print(f"{names[d]:<44} {med:>8} {p90:>8} {r['correct']:>4}/{r['reps']:<4} {ratio:>7.1f}x")
    print(f"\n(2) A/A false positives ({args.aa} experiments per row, {args.horizon} sessions each, looked at "
          f"every {args.look_every}; must be <= alpha {policy.alpha})")
    print(f"{'design, rule':<66} {'decided':>8} {'rate':>6} {'95% interval':>16}  <= alpha")
    fpr = {}
    for d in ("ab", "interleave"):
        for fixed in (False, True):
            r = aa_false_positives(world, d, args.aa, args.horizon, share[d], policy, args.look_every,
                                   args.seed + 2, fixed=fixed)
            fpr[(d, fixed)] = r
            rule = "fixed-horizon 95% interval at every look (baseline)" if fixed else "always-valid sequence"
            ok = "yes" if r["rate"] <= policy.alpha else "NO"
            print(f"{names[d].split(' (')[0] + ', ' + rule:<66} {r['decided']:>4}/{r['reps']:<3} {r['rate']:>6.3f} "
                  f"[{r['interval'][0]:.3f}, {r['interval'][1]:.3f}]  {ok}")
    print("\n(3) the search service's latency with an experiment running vs without (live local processes)")
    lat = service_latency(args)
    if lat is None:
        print("skipped (--no-service)")
    else:
        print(f"milvus-lite server; two model versions (the default model and a copy: the same cost), each with its "
              f"own embedder server; {args.service_catalog} photos in each collection; one vsearch serve search per "
              f"setting, the settings in turn query by query (1 client) or block by block ({args.service_clients} "
              f"clients); {args.service_queries} query photos (with {args.service_clients} clients each sent twice) "
              f"x {args.service_rounds} rounds, top 10, an X-User-Id each; experiments with share "
              f"{args.service_share:g} (exactly that share of the queries in them); latency as the client sees it")
        print(f"{'setting':<40} {'clients':>7} {'queries':>7} {'p50 ms':>8} {'p99 ms':>8} {'QPS':>7} {'p50 vs none':>12}")
        base = {r["clients"]: r["p50"] for r in lat if r["label"] == "no experiment"}
        for r in lat:
            qps = f"{r['qps']:.1f}" if r["qps"] is not None else "-"
            print(f"{r['label']:<40} {r['clients']:>7} {r['n']:>7} {r['p50']:>8.1f} {r['p99']:>8.1f} {qps:>7} "
                  f"{r['p50'] / base[r['clients']]:>11.2f}x")
    print("\nthe operator's analyze() on the events of one simulated experiment per design, vs this fast path:")
    differ = 0
    for r in check_operator_path(world, policy, share, 1500 if args.quick else 3000, args.seed + 3):
        same = "same" if (r["decision"], r["estimate"]) == (r["fast"], r["fastEstimate"]) else "DIFFERENT"
        differ += same != "same"
        print(f"  {r['design']:<10} {r['sessions']} sessions: analyze() -> {r['decision']} ({r['code']}), {r['metric']} "
              f"{r['estimate']} sequence {r['interval']}; fast path -> {r['fast']}, {r['fastEstimate']} ({same})")
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    return 1 if differ or problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
