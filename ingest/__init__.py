"""Catalog ingest: the catalog event schema (``events``), the Kafka consumer that keeps one
Milvus collection equal to the catalog topic (``consumer``) and ``vsearch publish``."""
