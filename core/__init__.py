"""The shared core of the platform, below every component: configuration (``config``), the one
Milvus access layer (``store``), Kafka plumbing (``kafka``), the search-event schema
(``search_events``), image files and the one guarded fetcher of image URIs (``images``,
``fetch``). It imports nothing from the components above it."""
