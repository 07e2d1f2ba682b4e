"""``vsearch experiment report``: an online experiment's figures and decision from the
``search.events`` topic, as a table, JSON or a plot (CTR per arm over time with its
always-valid band). The analysis is :mod:`vsearch.core.experiment_stats`, the operator's own."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from ...core import experiment_stats as stats


def report(records, exp_id: str | None = None, policy: stats.Policy | None = None, *, points: int = 30) -> dict:
    """The analysis of ``exp_id`` (default: the newest experiment on the records) with its
    ``timeline`` (cumulative figures at ``points`` times) and the experiments seen. Raises
    ``LookupError`` when there is no such experiment."""
    records = list(records)
    seen = stats.experiments(records)
    exp_id = exp_id or stats.newest_experiment(records)
    if exp_id is None:
        raise LookupError("no experiment on the topic (no search event carries an 'experiment')")
    if exp_id not in seen:
        raise LookupError(f"experiment {exp_id!r} is not on the topic (seen: {', '.join(sorted(seen)) or 'none'})")
    acc = stats.Accumulator(exp_id).add_all(records)
    out = acc.snapshot(policy)
    out["timeline"] = acc.timeline(policy, points)
    out["experimentsSeen"] = seen
    return out


def _when(ms) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) if isinstance(ms, (int, float)) else "-"


def _f(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def _iv(iv, spec=".4f") -> str:
    return "-" if not iv else f"[{_f(iv[0], spec)}, {_f(iv[1], spec)}]"


def format_table(r: dict) -> str:
    """The report as text: one row per arm, the effect, interleaving's preference, the
    guardrails, the decision and the method."""
    conf = f"{1 - r['policy']['alpha']:.0%}"
    lines = [f"experiment {r['experiment']} ({r['design']}), events {_when(r['firstTs'])} .. {_when(r['lastTs'])} UTC"]
    if r["design"] == "interleave":
        lines.append("(interleaving: each arm's clicks are those on the items its version contributed to the "
                     "interleaved results)")
    lines.append(f"{'arm':<10} {'impressions':>11} {'clicks':>7} {'CTR':>7} {conf + ' interval':>18} "
                 f"{'always-valid':>18} {'units':>6} {'w/ click':>8} {'errors':>6} {'p99 ms':>7}")
    for name, a in r["arms"].items():
        lines.append(f"{name:<10} {a['impressions']:>11} {a['clicks']:>7} {_f(a['ctr']):>7} "
                     f"{_iv(a['ctrInterval']):>18} {_iv(a['ctrSequence']):>18} {a['units']:>6} "
                     f"{a['searchesWithClick']:>8} {a['errors']:>6} {_f(a['p99Ms'], '.1f'):>7}")
    e = r["effect"]
    if e["metric"] == "relativeCtrLift":
        lines.append(f"effect: relative CTR lift {_f(e['estimate'], '+.2%')}, always-valid {conf} "
                     f"{_iv(e['interval'], '+.2%')} (fixed-horizon {_iv(e['fixedInterval'], '+.2%')}), "
                     f"threshold {e['threshold']:+.2%}, {e['units']} units (decides from {e['minUnits']})")
    else:
        i = r["interleave"]
        lines.append(f"interleaving: {i['queries']} interleaved queries: {i['wins']} won by the candidate, "
                     f"{i['losses']} by serving, {i['ties']} ties, {i['noClick']} without clicks; "
                     f"{i['outsideImpressions']} searches outside the share"
                     + (f", {i['fallbackImpressions']} answered by serving alone (the candidate failed)"
                        if i.get("fallbackImpressions") else ""))
        lines.append(f"effect: preference for the candidate {_f(i['preference'])}, always-valid {conf} "
                     f"{_iv(i['sequence'])} (Wilson {_iv(i['interval'])}, binomial p = {_f(i['pValue'])}), "
                     f"threshold {e['threshold']}, {e['units']} queries with a preference (decides from "
                     f"{e['minUnits']})")
    g = r["guardrails"]
    lines.append(f"guardrails: error rate candidate {_f(g['errorRate']['candidate'])} vs limit "
                 f"{_f(g['errorRate']['limit'])}{' BREACHED' if g['errorRate']['breached'] else ''}; p99 "
                 f"candidate {_f(g['p99Latency']['candidate'], '.1f')} ms vs limit "
                 f"{_f(g['p99Latency']['limit'], '.1f')} ms"
                 f"{'' if g['p99Latency']['checked'] else ' (too few searches to check)'}"
                 f"{' BREACHED' if g['p99Latency']['breached'] else ''}")
    lines.append(f"decision: {r['decision'].upper()} ({r['code']}): {r['reason']}")
    lines.append(f"method: {r['method']}")
    nc = r["counts"]["clicksNotCounted"]
    if any(nc.values()) or r["counts"]["undecodable"]:
        lines.append(f"not counted: {nc['duplicate']} duplicate clicks, {nc['without_impression']} without "
                     f"impression, {nc['not_in_results']} not in the results; {r['counts']['undecodable']} "
                     "undecodable records")
    return "\n".join(lines)


def plot(r: dict, path: str) -> None:
    """A PNG: CTR per arm over time with its always-valid band (top) and the effect with its
    confidence sequence and the decision threshold (bottom). Needs matplotlib (raises
    ``ImportError`` saying so)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("writing a plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    tl = r["timeline"]
    when = [datetime.fromtimestamp(p["ts"] / 1000, timezone.utc) for p in tl]
    conf = f"{1 - r['policy']['alpha']:.0%}"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for name, color in (("serving", "tab:blue"), ("candidate", "tab:orange")):
        pts = [(t, p["arms"][name]) for t, p in zip(when, tl) if p["arms"][name]["ctr"] is not None]
        if not pts:
            continue
        xs = [t for t, _ in pts]
        top.plot(xs, [a["ctr"] for _, a in pts], color=color, label=f"{name} CTR")
        band = [(t, a["ctrSequence"]) for t, a in pts if a["ctrSequence"]]
        if band:
            top.fill_between([t for t, _ in band], [b[0] for _, b in band], [b[1] for _, b in band],
                             color=color, alpha=0.2, label=f"{name} always-valid {conf}")
    top.set_ylabel("clicks per impression" + (" (credited)" if r["design"] == "interleave" else ""))
    top.set_title(f"{r['experiment']} ({r['design']}): {r['decision']} ({r['code']})")
    top.legend(loc="best", fontsize="small")
    e = r["effect"]
    label = "relative CTR lift" if e["metric"] == "relativeCtrLift" else "preference for the candidate"
    pts = [(t, p["effect"]) for t, p in zip(when, tl) if p["effect"]["estimate"] is not None]
    if pts:
        bottom.plot([t for t, _ in pts], [x["estimate"] for _, x in pts], color="tab:green", label=label)
        band = [(t, x["interval"]) for t, x in pts if x["interval"] and None not in x["interval"]]
        if band:
            bottom.fill_between([t for t, _ in band], [b[0] for _, b in band], [b[1] for _, b in band],
                                color="tab:green", alpha=0.2, label=f"always-valid {conf}")
    bottom.axhline(e["threshold"], color="black", linestyle="--", linewidth=1, label="decision threshold")
    bottom.set_ylabel(label)
    bottom.legend(loc="best", fontsize="small")
    bottom.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
    bottom.set_xlabel("time (UTC)")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
