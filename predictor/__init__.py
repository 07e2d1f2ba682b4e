"""The predictor: image preprocessing (``preprocess``) and the embedding model (``model``),
used alike by serving, indexing and training; the KServe embedder (``embedder_server``) and its
client (``client``); the search service (``search/``)."""
