"""The shared core of the platform, below every component: configuration (``config``), the one
Milvus access layer (``store``; its error kinds ``store_errors``, the names of collections and
model versions ``naming``, the limits of a row ``rows``), the bisect helper that finds what a
batch call refuses (``bisection``), Kafka plumbing (``kafka``), the search-event schema
(``search_events``), image files and the one guarded fetcher of image URIs (``images``,
``fetch``). It imports nothing from the components above it."""

# This folder is the package vsearch.core (the checkout's core/ links here). Imported under any other
# name (`import core` from the checkout's root) it would be a second copy whose classes differ.
if __name__ != "vsearch.core":
    raise ImportError(f"import vsearch.core, not {__name__}: core/ is a link to the package vsearch.core")
