"""The search side of the catalog collection behind the serving alias, through
:class:`vsearch.core.store.MilvusStore` (the one Milvus access layer, which also reconnects and
reloads a collection after a Milvus restart). Store errors become search errors by kind:
unreachable -> :class:`Unavailable` (503), nothing indexed yet -> :class:`Unavailable`, a
request Milvus refuses -> :class:`BadQuery` (400)."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from ...core.store import MilvusStore, StoreError, StoreNotFound, StoreRefused, StoreUnavailable
from .errors import BadQuery, NotFound, SearchError, Unavailable
from .rerank import Candidate

VISIBLE = 'visibility != "private"'
log = logging.getLogger(__name__)


class CatalogIndex:
    OUTPUT_FIELDS = ("uri", "metadata", "visibility", "embedding")

    def __init__(self, store: MilvusStore, alias: str = "images"):
        self.store, self.alias = store, alias

    def _call(self, fn: Callable, what: str):
        try:
            return fn()
        except StoreUnavailable as exc:
            log.warning("Milvus unreachable (%s): %s", what, str(exc)[:500])
            raise Unavailable(f"Milvus is unreachable ({what}); retry later") from exc
        except StoreNotFound as exc:
            raise Unavailable(f"nothing to search yet: alias/collection {self.alias!r} does not "
                              f"exist in Milvus ({what})") from exc
        except StoreRefused as exc:
            raise BadQuery(f"Milvus refused to {what}: {str(exc)[:300]}") from exc
        except StoreError as exc:
            log.error("Milvus failed (%s): %s", what, str(exc)[:500])
            raise SearchError(f"Milvus failed to {what}") from exc

    def search(self, vector: np.ndarray, limit: int, expr: str = "") -> list[Candidate]:
        flt = f"({expr}) and {VISIBLE}" if expr else VISIBLE
        # the store's index settings: search breadth (ef, search_list) raised to the limit
        hits = self._call(lambda: self.store.search(
            self.alias, vector, k=limit, filter=flt, output_fields=self.OUTPUT_FIELDS)[0],
            f"search alias {self.alias!r}")
        return [self._candidate(h) for h in hits]

    def get(self, item_id: str) -> Candidate | None:
        try:
            rows = self._call(lambda: self.store.get(
                self.alias, [item_id], ("uri", "metadata", "visibility"), consistency="Bounded"),
                f"read item {item_id!r}")
        except BadQuery as exc:
            raise NotFound(f"no catalog image with id {item_id!r}") from exc
        except ValueError as exc:            # an id the store refuses (quotes, too long)
            raise NotFound(f"no catalog image with id {item_id!r}: {exc}") from exc
        row = rows.get(item_id)
        return self._candidate({"id": item_id, **row}) if row else None

    @staticmethod
    def _candidate(hit: dict) -> Candidate:
        metadata = hit.get("metadata") or {}
        metadata = metadata if isinstance(metadata, dict) else {}
        vec = hit.get("embedding")
        return Candidate(id=str(hit["id"]), score=float(hit.get("score", 0.0)), uri=hit.get("uri") or None,
                         metadata=metadata, visibility=hit.get("visibility") or "public",
                         content_hash=metadata.get("content_hash") or metadata.get("sha256") or None,
                         vector=np.asarray(vec, np.float32) if vec is not None else None)
