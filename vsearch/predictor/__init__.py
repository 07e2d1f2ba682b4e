"""The predictor: image preprocessing (``preprocess``) and the embedding model, used alike by
serving, indexing and training: the model directory format (``model_dir``), the network zoo
(``zoo``), the in-process embedder (``inference``); the KServe embedder (``embedder_server``) and
its client (``client``); the search service (``search/``)."""

# This folder is the package vsearch.predictor (the checkout's predictor/ links here). Imported under any other
# name (`import predictor` from the checkout's root) it would be a second copy whose classes differ.
if __name__ != "vsearch.predictor":
    raise ImportError(f"import vsearch.predictor, not {__name__}: predictor/ is a link to the package vsearch.predictor")
