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

# Online experiments (vsearch.core.experiment), per experiment id and arm: the guardrails (error
# rate, p99 latency per arm) are read from these. Arms: A/B "serving" and "candidate" (the arm
# that answered, end to end); interleaving "serving" and "candidate" for each version's own
# retrieval of an interleaved query, "interleaved" for the whole interleaved query (both
# retrievals and the merge) and "outside" for the plain queries of units outside the share.
# Searches count every search assigned to the arm, errors those that failed on the service's
# side (5xx; a client's bad query is no error of the arm), latency the successful ones.
EXP_SEARCHES = Counter("vsearch_experiment_searches_total", "Searches in an online experiment, by arm",
                       ["experiment", "arm"])
EXP_ERRORS = Counter("vsearch_experiment_errors_total", "Searches of an arm that failed (5xx)",
                     ["experiment", "arm"])
EXP_LATENCY = Histogram("vsearch_experiment_search_seconds", "Search latency in an online experiment, by arm",
                        ["experiment", "arm"],
                        buckets=(.005, .01, .02, .035, .05, .075, .1, .15, .2, .3, .5, .75, 1, 2.5, 5, 10))
