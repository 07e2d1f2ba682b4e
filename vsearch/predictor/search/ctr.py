"""Click-through rate per model version, from the ``search.events`` topic (``vsearch ctr``)."""

from __future__ import annotations

from ...core import search_events


def read_events(bootstrap: str, topic: str = "search.events", idle_timeout: float = 3.0):
    """Every record on the topic (``search_events.read_all``); ``{"_bad": reason}`` for each
    undecodable one; nothing when the topic does not exist yet."""
    try:
        for rec in search_events.read_all(bootstrap, topic, idle_s=idle_timeout, client_id="vsearch-ctr"):
            yield {"_bad": str(rec)} if isinstance(rec, search_events.BadSearchEvent) else rec
    except LookupError:
        return


def ctr_table(records) -> dict[str, dict]:
    """Per model version (an experiment's interleaved results apart): impressions, clicks, CTR
    (clicks / impressions) and the share of searches with at least one click, counted by :func:`search_events.count_clicks` (each
    impression once, each click once per (query, item) and only with its impression). What
    was not counted, and why, is in ``_clicks_not_counted``; undecodable records in
    ``_undecodable_records``."""
    log = search_events.count_clicks(records)
    stats: dict[str, dict] = {}
    for imp in log.impressions.values():
        s = stats.setdefault(_version(imp), {"impressions": 0, "clicks": 0})
        s["impressions"] += 1
    clicked_queries: dict[str, set] = {}
    for click in log.clicks:
        mv = _version(log.impressions[str(click["query_id"])])
        stats[mv]["clicks"] += 1
        clicked_queries.setdefault(mv, set()).add(click["query_id"])
    for mv, s in stats.items():
        n = s["impressions"]
        s["ctr"] = round(s["clicks"] / n, 4) if n else None
        s["searches_with_click"] = round(len(clicked_queries.get(mv, ())) / n, 4) if n else None
    if any(log.not_counted.values()):
        stats["_clicks_not_counted"] = dict(log.not_counted)
    if log.bad:
        stats["_undecodable_records"] = {"count": log.bad}
    return stats


def _version(impression: dict) -> str:
    """The row of an impression: its model version; an online experiment's interleaved results
    (two versions merged, :mod:`vsearch.core.experiment`) have a row of their own,
    ``<serving version> (interleaved)``, so they never count as the serving version's."""
    mv = str(impression.get("model_version"))
    exp = impression.get("experiment")
    return f"{mv} (interleaved)" if isinstance(exp, dict) and exp.get("arm") == "interleaved" else mv
