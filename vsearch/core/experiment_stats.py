"""PLACEHOLDER of H3's branch (exp-operator), to be REPLACED by H2's vsearch/core/experiment_stats.py
at the merge. It has the signature of the contract (/work/wt/experiment-contract.md §3) and
just enough of an analysis for the operator's Experimenting phase to be built and tested before
H2's lands: per arm impressions, clicks, CTR (per-unit aggregation), units, errors, p99 of
``took_ms``; a decision only once both arms have ``min_units`` units (a pre-registered
horizon), by Welch's t-test on the per-unit CTRs; the guardrails first. Not the real analysis."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Iterable

from scipy import stats

from .search_events import count_clicks

ARMS = ("serving", "candidate")


@dataclasses.dataclass
class Policy:
    alpha: float = 0.05
    margin: float = 0.0
    promote_when: str = "notWorse"
    min_units: int = 200
    max_errors_ratio: float = 2.0
    max_p99_ratio: float = 1.5
    on_timeout: str = "abort"


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return float(v[min(len(v) - 1, math.ceil(0.99 * len(v)) - 1)])


def analyze(records: Iterable[dict], exp_id: str, policy: Policy) -> dict:
    mine, errors = [], defaultdict(int)
    for rec in records:
        exp = rec.get("experiment") if isinstance(rec, dict) else None
        if not isinstance(exp, dict) or exp.get("id") != exp_id:
            continue
        if rec.get("type") == "error":
            errors[exp.get("arm")] += 1
        else:
            mine.append(rec)
    log = count_clicks(mine)
    clicks_of: dict[str, int] = defaultdict(int)
    for c in log.clicks:
        clicks_of[str(c["query_id"])] += 1
    per_unit: dict[str, dict[str, list[int]]] = {a: defaultdict(lambda: [0, 0]) for a in ARMS}
    took: dict[str, list[float]] = {a: [] for a in ARMS}
    design = "ab"
    for qid, imp in log.impressions.items():
        exp = imp["experiment"]
        design = exp.get("design", design)
        arm = exp.get("arm")
        if arm not in ARMS:
            continue
        u = per_unit[arm][str(exp.get("unit"))]
        u[0] += 1
        u[1] += clicks_of.get(qid, 0)
        if imp.get("took_ms") is not None:
            took[arm].append(float(imp["took_ms"]))
    arms, ctrs = {}, {}
    for a in ARMS:
        units = per_unit[a]
        imps = sum(v[0] for v in units.values())
        clicks = sum(v[1] for v in units.values())
        ctrs[a] = [v[1] / v[0] for v in units.values() if v[0]]
        ci = None
        if len(ctrs[a]) > 1:
            m, se = sum(ctrs[a]) / len(ctrs[a]), stats.sem(ctrs[a])
            ci = [round(m - 1.96 * se, 4), round(m + 1.96 * se, 4)] if se == se else None
        arms[a] = {"impressions": imps, "clicks": clicks, "ctr": round(clicks / imps, 4) if imps else None,
                   "ctrInterval": ci, "units": len(units), "errors": errors.get(a, 0),
                   "searchesWithClick": sum(1 for q, i in log.impressions.items()
                                            if i["experiment"].get("arm") == a and clicks_of.get(q)),
                   "p99Ms": _p99(took[a])}
    out = {"design": design, "arms": arms, "decision": "continue", "reason": "",
           "method": "PLACEHOLDER: Welch t-test on per-unit CTR at a pre-registered horizon of min_units per arm"}
    s, c = arms["serving"], arms["candidate"]
    if min(s["units"], c["units"]) < policy.min_units:
        out["reason"] = f"{min(s['units'], c['units'])}/{policy.min_units} units in the smaller arm"
        return out
    s_err = s["errors"] / max(1, s["impressions"] + s["errors"])
    c_err = c["errors"] / max(1, c["impressions"] + c["errors"])
    if c_err > policy.max_errors_ratio * s_err + 0.01:
        out.update(decision="abort", reason=f"guardrail: candidate error rate {c_err:.3f} > "
                                            f"{policy.max_errors_ratio} x serving's {s_err:.3f} + 0.01")
        return out
    if s["p99Ms"] and c["p99Ms"] and c["p99Ms"] > policy.max_p99_ratio * s["p99Ms"]:
        out.update(decision="abort", reason=f"guardrail: candidate p99 {c['p99Ms']:.0f} ms > "
                                            f"{policy.max_p99_ratio} x serving's {s['p99Ms']:.0f} ms")
        return out
    shift = policy.margin * (sum(ctrs["serving"]) / len(ctrs["serving"]))
    better = stats.ttest_ind(ctrs["candidate"], ctrs["serving"], equal_var=False, alternative="greater").pvalue
    not_worse = stats.ttest_ind([x + shift for x in ctrs["candidate"]], ctrs["serving"], equal_var=False,
                                alternative="greater").pvalue
    out["effect"] = {"ctrDifference": round((c["ctr"] or 0) - (s["ctr"] or 0), 4), "pBetter": float(better),
                     "pNotWorse": float(not_worse)}
    ok = better if policy.promote_when == "better" else not_worse
    if ok < policy.alpha:
        out.update(decision="promote", reason=f"candidate {'better than' if policy.promote_when == 'better' else 'not worse than'} "
                                              f"serving (p={ok:.3g} < alpha {policy.alpha})")
    else:
        out.update(decision="abort", reason=f"candidate not shown {'better than' if policy.promote_when == 'better' else 'not worse than'} "
                                            f"serving (p={ok:.3g} >= alpha {policy.alpha})")
    return out
