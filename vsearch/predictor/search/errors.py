"""What can go wrong with a search, by kind: each kind is answered with its HTTP status and
the reason (``{"error": reason}``). The KServe model turns the kinds KServe knows into its own
types (``InvalidInput`` -> 400, ``ModelNotReady`` -> 503)."""

from __future__ import annotations

from kserve.errors import InvalidInput


class SearchError(Exception):
    """An error with an HTTP status and a reason a person can act on."""

    status = 500

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BadQuery(SearchError, InvalidInput):
    """The client's mistake: not an image, a bad crop, k out of range, an unknown field... (a
    KServe ``InvalidInput``, so the KServe model raises KServe's own type)."""
    status = 400


class NotFound(SearchError):
    status = 404


class TooLarge(SearchError):
    status = 413


class Unavailable(SearchError):
    """Milvus (or the remote embedder) cannot be reached, or nothing is indexed yet: retry later."""
    status = 503
