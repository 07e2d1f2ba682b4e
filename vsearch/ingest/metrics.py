"""The ingest consumer's Prometheus metrics (one set per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("vsearch_ingest_events_processed_total",
                 "catalog events handled and committed, by op and outcome "
                 "(written, stale: older than the stored version, superseded: a newer event for the "
                 "same id in the batch)", ["op", "outcome"])
FAILED = Counter("vsearch_ingest_events_failed_total",
                 "catalog events that could not be applied, by stage (validate, fetch, decode, embed, write)",
                 ["stage"])
DEAD = Counter("vsearch_ingest_events_dead_lettered_total", "records sent to the dead-letter topic")
RETRIES = Counter("vsearch_ingest_retries_total", "retries after an outage, by stage", ["stage"])
BATCH_SECONDS = Histogram("vsearch_ingest_batch_seconds", "one batch: poll end to commit")
FETCH_SECONDS = Histogram("vsearch_ingest_fetch_seconds", "image fetch time per batch")
EMBED_SECONDS = Histogram("vsearch_ingest_embed_seconds", "embedding time per batch")
WRITE_SECONDS = Histogram("vsearch_ingest_write_seconds", "Milvus write time per batch")
LAST_COMMIT = Gauge("vsearch_ingest_last_commit_timestamp_seconds", "when offsets were last committed")
VERSION_LOOKUPS = Counter("vsearch_ingest_version_lookups_total",
                          "stored versions of event ids looked up, by source (cache: known to this consumer, "
                          "seen: read up to a write of its own, strong: a Strong read)", ["source"])
READ_SECONDS = Histogram("vsearch_ingest_version_read_seconds", "Milvus read of stored versions per batch, "
                         "by consistency (seen, strong)", ["consistency"])
