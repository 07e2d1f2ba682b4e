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
    """Per model version: impressions, clicks, CTR (clicks / impressions) and the share of
    searches with at least one click. Duplicates (at-least-once delivery) count once."""
    seen_imp, seen_click = set(), set()
    stats: dict[str, dict] = {}
    clicked_queries: dict[str, set] = {}
    bad = 0
    for rec in records:
        if "_bad" in rec:
            bad += 1
            continue
        mv = str(rec.get("model_version"))
        s = stats.setdefault(mv, {"impressions": 0, "clicks": 0})
        if rec["type"] == "impression":
            if rec["query_id"] in seen_imp:
                continue
            seen_imp.add(rec["query_id"])
            s["impressions"] += 1
        else:
            key = (rec["query_id"], rec.get("item_id"))
            if key in seen_click:
                continue
            seen_click.add(key)
            s["clicks"] += 1
            clicked_queries.setdefault(mv, set()).add(rec["query_id"])
    for mv, s in stats.items():
        n = s["impressions"]
        s["ctr"] = round(s["clicks"] / n, 4) if n else None
        s["searches_with_click"] = round(len(clicked_queries.get(mv, ())) / n, 4) if n else None
    if bad:
        stats["_undecodable_records"] = {"count": bad}
    return stats
