"""The search service's Prometheus metrics (served at ``/metrics`` with KServe's own)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SEARCHES = Counter("vsearch_search_requests_total", "Searches answered", ["model_version"])
REJECTED = Counter("vsearch_search_rejected_total", "Searches refused", ["status"])
LATENCY = Histogram("vsearch_search_seconds", "Search latency by stage", ["stage"],
                    buckets=(.002, .005, .01, .02, .05, .1, .15, .25, .5, 1, 2.5, 5))
IMPRESSIONS = Counter("vsearch_search_impressions_total", "Impressions logged", ["model_version"])
CLICKS = Counter("vsearch_search_clicks_total", "Clicks logged", ["model_version"])
EVENTS_SENT = Counter("vsearch_search_events_sent_total", "Search events acknowledged by Kafka")
EVENTS_FAILED = Counter("vsearch_search_events_send_failures_total",
                        "Failed attempts to send search events (they stay buffered and are retried)")
EVENTS_DROPPED = Counter("vsearch_search_events_dropped_total",
                         "Search events dropped: buffer_full (Kafka unreachable for long), too_large "
                         "(over the record limit), refused (Kafka refused the record for good)", ["reason"])
EVENTS_BUFFERED = Gauge("vsearch_search_events_buffered", "Search events waiting to be sent")
