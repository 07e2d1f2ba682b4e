"""vsearch: Kubernetes-native visual search.

One folder per part of the architecture: ``vsearch.core`` (the shared core),
``vsearch.predictor``, ``vsearch.ingest``, ``vsearch.trainer``, ``vsearch.operators`` and
``vsearch.models`` (the default model); the checkout's top-level folders of the same names link
here. The top of the house is this folder's own: the ``vsearch`` command line (``cli``) and
``local/``, what runs the whole platform on one machine (demo, tests, benchmarks); nothing below
imports it.
"""

__version__ = "0.1.0"
