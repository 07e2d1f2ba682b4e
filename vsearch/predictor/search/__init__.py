"""The search service: a query image (or a crop of one) -> the catalog's most similar images.

- ``service.py``     the pipeline: embed -> Milvus top-k -> re-rank -> results, and click records
- ``request.py``     a search request from JSON, form, KServe V1 or V2 into one ``Query``
- ``rerank.py``      private items out, near-duplicates collapsed, k filled
- ``index.py``       the Milvus side (through the store), errors by kind
- ``event_log.py``   impressions and clicks to ``search.events`` without slowing a search
- ``query_store.py`` query images kept by content hash for the trainer
- ``model.py``       the KServe model ``visual-search``
- ``routes.py``      ``/search``, ``/images``, ``/events``, the page, the API key, CORS
- ``errors.py``, ``settings.py``, ``metrics.py``, ``ctr.py``, ``cli.py``; ``web/`` the page
"""
