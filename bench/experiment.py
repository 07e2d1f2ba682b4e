"""Online experiments with simulated users: ``python -m bench.experiment [--quick]``.

Users search a labelled catalog and click by a position-based click model (each shown result is
examined with a probability that falls with its rank, and clicked when examined with a
probability that depends on whether it is relevant, i.e. has the query's label, times the
user's own propensity): position bias is in the logs as in real ones. Two rankers score the
same candidate pool (relevance signal + correlated noise); the candidate weighs relevance more,
so it places relevant items higher: a known true CTR lift (computed exactly from the model).
Each simulated session is one randomisation unit with a few queries.

Reports, with the decision rule of :mod:`vsearch.core.experiment_stats` (the functions the
operator's ``analyze`` calls, fed the same cumulative sums at each look):

1. sessions until a decision at the configured error rate, A/B vs team-draft interleaving
   (median over repetitions; the ratio);
2. the false-positive rate of A/A experiments (both arms the same ranker) looked at every
   ``--look-every`` sessions, with its binomial (Clopper-Pearson) interval, against alpha; the
   baseline in the same run: a fixed-horizon 95 % interval checked at every look (peeking);
3. the search service's p50/p99 with an experiment running vs without: needs live search
   services with an experiment (:func:`service_latency`, the hook; not measured here).

``analyze()`` itself is run on the events of one simulated experiment of each design, to check
that the fast path here decides as the operator does at the same look.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

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


@dataclass
class World:
    """The simulated catalog, rankers and users."""

    pool: int = 30                   # candidate items a ranker orders per query
    k: int = 10                      # results shown
    relevant_beta: tuple = (1.0, 4.0)  # share of a pool with the query's label ~ Beta: queries differ
    serving_signal: float = 1.0      # score = signal * relevant + noise
    candidate_signal: float = 1.2
    noise_corr: float = 0.8          # correlation of the two rankers' noise
    attract_relevant: float = 0.3    # P(click | examined, relevant), times the user's propensity
    attract_other: float = 0.02
    exam_decay: float = 1.0          # P(examined at rank r) = 1 / r ** exam_decay
    queries_per_session: float = 2.0  # 1 + Poisson(this)
    propensity_shape: float = 1.0    # user propensity ~ Gamma(shape, 1/shape): mean 1, users differ
    bank: int = 20000                # queries drawn once; sessions sample from them

    @property
    def exam(self) -> np.ndarray:
        return np.arange(1, self.k + 1) ** -self.exam_decay


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
        a = self.w.attract_relevant, self.w.attract_other
        f = [(self.w.exam * np.where(r, a[0], a[1])).sum(1).mean() for r in (self.rel_serving, self.rel_candidate)]
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
        attract = np.minimum(1.0, np.where(rel, w.attract_relevant, w.attract_other) * prop[:, None])
        return examined & (self.rng.random(rel.shape) < attract)


def team_draft(ra: np.ndarray, rb: np.ndarray, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Team-draft interleaving (Radlinski et al. 2008) of many queries at once: rankings ra
    (serving) and rb (candidate), [queries, pool] item indices -> shown items and whether each
    came from the candidate, [queries, k]. The team with fewer picks picks its best item not
    shown yet; a coin decides between equals (as ``vsearch.core.experiment.team_draft``)."""
    n, pool = ra.shape
    rows = np.arange(n)
    shown = np.zeros((n, pool), bool)
    items, teams = np.empty((n, k), np.int64), np.empty((n, k), bool)
    picks_a, picks_b = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for pos in range(k):
        cand = (picks_b < picks_a) | ((picks_a == picks_b) & (rng.random(n) < 0.5))
        ranking = np.where(cand[:, None], rb, ra)
        first = (~shown[rows[:, None], ranking]).argmax(1)
        item = ranking[rows, first]
        shown[rows, item] = True
        items[:, pos], teams[:, pos] = item, cand
        picks_b += cand
        picks_a += ~cand
    return items, teams


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


def service_latency(args) -> list[tuple[str, float, float]] | None:
    """(3), the hook: the search service's p50/p99 with an experiment running vs without, as
    [(label, p50 ms, p99 ms)], the first row the baseline (no experiment). It needs live search
    services whose serving collection carries an experiment (``vsearch.core.experiment``, the
    search side of the issue), so it is measured where those are; None: not measured here."""
    return None


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
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.aa, args.cap, args.horizon = 8, 60, 20000, 3000
    world = World()
    policy = Policy(alpha=args.alpha, min_units=args.min_units, promote_when="better")
    t0 = time.perf_counter()
    cs, cc = Simulation(world, args.seed).true_ctr()
    print(f"bench.experiment: simulated users, position-based clicks; true CTR serving {cs:.4f}, candidate "
          f"{cc:.4f} (lift {cc / cs - 1:+.1%}); alpha {policy.alpha}, promote when better, min units "
          f"{policy.min_units}, a look every {args.look_every} sessions; A/B: {args.ab_share:.0%} of sessions in the "
          f"candidate arm, interleaving: {args.interleave_share:.0%} of sessions interleaved")
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
    print("\n(3) search service p50/p99 with an experiment vs without")
    lat = service_latency(args)
    if lat is None:
        print("not measured in this run (needs live search services with an experiment: service_latency())")
    else:
        base = lat[0][2]
        for label, p50, p99 in lat:
            print(f"{label:<44} p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  ({p99 / base:.2f}x)")
    print("\nthe operator's analyze() on the events of one simulated experiment per design, vs this fast path:")
    differ = 0
    for r in check_operator_path(world, policy, share, 1500 if args.quick else 3000, args.seed + 3):
        same = "same" if (r["decision"], r["estimate"]) == (r["fast"], r["fastEstimate"]) else "DIFFERENT"
        differ += same != "same"
        print(f"  {r['design']:<10} {r['sessions']} sessions: analyze() -> {r['decision']} ({r['code']}), {r['metric']} "
              f"{r['estimate']} sequence {r['interval']}; fast path -> {r['fast']}, {r['fastEstimate']} ({same})")
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
