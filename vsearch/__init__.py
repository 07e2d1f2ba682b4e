"""vsearch: Kubernetes-native visual search.

Installed, every part of the platform lives under this package: ``vsearch.core`` (the shared
core), ``vsearch.predictor``, ``vsearch.ingest``, ``vsearch.trainer``, ``vsearch.operators``
and ``vsearch.models`` (the default model). This folder itself is the top of the house: the
``vsearch`` command line (``cli``) and what runs the whole platform on one machine
(``services``, ``samples``, ``demo``); nothing below imports it.
"""

__version__ = "0.1.0"
