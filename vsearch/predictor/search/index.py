"""The search side of the catalog collection behind the serving alias, through
:class:`vsearch.core.store.MilvusStore` (the one Milvus access layer, which also reconnects and
reloads a collection after a Milvus restart). Store errors become search errors by kind:
unreachable -> :class:`Unavailable` (503), nothing indexed yet -> :class:`Unavailable`, a
request Milvus refuses -> :class:`BadQuery` (400).

:meth:`CatalogIndex.resolve` names the concrete collection the alias points at now and the
model that built it (recorded in the collection); a query searches that collection, never the
alias, so an alias switch between resolving and searching cannot mix model versions."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from ...core.naming import DEFAULT_ALIAS
from ...core.store import MilvusStore, filter_expr
from ...core.store_errors import StoreError, StoreNotFound, StoreRefused, StoreUnavailable
from .errors import BadQuery, NotFound, SearchError, Unavailable
from .rerank import Candidate

log = logging.getLogger(__name__)


class CollectionGone(Exception):
    """The collection resolved for a query is gone (dropped after a switch): resolve again."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What answers a query: the concrete collection the alias named, and the model record
    (model, version, embedder endpoint) written into that collection when it was created."""
    collection: str
    record: dict | None = None

    @property
    def model_version(self) -> str | None:
        return self.record["model_id"] if self.record else None


class CatalogIndex:
    OUTPUT_FIELDS = ("uri", "metadata", "visibility", "embedding")

    def __init__(self, store: MilvusStore, alias: str = DEFAULT_ALIAS, *, resolve_ttl: float = 1.0):
        self.store, self.alias = store, alias
        self.resolve_ttl = resolve_ttl
        self._target: Target | None = None
        self._target_at = 0.0
        self._lock = threading.Lock()

    def resolve(self, fresh: bool = False) -> Target:
        """alias -> (collection, its model record), at most ``resolve_ttl`` seconds old."""
        with self._lock:
            if not fresh and self._target is not None and time.monotonic() - self._target_at < self.resolve_ttl:
                return self._target
        coll, rec = self._call(lambda: self.store.resolve(self.alias), f"resolve alias {self.alias!r}")
        target = Target(coll, rec)
        with self._lock:
            self._target, self._target_at = target, time.monotonic()
        return target

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

    def search(self, vector: np.ndarray, limit: int, match: Mapping[str, Sequence] | None = None, *,
               collection: str | None = None) -> list[Candidate]:
        """Top ``limit`` visible rows of ``collection`` (default: the alias) whose metadata
        matches ``match`` (``{key: [values]}``, any value per key). Raises
        :class:`CollectionGone` when a named collection no longer exists."""
        flt = filter_expr(match, visible_only=True)
        name = collection or self.alias

        def search():
            # the store's index settings: search breadth (ef, search_list) raised to the limit
            try:
                return self.store.search(name, vector, k=limit, filter=flt, output_fields=self.OUTPUT_FIELDS)[0]
            except StoreNotFound as exc:
                if collection is not None:
                    raise CollectionGone(name) from exc
                raise
        hits = self._call(search, f"search {'collection' if collection else 'alias'} {name!r}")
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
