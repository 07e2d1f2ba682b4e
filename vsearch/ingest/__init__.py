"""Catalog ingest: the catalog event schema (``events``), the Kafka consumer that keeps one
Milvus collection equal to the catalog topic (the loop ``consumer``; ``batch`` plans a batch,
``deadletter`` writes the dead-letter records, ``retry`` waits out outages, ``kafka_internals``
guards the kafka-python internals of rebalances, ``metrics``) and ``vsearch publish``."""

# This folder is the package vsearch.ingest (the checkout's ingest/ links here). Imported under any other
# name (`import ingest` from the checkout's root) it would be a second copy whose classes differ.
if __name__ != "vsearch.ingest":
    raise ImportError(f"import vsearch.ingest, not {__name__}: ingest/ is a link to the package vsearch.ingest")
