"""The search side of the catalog collection behind the serving alias, through
:class:`vsearch.core.store.MilvusStore` (the one Milvus access layer, which also reconnects and
reloads a collection after a Milvus restart). Store errors become search errors by kind:
unreachable -> :class:`Unavailable` (503), nothing indexed yet -> :class:`Unavailable`, a
request Milvus refuses -> :class:`BadQuery` (400).

:meth:`CatalogIndex.resolve` names the concrete collection the alias points at now and the
model that built it (recorded in the collection); a query searches that collection, never the
alias, so an alias switch between resolving and searching cannot mix model versions.

The same ``describe_collection`` call reads the serving collection's experiment
(:data:`vsearch.core.experiment.EXPERIMENT_KEY`, written by the operator): while one runs, the
target also names the candidate collection and its model record (read in the same resolve, so
with the same ``resolve_ttl``); every replica sees the same experiment within ``resolve_ttl`` of
its start or end, and an alias switch ends it (the new serving collection carries none)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from ...core.experiment import EXPERIMENT_KEY, Experiment
from ...core.naming import DEFAULT_ALIAS
from ...core.store import MODEL_RECORD_KEY, MilvusStore, filter_expr, parse_model_record
from ...core.store_errors import StoreError, StoreNotFound, StoreRefused, StoreUnavailable
from .errors import BadQuery, NotFound, SearchError, Unavailable
from .rerank import Candidate

log = logging.getLogger(__name__)


class CollectionGone(Exception):
    """The collection resolved for a query is gone (dropped after a switch): resolve again."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What answers a query: the concrete collection the alias named, and the model record
    (model, version, embedder endpoint) written into that collection when it was created;
    while an experiment runs on it, the ``experiment`` and the ``candidate`` (the candidate
    collection's own target, without an experiment)."""
    collection: str
    record: dict | None = None
    experiment: Experiment | None = None
    candidate: "Target | None" = None

    @property
    def model_version(self) -> str | None:
        return self.record["model_id"] if self.record else None


class CatalogIndex:
    OUTPUT_FIELDS = ("uri", "metadata", "visibility", "embedding")

    def __init__(self, store: MilvusStore, alias: str = DEFAULT_ALIAS, *, resolve_ttl: float = 1.0,
                 vectors: bool = True):
        """``vectors``: the stored embeddings come back with every hit (the near-duplicate
        re-rank compares them). Without them a search is cheaper: Milvus 2.3 fetches output
        vectors with a second query by primary key (measured: p50 9.6-10.5 -> 2.9-6.1 ms at 100k,
        README "Under concurrent load")."""
        self.store, self.alias = store, alias
        self.output_fields = self.OUTPUT_FIELDS if vectors else tuple(f for f in self.OUTPUT_FIELDS
                                                                       if f != "embedding")
        self.resolve_ttl = resolve_ttl
        self._target: Target | None = None
        self._target_at = 0.0
        self._lock = threading.Lock()
        self._ignored = ""                   # an invalid experiment property, warned about once

    def resolve(self, fresh: bool = False) -> Target:
        """alias -> (collection, its model record), at most ``resolve_ttl`` seconds old."""
        with self._lock:
            if not fresh and self._target is not None and time.monotonic() - self._target_at < self.resolve_ttl:
                return self._target
        target = self._call(self._resolve, f"resolve alias {self.alias!r}")
        with self._lock:
            self._target, self._target_at = target, time.monotonic()
        return target

    def _resolve(self) -> Target:
        coll = self.store.describe_alias(self.alias) or self.alias
        props = self.store.collection_properties(coll)
        record = parse_model_record(props.get(MODEL_RECORD_KEY) or "")
        text = props.get(EXPERIMENT_KEY) or ""
        exp = None if text == self._ignored else Experiment.parse(text)     # (logged once)
        if exp is None:
            self._ignored = text
            return Target(coll, record)
        if exp.serving != coll:
            # written on another collection and copied, or left behind: not this collection's
            log.warning("ignoring experiment %s on collection %s: it names serving collection %s",
                        exp.id, coll, exp.serving)
            return Target(coll, record)
        try:
            cand = parse_model_record(self.store.collection_properties(exp.candidate).get(MODEL_RECORD_KEY) or "")
        except StoreNotFound:
            log.warning("experiment %s names candidate collection %s, which does not exist: "
                        "serving alone", exp.id, exp.candidate)
            return Target(coll, record)
        return Target(coll, record, exp, Target(exp.candidate, cand))

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
                return self.store.search(name, vector, k=limit, filter=flt, output_fields=self.output_fields)[0]
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
