"""Online experiments: the analysis of ``search.events`` and the decision (pure: no I/O).

``analyze(records, exp_id, policy)`` (or an :class:`Accumulator` fed record by record) turns the
events of one experiment into per-arm figures, the effect with its intervals, guardrails and a
decision: ``promote``, ``abort`` or ``continue``. Clicks are counted the one way every reader
counts them, :func:`vsearch.core.search_events.count_clicks` (an impression once per query, a
click once per (query, item) and only with its impression on the log).

The method (``METHOD_AB`` / ``METHOD_INTERLEAVE`` below say it in the result):

- **A/B.** The metric is CTR = clicks / impressions per arm, a ratio of two sums over the
  randomisation units (a user or session; the query image's hash when the client sends none).
  Impressions and clicks are first summed per unit, so the unit, not the impression, is the
  independent observation; the variance of the ratio is the delta method's
  ``sum_i (c_i - R n_i)^2 / N^2`` (times K/(K-1)), which is exactly the heteroskedasticity-robust
  (HC1) variance of a weighted least-squares fit of the per-unit CTR on a constant with the
  unit's impressions as weights: the fixed-horizon interval of each arm is that statsmodels fit.
  The effect is the relative lift ``CTR_candidate / CTR_serving - 1`` (delta method again).
- **Interleaving** (team draft): per query, each counted click is credited to the team
  (version) that contributed the clicked item; the query is a win for the candidate when it got
  more credited clicks, a loss when fewer, a tie when equal and clicked. The preference is
  ``wins / (wins + losses)``; its fixed-horizon interval is statsmodels' Wilson interval and its
  p-value scipy's exact binomial test against 1/2. The unit of analysis is the query: team draft
  randomises each query on its own.
- **Peeking.** The operator looks after every few events, so decisions use *confidence
  sequences*, intervals that hold at every look at once (P(the true value ever leaves) <= alpha,
  by Ville's inequality), never the fixed-horizon intervals above (shown for reference):
  A/B: the normal-mixture boundary (the mixture SPRT of Johari, Koomen, Pekelis & Walsh,
  "Always valid inference", Operations Research 2022, written as the asymptotic confidence
  sequence of Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas, "Time-uniform central limit theory
  and asymptotic confidence sequences", Annals of Statistics 2024): the estimate
  +- sqrt(V (t rho^2 + 1) / (t rho^2) * (2 log(1/alpha) + log(t rho^2 + 1))), V its delta-method
  variance, t the units, rho^2 = (2 log(1/alpha) + log(2 log(1/alpha) + 1)) / t* so that it is
  tightest at t* = ``tune_units`` (Howard, Ramdas, McAuliffe & Sekhon, "Time-uniform,
  nonparametric, nonasymptotic confidence sequences", Annals of Statistics 2021). Interleaving:
  Robbins' beta-binomial mixture (Robbins 1970; Howard et al. 2021): {p : B(a+W, a+L) / B(a, a)
  / (p^W (1-p)^L) < 1/alpha}, exact for any number of looks. No decision before ``min_units``.
- **Decision.** ``notWorse``: promote when the whole sequence lies above ``-margin`` (relative
  CTR lift; interleaving: a preference above (1-m)/(2-m), i.e. the candidate wins at least
  (1 - margin) times as many queries as serving), abort when it lies below. ``better``: the same
  against 0 (1/2). In an A/A experiment both happen together with probability <= alpha.
- **Guardrails** (checked first, at every look): the candidate's error rate (``error`` events
  over searches) against ``max_errors_ratio`` x serving's + 0.01, breached when the
  beta-binomial sequence of the candidate's rate lies above that; the candidate's p99 latency
  (``took_ms`` of impressions) against ``max_p99_ratio`` x serving's, once both sides have
  ``min_latency_samples`` searches. In interleaving the candidate side is the interleaved
  searches (both versions retrieve) and the serving side the searches outside the share.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
from scipy.optimize import brentq
from scipy.special import betaln
from scipy.stats import binomtest, norm
from statsmodels.regression.linear_model import WLS
from statsmodels.stats.proportion import proportion_confint

from .search_events import BadSearchEvent, count_clicks

ARMS = ("serving", "candidate")
DESIGNS = ("ab", "interleave")
PROMOTE, ABORT, CONTINUE = "promote", "abort", "continue"

METHOD_AB = ("A/B: CTR per arm from per-unit sums (delta method = statsmodels WLS HC1 on per-unit CTR); "
             "decision on the relative CTR lift's always-valid confidence sequence (normal mixture / mSPRT, "
             "Johari et al. 2022, Waudby-Smith et al. 2024), valid under continuous peeking")
METHOD_INTERLEAVE = ("interleaving (team draft): per-query wins/losses from clicks credited to teams; "
                     "decision on the preference's always-valid confidence sequence (beta-binomial mixture, "
                     "Robbins 1970, Howard et al. 2021), valid under continuous peeking")


@dataclass
class Policy:
    """How an experiment decides (the operator maps ``spec.rollout.experiment`` onto it)."""

    alpha: float = 0.05              # error rate: P(an A/A experiment decides) <= alpha, at any look
    margin: float = 0.0              # relative CTR margin of non-inferiority (0.02 = 2 %)
    promote_when: str = "notWorse"   # or "better"
    min_units: int = 200             # no decision before this many units (interleave: queries with a preference)
    max_errors_ratio: float = 2.0    # guardrail: candidate error rate <= ratio * serving's + 0.01
    max_p99_ratio: float = 1.5       # guardrail: candidate p99 <= ratio * serving's
    on_timeout: str = "abort"        # or "promote": what maxDuration without a decision does
    tune_units: int = 0              # the confidence sequence is tightest here (0: 10 * min_units)
    min_latency_samples: int = 200   # the p99 guardrail needs this many searches on each side

    def __post_init__(self):
        problems = []
        if not 0 < self.alpha < 0.5:
            problems.append(f"alpha must be in (0, 0.5), got {self.alpha}")
        if not 0 <= self.margin < 1:
            problems.append(f"margin must be in [0, 1), got {self.margin}")
        if self.promote_when not in ("notWorse", "better"):
            problems.append(f"promote_when must be notWorse or better, got {self.promote_when!r}")
        if self.on_timeout not in ("abort", "promote"):
            problems.append(f"on_timeout must be abort or promote, got {self.on_timeout!r}")
        if self.min_units < 2 or self.tune_units < 0 or self.min_latency_samples < 1:
            problems.append("min_units must be >= 2, tune_units >= 0, min_latency_samples >= 1")
        if self.max_errors_ratio < 1 or self.max_p99_ratio < 1:
            problems.append("max_errors_ratio and max_p99_ratio must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def rho2(self) -> float:
        """The normal mixture's variance (relative to one unit's), tuned for ``tune_units``."""
        t = self.tune_units or 10 * self.min_units
        la = 2 * math.log(1 / self.alpha)
        return (la + math.log(la + 1)) / t

    @property
    def beta_a(self) -> float:
        """Beta(a, a) mixture of the preference with the same spread as ``rho2`` around 1/2."""
        return max(1.0, (1 / self.rho2 - 1) / 2)


# ---- the statistics: functions of counts (numpy arrays work too: the benchmark looks at many at once)

def ratio_moments(n, c, nn, cc, nc, k):
    """Per-unit sums (impressions n, clicks c, and sums of n^2, c^2, n*c over k units) -> the
    ratio C/N and its delta-method variance (with the HC1 factor k/(k-1))."""
    n, c, nn, cc, nc, k = (np.asarray(x, float) for x in (n, c, nn, cc, nc, k))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = c / n
        v = (cc - 2 * r * nc + r * r * nn) / (n * n) * k / (k - 1)
    return r, np.where(k > 1, np.maximum(v, 0.0), np.nan)


def lift_moments(rs, vs, rc, vc):
    """The relative lift rc / rs - 1 of two independent arms and its delta-method variance."""
    rs, vs, rc, vc = (np.asarray(x, float) for x in (rs, vs, rc, vc))
    with np.errstate(divide="ignore", invalid="ignore"):
        q = rc / rs
        v = q * q * (vc / (rc * rc) + vs / (rs * rs))
        v = np.where(rc > 0, v, vc / (rs * rs))          # no clicks yet in the candidate arm
    return q - 1, v


def normal_mixture_halfwidth(v, t, alpha: float, rho2: float):
    """Half-width of the two-sided always-valid confidence sequence of an estimate with
    variance ``v`` after ``t`` units (normal mixture; see the module docstring)."""
    v, t = np.asarray(v, float), np.asarray(t, float)
    tr = t * rho2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(v * (tr + 1) / tr * (2 * math.log(1 / alpha) + np.log(tr + 1)))


def beta_binomial_log_evalue(w, f, p0, a: float, b: float | None = None):
    """log of Robbins' beta-binomial mixture martingale against p = p0 after w successes and
    f failures: log(B(a+w, b+f) / B(a, b)) - w log p0 - f log(1-p0). Under p = p0 it stays
    below log(1/alpha) at every look with probability >= 1 - alpha."""
    b = a if b is None else b
    w, f = np.asarray(w, float), np.asarray(f, float)
    return betaln(a + w, b + f) - betaln(a, b) - w * np.log(p0) - f * np.log1p(-p0)


def beta_binomial_sequence(w: int, f: int, alpha: float, a: float, b: float | None = None) -> tuple[float, float]:
    """The always-valid confidence interval {p : e-value(p) < 1/alpha} after w successes and f
    failures (an interval around w/(w+f): the e-value is smallest there)."""
    if w + f == 0:
        return 0.0, 1.0
    bound = math.log(1 / alpha)

    def excess(p):
        return float(beta_binomial_log_evalue(w, f, p, a, b)) - bound
    eps = 1e-12
    phat = min(max(w / (w + f), eps), 1 - eps)
    lo = 0.0 if phat <= eps or excess(eps) < 0 else brentq(excess, eps, phat)
    hi = 1.0 if phat >= 1 - eps or excess(1 - eps) < 0 else brentq(excess, phat, 1 - eps)
    return lo, hi


def decide_interval(lo, hi, threshold):
    """+1 when the sequence lies above threshold (promote), -1 below (abort), 0 undecided."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    return np.where(lo > threshold, 1, np.where(hi < threshold, -1, 0))


def preference_threshold(policy: Policy) -> float:
    m = policy.margin if policy.promote_when == "notWorse" else 0.0
    return (1 - m) / (2 - m)


def lift_threshold(policy: Policy) -> float:
    return -policy.margin if policy.promote_when == "notWorse" and policy.margin else 0.0


def _fixed_ctr_interval(n: np.ndarray, c: np.ndarray, alpha: float) -> list | None:
    """statsmodels: WLS of per-unit CTR on a constant, weights = impressions, HC1 (delta method)."""
    if len(n) < 2 or n.sum() == 0:
        return None
    if np.all(c == 0) or np.allclose(c / n, c.sum() / n.sum()):
        r = float(c.sum() / n.sum())
        return [r, r]                                     # no spread: a degenerate interval
    fit = WLS(c / n, np.ones((len(n), 1)), weights=n).fit(cov_type="HC1")
    lo, hi = fit.conf_int(alpha)[0]
    return [max(0.0, float(lo)), float(hi)]


def _r(x, nd=6):
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


# ---- reading the events of one experiment

def _exp(rec: dict) -> dict:
    e = rec.get("experiment")
    return e if isinstance(e, dict) else {}


def _record_key(rec: dict) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()[:24]


def experiments(records: Iterable) -> dict[str, dict]:
    """The experiments seen on the topic: id -> {design, first, last (epoch-ms), events}."""
    out: dict[str, dict] = {}
    for rec in records:
        if not isinstance(rec, dict):
            continue
        e = _exp(rec)
        if not e.get("id"):
            continue
        s = out.setdefault(str(e["id"]), {"design": e.get("design"), "first": None, "last": None, "events": 0})
        s["events"] += 1
        ts = rec.get("ts")
        if isinstance(ts, (int, float)):
            s["first"] = ts if s["first"] is None else min(s["first"], ts)
            s["last"] = ts if s["last"] is None else max(s["last"], ts)
    return out


def newest_experiment(records: Iterable) -> str | None:
    """The experiment whose first event is the latest (None when there is none)."""
    seen = experiments(records)
    return max(seen, key=lambda i: (seen[i]["first"] or 0, i)) if seen else None


@dataclass
class Accumulator:
    """The events of one experiment, fed one record at a time (any order, any number of
    replays: a record read twice counts once). ``state()`` is JSON-able and
    ``Accumulator.from_state`` resumes from it, so a reader that persists it with its
    offsets and re-reads from an older offset after a crash counts nothing twice.
    ``snapshot(policy)`` is :func:`analyze`'s result."""

    exp_id: str
    design: str | None = None
    impressions: dict = field(default_factory=dict)    # query_id -> slim impression
    clicks: dict = field(default_factory=dict)         # query_id \0 item_id -> slim click
    errors: dict = field(default_factory=dict)         # key -> slim error event
    bad: int = 0
    duplicate_clicks: int = 0                          # clicks read again (replays and re-reads)

    def add(self, rec) -> None:
        if isinstance(rec, BadSearchEvent) or not isinstance(rec, dict) or "_bad" in rec:
            self.bad += 1
            return
        e = _exp(rec)
        kind = rec.get("type")
        if kind == "click":
            qid = str(rec.get("query_id"))
            if e.get("id") != self.exp_id and not (not e and qid in self.impressions):
                return
            key = f"{qid}\0{rec.get('item_id')}"
            if key in self.clicks:
                self.duplicate_clicks += 1          # what count_clicks would count as "duplicate"
            else:
                self.clicks[key] = {"type": "click", "query_id": qid, "item_id": str(rec.get("item_id")),
                                    "ts": rec.get("ts"), "team": e.get("team")}
            return
        if e.get("id") != self.exp_id:
            return
        if self.design is None and e.get("design") in DESIGNS:
            self.design = e["design"]
        slim_exp = {"arm": e.get("arm"), "unit": str(e.get("unit") or rec.get("query_hash") or rec.get("query_id")),
                    **({"fallback": True} if e.get("fallback") else {})}
        if kind == "impression":
            self.impressions.setdefault(str(rec.get("query_id")), {
                "type": "impression", "query_id": str(rec.get("query_id")), "ts": rec.get("ts"),
                "took_ms": rec.get("took_ms"), "experiment": slim_exp,
                "results": [{"id": str(r.get("id")), **({"team": r["team"]} if "team" in r else {})}
                            for r in rec.get("results") or () if isinstance(r, dict)]})
        elif kind == "error":       # one per (query, arm): an interleaved query may fail on both sides
            key = f"{rec['query_id']}\0{e.get('arm')}" if rec.get("query_id") else _record_key(rec)
            self.errors.setdefault(key, {"type": "error", "query_id": rec.get("query_id"), "ts": rec.get("ts"),
                                         "took_ms": rec.get("took_ms"), "experiment": slim_exp})

    def add_all(self, records: Iterable) -> Accumulator:
        for rec in records:
            self.add(rec)
        return self

    def state(self) -> dict:
        return {"exp_id": self.exp_id, "design": self.design, "impressions": self.impressions,
                "clicks": self.clicks, "errors": self.errors, "bad": self.bad,
                "duplicate_clicks": self.duplicate_clicks}

    @classmethod
    def from_state(cls, state: dict) -> Accumulator:
        return cls(**{k: state[k] for k in ("exp_id", "design", "impressions", "clicks", "errors", "bad",
                                            "duplicate_clicks")})

    def snapshot(self, policy: Policy | None = None, *, timed_out: bool = False, until_ms=None) -> dict:
        return _analyze(self, policy or Policy(), timed_out=timed_out, until_ms=until_ms)

    def timeline(self, policy: Policy | None = None, points: int = 30) -> list[dict]:
        """Cumulative figures at ``points`` times between the first and the last impression
        (for a plot of CTR per arm over time): [{"ts", "arms": {arm: {ctr, ctrSequence, ...}}}]."""
        ts = sorted(i["ts"] for i in self.impressions.values() if isinstance(i.get("ts"), (int, float)))
        if not ts:
            return []
        cuts = np.unique(np.linspace(ts[0], ts[-1], max(2, points)).round().astype(np.int64))
        facts = _facts(self, self.design or "ab")
        return [{"ts": int(t), **{k: v for k, v in _analyze(self, policy or Policy(), timed_out=False,
                                                               until_ms=int(t), facts=facts).items()
                                  if k in ("arms", "effect", "interleave")}} for t in cuts]


def analyze(records: Iterable, exp_id: str, policy: Policy | None = None, *, timed_out: bool = False) -> dict:
    """The figures and the decision of experiment ``exp_id`` from the records of the topic
    (all of them, any order; other experiments' records are skipped). ``timed_out``: the
    experiment's maxDuration has passed, so an undecided one ends with ``policy.on_timeout``."""
    return Accumulator(exp_id).add_all(records).snapshot(policy, timed_out=timed_out)


def _side(design: str, rec: dict) -> str | None:
    """Which side a search counts for: A/B: its arm; interleave: "candidate" for the
    interleaved searches (their results carry teams), "serving" for those outside the share."""
    arm = rec["experiment"].get("arm")
    if design == "ab":
        return arm if arm in ARMS else None
    if any("team" in r for r in rec.get("results") or ()) or arm in ("candidate", "interleave", "interleaved"):
        return "candidate"
    return "serving"


@dataclass
class _Facts:
    """Per counted impression and per error event, as arrays (computed once, then cut by time)."""

    log: object                  # the ClickLog of all impressions and clicks
    ts: np.ndarray               # impression time (NaN: none)
    side: np.ndarray             # 0 serving, 1 candidate, -1 neither (guardrails' sides)
    arm: np.ndarray              # A/B: 0 serving, 1 candidate, -1 other; interleave: 1 interleaved, 0 outside,
                                 # 2 fallback (the candidate failed: serving's results alone, no teams)
    unit: np.ndarray             # unit index
    credit: np.ndarray           # [n, 2]: counted clicks credited to serving, candidate (A/B: the query's arm)
    took: np.ndarray             # took_ms (NaN: none)
    err_ts: np.ndarray
    err_side: np.ndarray
    err_alone: np.ndarray        # the error's query has no impression (else the impression counts the search)


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _facts(acc: Accumulator, design: str) -> _Facts:
    log = count_clicks([*acc.impressions.values(), *acc.clicks.values()])
    clicks_by_q: dict[str, list[dict]] = {}
    for c in log.clicks:
        clicks_by_q.setdefault(c["query_id"], []).append(c)
    units: dict[str, int] = {}
    rows = []
    for qid, imp in log.impressions.items():
        side = _side(design, imp)
        qclicks = clicks_by_q.get(qid, [])
        credit = [0, 0]
        if design == "ab":
            arm = ARMS.index(imp["experiment"].get("arm")) if imp["experiment"].get("arm") in ARMS else -1
            if arm >= 0:
                credit[arm] = len(qclicks)
        else:
            teams = {r["id"]: r.get("team") for r in imp["results"]}
            arm = int(any(teams.values()))
            if imp["experiment"].get("fallback") or (not arm and side == "candidate"):
                arm = 2
            for c in qclicks:
                team = teams.get(c["item_id"]) or c.get("team")
                if arm and team in ARMS:
                    credit[ARMS.index(team)] += 1
        rows.append((_num(imp.get("ts")), ARMS.index(side) if side else -1, arm,
                     units.setdefault(imp["experiment"]["unit"], len(units)), *credit, _num(imp.get("took_ms"))))
    m = np.array(rows, float).reshape(-1, 7)
    errs = [(_num(e.get("ts")), ARMS.index(s) if (s := _side(design, e)) else -1,
             str(e.get("query_id")) not in log.impressions) for e in acc.errors.values()]
    e = np.array(errs, float).reshape(-1, 3)
    return _Facts(log, m[:, 0], m[:, 1].astype(int), m[:, 2].astype(int), m[:, 3].astype(int),
                  m[:, 4:6].astype(int), m[:, 6], e[:, 0], e[:, 1].astype(int), e[:, 2].astype(bool))


def _analyze(acc: Accumulator, policy: Policy, *, timed_out: bool, until_ms=None, facts: _Facts | None = None) -> dict:
    design = acc.design or "ab"
    fx = facts or _facts(acc, design)
    keep = np.ones(len(fx.ts), bool) if until_ms is None else fx.ts <= until_ms
    keep_err = np.ones(len(fx.err_ts), bool) if until_ms is None else fx.err_ts <= until_ms
    # per side: searches, errors, latencies (the guardrails)
    sides = {}
    for i, a in enumerate(ARMS):
        took = fx.took[keep & (fx.side == i)]
        errors = int((keep_err & (fx.err_side == i)).sum())
        alone = int((keep_err & (fx.err_side == i) & fx.err_alone).sum())
        sides[a] = {"searches": int((keep & (fx.side == i)).sum()) + alone, "errors": errors,
                    "took": took[np.isfinite(took)]}
    # per arm: impressions and clicks summed per unit
    inter = {}
    if design == "ab":
        members = {a: keep & (fx.arm == i) for i, a in enumerate(ARMS)}
    else:
        inside = keep & (fx.arm == 1)
        members = {a: inside for a in ARMS}
        cs, cc = fx.credit[inside, 0], fx.credit[inside, 1]
        inter = {"queries": int(inside.sum()), "wins": int((cc > cs).sum()), "losses": int((cc < cs).sum()),
                 "ties": int(((cc == cs) & (cc > 0)).sum()), "noClick": int(((cc == 0) & (cs == 0)).sum()),
                 "outsideImpressions": int((keep & (fx.arm == 0)).sum()),
                 "fallbackImpressions": int((keep & (fx.arm == 2)).sum())}
    arms, moments = {}, {}
    for i, a in enumerate(ARMS):
        sel = members[a]
        _, inv = np.unique(fx.unit[sel], return_inverse=True)
        n = np.bincount(inv).astype(float)
        c = np.bincount(inv, fx.credit[sel, i], len(n)).astype(float)
        k = len(n)
        r, v = ratio_moments(n.sum(), c.sum(), (n * n).sum(), (c * c).sum(), (n * c).sum(), k)
        moments[a] = (float(r), float(v), k)
        hw = normal_mixture_halfwidth(v, k, policy.alpha, policy.rho2) if k > 1 else np.nan
        took = sides[a]["took"]
        arms[a] = {
            "impressions": int(n.sum()), "clicks": int(c.sum()), "units": k,
            "ctr": _r(r) if n.sum() else None,
            "ctrInterval": [_r(x) for x in _fixed_ctr_interval(n, c, policy.alpha)] if k > 1 else None,
            "ctrSequence": [_r(max(0.0, r - hw)), _r(r + hw)] if np.isfinite(hw) else None,
            "searchesWithClick": int((fx.credit[sel, i] > 0).sum()),
            "searches": sides[a]["searches"], "errors": sides[a]["errors"],
            "errorRate": _r(sides[a]["errors"] / sides[a]["searches"]) if sides[a]["searches"] else None,
            "p50Ms": _r(np.percentile(took, 50), 2) if len(took) else None,
            "p99Ms": _r(np.percentile(took, 99), 2) if len(took) else None,
        }

    kept_ts = fx.ts[keep & np.isfinite(fx.ts)]
    nc = fx.log.not_counted
    out = {"experiment": acc.exp_id, "design": design, "arms": arms,
           "method": METHOD_AB if design == "ab" else METHOD_INTERLEAVE,
           "policy": asdict(policy),
           "counts": {"impressions": int(keep.sum()), "clicks": int(fx.credit[keep].sum()),
                      "errors": int(keep_err.sum()),
                      "clicksNotCounted": {**nc, "duplicate": nc["duplicate"] + acc.duplicate_clicks},
                      "undecodable": acc.bad},
           "firstTs": int(kept_ts.min()) if len(kept_ts) else None,
           "lastTs": int(kept_ts.max()) if len(kept_ts) else None}

    # the effect and its sequence
    if design == "ab":
        (rs, vs, ks), (rc, vc, kc) = moments["serving"], moments["candidate"]
        t = ks + kc
        est, var = lift_moments(rs, vs, rc, vc)
        est, var = float(est), float(var)
        hw = float(normal_mixture_halfwidth(var, t, policy.alpha, policy.rho2)) if ks > 1 and kc > 1 else math.nan
        z = norm.ppf(1 - policy.alpha / 2)
        ok = math.isfinite(est) and math.isfinite(hw)
        threshold = lift_threshold(policy)
        out["effect"] = {"metric": "relativeCtrLift", "estimate": _r(est),
                         "interval": [_r(est - hw), _r(est + hw)] if ok else None,
                         "fixedInterval": [_r(est - z * math.sqrt(var)), _r(est + z * math.sqrt(var))] if ok else None,
                         "threshold": threshold, "units": t, "minUnits": policy.min_units}
        n_units, verdict = t, int(decide_interval(est - hw, est + hw, threshold)) if ok else 0
    else:
        w, f = inter["wins"], inter["losses"]
        threshold = preference_threshold(policy)
        lo, hi = beta_binomial_sequence(w, f, policy.alpha, policy.beta_a)
        inter["preference"] = _r(w / (w + f)) if w + f else None
        inter["interval"] = [_r(x) for x in proportion_confint(w, w + f, policy.alpha, method="wilson")] if w + f else None
        inter["pValue"] = _r(binomtest(w, w + f, 0.5).pvalue) if w + f else None
        inter["sequence"] = [_r(lo), _r(hi)]
        out["interleave"] = inter
        out["effect"] = {"metric": "preference", "estimate": inter["preference"], "interval": [_r(lo), _r(hi)],
                         "fixedInterval": inter["interval"], "threshold": _r(threshold),
                         "units": w + f, "minUnits": policy.min_units}
        n_units, verdict = w + f, int(decide_interval(lo, hi, threshold)) if w + f else 0

    out["guardrails"] = guardrails = _guardrails(arms, sides, policy)
    breached = [g for g in guardrails.values() if g["breached"]]
    what = "the relative CTR lift" if design == "ab" else "the preference for the candidate"
    seq = out["effect"]["interval"]
    if breached:
        out.update(decision=ABORT, code="GuardrailBreached", reason="; ".join(g["reason"] for g in breached))
    elif n_units < policy.min_units:
        out.update(decision=CONTINUE, code="TooFewUnits",
                   reason=f"{n_units} of the {policy.min_units} units needed before any decision")
    elif verdict > 0:
        word = "not worse than serving by more than the margin" if policy.promote_when == "notWorse" and policy.margin \
            else "better than serving"
        out.update(decision=PROMOTE, code="CandidateWins",
                   reason=f"the candidate is {word}: {what}'s {1 - policy.alpha:.0%} confidence sequence {seq} "
                          f"lies above {threshold:g}")
    elif verdict < 0:
        out.update(decision=ABORT, code="CandidateLoses",
                   reason=f"the candidate is worse than serving: {what}'s {1 - policy.alpha:.0%} confidence sequence {seq} lies below {threshold:g}")
    elif timed_out:
        out.update(decision=PROMOTE if policy.on_timeout == "promote" else ABORT, code="Timeout",
                   reason=f"maxDuration reached without a decision ({what}'s sequence {seq} contains "
                          f"{threshold:g}): onTimeout={policy.on_timeout}")
    else:
        out.update(decision=CONTINUE, code="Undecided",
                   reason=f"{what}'s confidence sequence {seq} contains {threshold:g}")
    return out


def _guardrails(arms: dict, sides: dict, policy: Policy) -> dict:
    s, c = sides["serving"], sides["candidate"]
    out = {}
    base = s["errors"] / s["searches"] if s["searches"] else 0.0
    limit = min(0.999, policy.max_errors_ratio * base + 0.01)
    ev = float(beta_binomial_log_evalue(c["errors"], c["searches"] - c["errors"], limit, 1.0)) if c["searches"] else 0.0
    rate = c["errors"] / c["searches"] if c["searches"] else 0.0
    breached = rate > limit and ev >= math.log(1 / policy.alpha)
    out["errorRate"] = {"serving": _r(base), "candidate": _r(rate), "limit": _r(limit), "breached": bool(breached),
                        "reason": None if not breached else f"guardrail: the candidate's error rate {rate:.3g} ({c['errors']} of {c['searches']} "
                                  f"searches) is above {limit:.3g} = {policy.max_errors_ratio:g} x serving's "
                                  f"{base:.3g} + 0.01"}
    p99s, p99c = arms["serving"]["p99Ms"], arms["candidate"]["p99Ms"]
    enough = min(len(s["took"]), len(c["took"])) >= policy.min_latency_samples
    breached = bool(enough and p99s is not None and p99c is not None and p99c > policy.max_p99_ratio * p99s)
    out["p99Latency"] = {"serving": p99s, "candidate": p99c,
                         "limit": _r(policy.max_p99_ratio * p99s, 2) if p99s is not None else None,
                         "checked": bool(enough), "breached": breached,
                         "reason": None if not breached else f"guardrail: the candidate's p99 latency {p99c} ms is above {policy.max_p99_ratio:g} "
                                   f"x serving's {p99s} ms"}
    return out
