"""Shared code of the visual search platform that belongs to no single component.

- ``vsearch.config``: environment variables with the ``VSEARCH_`` prefix.
- ``vsearch.cli``: the ``vsearch`` command line.
- ``vsearch.store``: the one Milvus access layer.
- ``vsearch.services``: start and stop the local services (broker, Milvus Lite server).
"""

__version__ = "0.1.0"
