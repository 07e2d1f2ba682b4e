"""vsearch: Kubernetes-native visual search.

This folder is the installed package. Its sub-packages are links to the folders at the top of
the checkout, one per part of the architecture: ``vsearch.core`` -> ``core/`` (the shared core),
``vsearch.predictor`` -> ``predictor/``, ``vsearch.ingest`` -> ``ingest/``,
``vsearch.trainer`` -> ``trainer/``, ``vsearch.operators`` -> ``operators/`` and
``vsearch.models`` -> ``models/`` (the default model). What lives here for real is the top of
the house: the ``vsearch`` command line (``cli``) and ``local/``, what runs the whole platform on
one machine (demo, tests, benchmarks); nothing below imports it.
"""

__version__ = "0.1.0"
