"""The one Milvus access layer: collections, schema, index parameters, aliases, reads and writes.

Used by the ingest consumer, the search service, the trainer's evaluation and the operator. A
flat facade over pymilvus ``MilvusClient`` (2.6.x) with an explicit timeout on every call and
guard clauses that check inputs before anything is sent. It works against

- Milvus Lite, a file path ending in ``.db`` (embedded, in this process; one process per file),
- a ``milvus-lite server`` or any Milvus server/cluster, ``http://host:port``
  (tested against ``milvus-lite server`` and the Milvus 2.3.5 standalone server).

Layout: one collection per model version, ``images__<model>__<version>`` (sanitised), with the
fields ``id`` (VARCHAR primary key), ``embedding`` (FLOAT_VECTOR(dim), L2-normalised),
``uri``, ``metadata`` (JSON), ``visibility`` (``public``/``private``) and ``updated_at``
(epoch-ms of the catalog event that wrote the row). One alias (default ``images``) names the
collection that serves. Deleted ids are remembered with their delete time in a side
collection ``<collection>__tombstones`` so that an out-of-order older upsert cannot bring a
deleted item back (see :meth:`MilvusStore.versions` and :meth:`MilvusStore.delete`).

Errors, by what the caller should do about them (:func:`~vsearch.core.store_errors.classify`:
from pymilvus' and gRPC's exception types and Milvus' error codes, never from message text): bad
input the store checks itself raises ``ValueError`` before any call; a server that cannot be
reached, times out, cancels or sheds load raises :class:`StoreUnavailable` (a ``ConnectionError``:
retry with backoff); a collection or alias that does not exist raises :class:`StoreNotFound`
(:meth:`MilvusStore.describe_alias` answers None instead); a request that cannot succeed as it is
(refused by pymilvus' own checks or by Milvus as invalid, out of range, not permitted,
unauthenticated or not implemented) raises :class:`StoreRefused` (also a ``ValueError``: sending
it again cannot help); anything else raises :class:`StoreError` with the server's reason and
code. A collection a restarted server has not loaded is loaded once and the call retried.

Filters: :func:`filter_expr` writes every boolean expression the platform sends (metadata
matches, the visibility rule), in the forms all three servers above accept.

Example::

    store = MilvusStore("/tmp/vs.db")                       # or "http://127.0.0.1:19530"
    name = collection_name("resnet18", "3")                 # images__resnet18__3 (core.naming)
    store.ensure_collection(name, dim=512)
    store.ensure_alias("images", name)                      # first version serves by default
    store.upsert(name, [{"id": "a", "embedding": vec, "uri": "file:///a.jpg",
                         "metadata": {"label": "cat"}, "visibility": "public",
                         "updated_at": 1700000000000}])
    hits = store.search("images", [vec], k=10, filter=filter_expr({"label": ["cat", "dog"]},
                                                                 visible_only=True))
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.client import ts_utils

from .jsonsafe import json_object
from .naming import DEFAULT_ALIAS, TOMBSTONE_SUFFIX, model_id
from .rows import MAX_ID_BYTES, MAX_URI_BYTES, VISIBILITIES, check_id, check_metadata
from .store_errors import NOT_LOADED, StoreError, StoreNotFound, StoreUnavailable, classify, error_code

log = logging.getLogger(__name__)


FIELDS = ("id", "embedding", "uri", "metadata", "visibility", "updated_at")
DEFAULT_OUTPUT_FIELDS = ("uri", "metadata", "visibility")
MODEL_RECORD_KEY = "vsearch.model"     # collection property holding the model that built it
MAX_PROPERTY_CHARS = 16_000           # a collection property's value (kept in Milvus' metadata store)
UPSERT_CHUNK = 1000                  # rows per upsert call (keeps gRPC messages small)
METRICS = ("IP", "COSINE")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")

# Index build and search parameters by type; configuration overrides them.
INDEX_DEFAULTS: dict[str, tuple[dict, dict]] = {
    "HNSW": ({"M": 16, "efConstruction": 200}, {"ef": 64}),
    "DISKANN": ({}, {"search_list": 100}),
    "IVF_FLAT": ({"nlist": 128}, {"nprobe": 16}),
    # Quantized (bench.index measures memory and recall): SQ8 keeps a byte per dimension and
    # returns approximate vectors; PQ keeps m codes of nbits (m must divide the dimension).
    "IVF_SQ8": ({"nlist": 1024}, {"nprobe": 32}),
    "IVF_PQ": ({"nlist": 1024, "m": 32, "nbits": 8}, {"nprobe": 32}),
    "FLAT": ({}, {}),
    "AUTOINDEX": ({}, {}),
}
# pymilvus pings every 10 s even on idle connections; gRPC servers with default settings
# (``milvus-lite server`` among them) refuse pings closer than 5 minutes apart and answer with
# GOAWAY "too_many_pings", after which the next call fails. Ping only while calls are in
# flight, and rarely.
GRPC_OPTIONS = {"grpc.keepalive_time_ms": 360_000, "grpc.keepalive_timeout_ms": 20_000,
                "grpc.keepalive_permit_without_calls": 0}
# Search parameter that must be at least k for the index type.
_K_BOUND = {"HNSW": "ef", "DISKANN": "search_list"}


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """Vector index type, its build parameters, default search parameters and the metric.

    ``HNSW`` for Milvus Lite and the standalone server, ``DISKANN`` on a Milvus cluster (Lite
    cannot build it), ``IVF_FLAT`` or ``FLAT`` otherwise. The metric is ``COSINE`` or ``IP``
    (vectors are L2-normalised, so both rank the same); scores are similarities (higher is
    closer). Environment: ``VSEARCH_INDEX_TYPE``, ``VSEARCH_INDEX_PARAMS`` (JSON),
    ``VSEARCH_SEARCH_PARAMS`` (JSON), ``VSEARCH_METRIC``."""

    index_type: str = "HNSW"
    metric: str = "COSINE"
    params: dict = dataclasses.field(default_factory=dict)
    search_params: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        t, m = self.index_type.upper(), self.metric.upper()
        if t not in INDEX_DEFAULTS:
            raise ValueError(f"index type {self.index_type!r} is not one of {sorted(INDEX_DEFAULTS)}")
        if m not in METRICS:
            raise ValueError(f"metric {self.metric!r} is not one of {METRICS} (vectors are normalised)")
        build, search = INDEX_DEFAULTS[t]
        object.__setattr__(self, "index_type", t)
        object.__setattr__(self, "metric", m)
        object.__setattr__(self, "params", {**build, **(self.params or {})})
        object.__setattr__(self, "search_params", {**search, **(self.search_params or {})})

    @classmethod
    def from_values(cls, index_type: str = "HNSW", metric: str = "COSINE",
                    params: str | dict | None = None, search_params: str | dict | None = None):
        """Build from flag/env values; ``params``/``search_params`` may be JSON text."""
        return cls(index_type or "HNSW", metric or "COSINE", json_object(params, "index params"),
                   json_object(search_params, "search params"))

    @classmethod
    def from_args(cls, args) -> "IndexConfig":
        return cls.from_values(args.index_type, args.metric, args.index_params, args.search_params)

    def search_params_for(self, k: int, override: dict | None = None) -> dict:
        params = {**self.search_params, **(override or {})}
        bound = _K_BOUND.get(self.index_type)
        if bound and bound in params:
            params[bound] = max(int(params[bound]), k)
        return params


def _literal(value) -> str:
    """A value as a Milvus expression literal: JSON quoting (so no injection), but non-ASCII
    text as itself: Milvus' expression parser knows ``\\"`` and ``\\\\`` but not ``\\uXXXX``."""
    return json.dumps(value, ensure_ascii=False)


def filter_expr(match: Mapping[str, Sequence] | None = None, *, visible_only: bool = False) -> str:
    """The boolean expression of a search, scan or count: every key of ``match`` (a metadata
    key) equals one of its values (strings or numbers), and with ``visible_only`` the row is
    not private. ``""`` matches everything. Values are JSON-quoted (no injection). Several
    values of one key become ``==`` comparisons joined by ``or``: Milvus Lite (file and
    server) refuses ``in [...]`` on a JSON field ("left side of 'in' must be a field"),
    the 2.3 server takes either.

    >>> filter_expr({"label": ["cat", "dog"]}, visible_only=True)
    '(metadata["label"] == "cat" or metadata["label"] == "dog") and visibility != "private"'
    """
    parts = []
    for key, values in (match or {}).items():
        values = [values] if isinstance(values, (str, int, float)) else list(values)
        if not values:
            raise ValueError(f"filter on metadata key {key!r} needs at least one value")
        lhs = f"metadata[{_literal(key)}]"
        alternatives = [f"{lhs} == {_literal(v)}" for v in values]
        parts.append(alternatives[0] if len(alternatives) == 1 else f"({' or '.join(alternatives)})")
    if visible_only:
        parts.append('visibility != "private"')
    return " and ".join(parts)


class MilvusStore:
    """Flat facade over one Milvus (Lite file or server).

    Args:
        uri: ``path/to/file.db`` (Milvus Lite) or ``http(s)://host:port``.
        token: ``user:password`` or an API token for secured servers.
        timeout: seconds for every call (each method also takes ``timeout=``).
        index: the :class:`IndexConfig` for collections this store creates and its searches.
        consistency: the default consistency level of the collections it creates
            (``Bounded``; reads that must see their own writes pass ``Strong``).

    The connection opens lazily on the first call and re-opens after an outage.
    """

    def __init__(self, uri: str, token: str = "", timeout: float = 10.0,
                 index: IndexConfig | None = None, consistency: str = "Bounded"):
        uri = str(uri)
        if not uri:
            raise ValueError("Milvus URI is empty: give a file path ending in .db or http://host:port")
        if not (uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:")) or uri.endswith(".db")):
            raise ValueError(f"Milvus URI {uri!r} is neither a Milvus Lite file (ending in .db) "
                             "nor a server address (http://host:port)")
        if timeout is None or timeout <= 0:
            raise ValueError("timeout must be a positive number of seconds")
        self.uri, self.token, self.timeout = uri, token, float(timeout)
        self.index = index or IndexConfig()
        self.consistency = consistency
        self._client = None
        self._tombstones: set[str] = set()      # tombstone collections known to exist

    @classmethod
    def from_args(cls, args) -> "MilvusStore":
        """From the flags of :func:`vsearch.core.config.add_milvus_flags`."""
        return cls(args.milvus_uri, token=args.milvus_token, timeout=args.milvus_timeout,
                   index=IndexConfig.from_args(args))

    # --- plumbing ------------------------------------------------------------------------

    @property
    def client(self):
        if self._client is None:
            # A channel of our own (dedicated): pymilvus otherwise shares one per URI across
            # the process, and a broken shared channel would fail every store that opens later.
            for attempt in (0, 1):
                try:
                    self._client = MilvusClient(uri=self.uri, token=self.token, timeout=self.timeout,
                                                grpc_options=GRPC_OPTIONS, dedicated=True)
                    break
                except Exception as exc:  # noqa: BLE001  (pymilvus and grpc raise many kinds)
                    if attempt == 0 and classify(exc) is StoreUnavailable:
                        time.sleep(0.5)        # a dropped channel reconnects: one more try
                        continue
                    raise self._wrap("connect", exc) from exc
        return self._client

    def _wrap(self, op: str, exc: BaseException) -> StoreError:
        kind = classify(exc)
        if kind is StoreUnavailable:
            return StoreUnavailable(f"Milvus at {self.uri} unavailable during {op}: {exc}", error_code(exc))
        return kind(f"Milvus {op} failed: {exc}", error_code(exc))

    def _call(self, op: str, method: str, *args, timeout: float | None = None, **kwargs):
        client = self.client
        for attempt in (0, 1):
            try:
                return getattr(client, method)(*args, timeout=timeout or self.timeout, **kwargs)
            except Exception as exc:  # noqa: BLE001  (pymilvus and grpc raise many kinds)
                if attempt == 0 and classify(exc) is StoreUnavailable and not isinstance(exc, TimeoutError):
                    time.sleep(0.2)            # a dropped channel reconnects: one quick retry
                    continue
                # A restarted server (Milvus Lite among them) comes back with its collections
                # released: load the collection once and try again.
                if attempt == 0 and args and isinstance(args[0], str) and error_code(exc) == NOT_LOADED:
                    log.info("Milvus collection %s is not loaded (server restarted?): loading it", args[0])
                    try:
                        client.load_collection(args[0], timeout=timeout or self.timeout)
                        continue
                    except Exception as load_exc:  # noqa: BLE001
                        raise self._wrap(f"load {args[0]}", load_exc) from load_exc
                raise self._wrap(op, exc) from exc

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001
                pass
            self._client = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def ping(self, timeout: float | None = None) -> bool:
        """True when Milvus answers a cheap call now."""
        try:
            self.list_collections(timeout=timeout)
            return True
        except StoreError:
            return False

    # --- collections ---------------------------------------------------------------------

    def list_collections(self, *, include_tombstones: bool = False, timeout: float | None = None) -> list[str]:
        names = self._call("list_collections", "list_collections", timeout=timeout)
        return sorted(n for n in names if include_tombstones or not n.endswith(TOMBSTONE_SUFFIX))

    def has_collection(self, name: str, *, timeout: float | None = None) -> bool:
        _check_name(name)
        return bool(self._call("has_collection", "has_collection", name, timeout=timeout))

    def dim(self, name_or_alias: str, *, timeout: float | None = None) -> int:
        """The embedding dimension of a collection (or of the collection an alias names)."""
        desc = self._call("describe_collection", "describe_collection", name_or_alias, timeout=timeout)
        for f in desc["fields"]:
            if f["name"] == "embedding":
                return int(f["params"]["dim"])
        raise StoreError(f"collection {name_or_alias!r} has no 'embedding' field: not made by this store")

    def ensure_collection(self, name: str, dim: int, *, timeout: float | None = None,
                          properties: dict | None = None) -> bool:
        """Create ``name`` (schema above, index from the config, loaded) unless it exists; returns
        True when it was created. An existing collection must have the same dimension."""
        _check_name(name)
        if not isinstance(dim, (int, np.integer)) or not 1 <= int(dim) <= 32768:
            raise ValueError(f"embedding dimension must be an integer in 1..32768, got {dim!r}")
        dim = int(dim)
        created = False
        if self.has_collection(name, timeout=timeout):
            have = self.dim(name, timeout=timeout)
            if have != dim:
                raise ValueError(f"collection {name!r} exists with dimension {have}, not {dim}: "
                                 "a model with another embedding size needs a new version/collection")
        else:
            created = self._create(name, self._schema(dim), "embedding", self.index, timeout,
                                   properties=properties)
        self._ensure_loaded(name, timeout)
        return created

    # --- which model built a collection --------------------------------------------------

    def ensure_model_collection(self, name: str, dim: int, record: dict, *,
                                timeout: float | None = None) -> bool:
        """:meth:`ensure_collection`, recording in a new collection the model that builds it:
        ``record`` = ``{"model": name, "version": v, "embedder_url": url or "", ...}`` (JSON in
        the collection property ``vsearch.model``, written once at creation; see
        :meth:`model_record`; Milvus Lite drops a collection's description, so a property it
        is, checked on Milvus Lite, ``milvus-lite server`` and the 2.3.5 standalone server).
        An existing collection keeps the record it was created with."""
        for key in ("model", "version"):
            if not str(record.get(key) or "").strip():
                raise ValueError(f"a model record needs {key!r}, got {record!r}")
        text = json.dumps({**record, "dim": int(dim)}, sort_keys=True, separators=(",", ":"))
        if len(text) > 4000:
            raise ValueError("model record too long for a collection property")
        return self.ensure_collection(name, dim, timeout=timeout, properties={MODEL_RECORD_KEY: text})

    def model_record(self, name_or_alias: str, *, timeout: float | None = None) -> dict | None:
        """The model record of a collection (or of the collection an alias names):
        ``{"model", "version", "model_id", "embedder_url", "dim", ...}``, or None when the
        collection was created without one."""
        props = self.collection_properties(name_or_alias, timeout=timeout)
        return parse_model_record(props.get(MODEL_RECORD_KEY) or "")

    def collection_properties(self, name_or_alias: str, *, timeout: float | None = None) -> dict[str, str]:
        """The properties of a collection (or of the collection an alias names), in one
        ``describe_collection`` call: ``{key: text}`` (``vsearch.model``, ``vsearch.experiment``,
        Milvus' own ones such as ``collection.ttl.seconds``)."""
        _check_name(name_or_alias)
        desc = self._call("describe_collection", "describe_collection", name_or_alias, timeout=timeout)
        return {str(k): str(v) for k, v in (desc.get("properties") or {}).items()}

    def set_collection_property(self, name: str, key: str, value: str, *,
                                timeout: float | None = None) -> None:
        """Write one property of collection ``name`` (``alter_collection_properties``); ``""``
        clears it: the Milvus 2.3.5 server cannot drop a property (it refuses
        ``drop_collection_properties``), so readers treat an empty value as absent. Checked on
        Milvus Lite, ``milvus-lite server`` and the 2.3.5 standalone server."""
        _check_name(name)
        if not isinstance(key, str) or not re.match(r"^[A-Za-z0-9_.\-]{1,128}$", key):
            raise ValueError(f"property key must be 1-128 letters, digits, '.', '_' or '-', got {key!r}")
        if key == MODEL_RECORD_KEY:
            raise ValueError(f"{MODEL_RECORD_KEY} is written once, when the collection is created")
        if not isinstance(value, str) or len(value) > MAX_PROPERTY_CHARS:
            raise ValueError(f"property value must be text of at most {MAX_PROPERTY_CHARS} characters")
        self._call("alter_collection_properties", "alter_collection_properties", name,
                   properties={key: value}, timeout=timeout)

    def resolve(self, alias: str, *, timeout: float | None = None) -> tuple[str, dict | None]:
        """``(collection, model record or None)`` that ``alias`` names now (a collection name
        resolves to itself). Raises :class:`StoreNotFound` when neither exists."""
        _check_name(alias)
        coll = self.describe_alias(alias, timeout=timeout) or alias
        return coll, self.model_record(coll, timeout=timeout)

    def _ensure_tombstones(self, collection: str, timeout) -> str:
        """The tombstone collection of ``collection``, created on the first recorded delete."""
        tomb = collection + TOMBSTONE_SUFFIX
        if tomb not in self._tombstones:
            if not self.has_collection(tomb, timeout=timeout):
                self._create(tomb, self._tombstone_schema(), "dummy", IndexConfig("FLAT", "IP"), timeout)
            self._ensure_loaded(tomb, timeout)
            self._tombstones.add(tomb)
        return tomb

    def _schema(self, dim: int):
        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
        s.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
        s.add_field("uri", DataType.VARCHAR, max_length=MAX_URI_BYTES)
        s.add_field("metadata", DataType.JSON)
        s.add_field("visibility", DataType.VARCHAR, max_length=16)
        s.add_field("updated_at", DataType.INT64)
        return s

    def _tombstone_schema(self):
        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
        s.add_field("updated_at", DataType.INT64)
        s.add_field("dummy", DataType.FLOAT_VECTOR, dim=2)   # Milvus 2.3 needs a vector field
        return s

    def _create(self, name, schema, vector_field, index: IndexConfig, timeout,
                properties: dict | None = None) -> bool:
        ip = self.client.prepare_index_params()
        ip.add_index(field_name=vector_field, index_type=index.index_type, metric_type=index.metric,
                     params=index.params)
        try:
            self._call("create_collection", "create_collection", name, schema=schema, index_params=ip,
                       consistency_level=self.consistency, timeout=timeout,
                       **({"properties": properties} if properties else {}))
        except StoreUnavailable:
            raise
        except StoreError:
            if self.has_collection(name, timeout=timeout):     # another process won the race
                return False
            raise
        log.info("created Milvus collection %s (%s %s %s)", name, index.index_type, index.metric, index.params)
        return True

    def flush(self, name: str, *, timeout: float | None = None) -> None:
        """Seal the collection's growing segments so that they get indexed (bulk loads, benchmarks)."""
        _check_name(name)
        self._call("flush", "flush", name, timeout=timeout)

    def _ensure_loaded(self, name: str, timeout) -> None:
        state = self._call("get_load_state", "get_load_state", name, timeout=timeout)
        if "NotLoad" in str(state.get("state")):
            self._call("load_collection", "load_collection", name, timeout=timeout)

    def drop_collection(self, name: str, *, timeout: float | None = None) -> None:
        """Drop a collection and its tombstones. Refuses while an alias names it."""
        _check_name(name)
        if self.has_collection(name, timeout=timeout):
            aliases = self.list_aliases(name, timeout=timeout)
            if aliases:
                raise ValueError(f"collection {name!r} is still served by alias(es) {aliases}: "
                                 "switch or drop them first")
            self._call("drop_collection", "drop_collection", name, timeout=timeout)
        if self.has_collection(name + TOMBSTONE_SUFFIX, timeout=timeout):
            self._call("drop_collection", "drop_collection", name + TOMBSTONE_SUFFIX, timeout=timeout)
        self._tombstones.discard(name + TOMBSTONE_SUFFIX)

    # --- aliases -------------------------------------------------------------------------

    def describe_alias(self, alias: str = DEFAULT_ALIAS, *, timeout: float | None = None) -> str | None:
        """The collection ``alias`` names, or None when the alias does not exist."""
        _check_name(alias)
        try:
            return self._call("describe_alias", "describe_alias", alias, timeout=timeout)["collection_name"]
        except StoreNotFound:
            return None

    def list_aliases(self, collection: str, *, timeout: float | None = None) -> list[str]:
        _check_name(collection)
        return list(self._call("list_aliases", "list_aliases", collection, timeout=timeout).get("aliases", []))

    def ensure_alias(self, alias: str, collection: str, *, timeout: float | None = None) -> bool:
        """Create ``alias`` -> ``collection`` unless the alias exists (pointing anywhere).
        Returns True when this call created it (the first model version serves by default)."""
        _check_name(alias)
        _check_name(collection)
        if self.describe_alias(alias, timeout=timeout) is not None:
            return False
        try:
            self._call("create_alias", "create_alias", collection, alias, timeout=timeout)
        except StoreUnavailable:
            raise
        except StoreError:
            if self.describe_alias(alias, timeout=timeout) is not None:   # another process won the race
                return False
            raise
        return self.describe_alias(alias, timeout=timeout) == collection

    def switch_alias(self, alias: str, collection: str, *, timeout: float | None = None) -> str | None:
        """Point ``alias`` at ``collection`` in one call (``alter_alias``; created when absent).
        Returns the collection it named before (None if it did not exist)."""
        _check_name(alias)
        _check_name(collection)
        if not self.has_collection(collection, timeout=timeout):
            raise ValueError(f"cannot point alias {alias!r} at {collection!r}: no such collection")
        before = self.describe_alias(alias, timeout=timeout)
        if before is None:
            self._call("create_alias", "create_alias", collection, alias, timeout=timeout)
        elif before != collection:
            self._call("alter_alias", "alter_alias", collection, alias, timeout=timeout)
        return before

    def drop_alias(self, alias: str, *, timeout: float | None = None) -> None:
        _check_name(alias)
        if self.describe_alias(alias, timeout=timeout) is not None:
            self._call("drop_alias", "drop_alias", alias, timeout=timeout)

    # --- writes --------------------------------------------------------------------------

    def upsert(self, collection: str, rows: Sequence[dict], *, timeout: float | None = None) -> int:
        """Insert or replace rows (all fields of the schema). Rows with the same id inside one
        call are reduced to one (Milvus rejects duplicate keys in one upsert): the one with the
        highest ``updated_at`` wins, and among equal ones the later in ``rows``. Returns the
        number of rows written."""
        _check_name(collection)
        if not rows:
            return 0
        latest: dict[str, dict] = {}
        for i, row in enumerate(rows):
            clean = _check_row(row, i)
            prev = latest.get(clean["id"])
            if prev is None or clean["updated_at"] >= prev["updated_at"]:
                latest[clean["id"]] = clean
        out = list(latest.values())
        dims = {len(r["embedding"]) for r in out}
        if len(dims) != 1:
            raise ValueError(f"rows have embeddings of different sizes {sorted(dims)}")
        for start in range(0, len(out), UPSERT_CHUNK):
            self._call("upsert", "upsert", collection, out[start:start + UPSERT_CHUNK], timeout=timeout)
        return len(out)

    def delete(self, collection: str, ids: Iterable[str] | dict[str, int], *,
               timeout: float | None = None) -> int:
        """Delete rows by id (absent ids are fine). Given ``{id: deleted_at_ms}``, also records
        the ids as tombstones so that :meth:`versions` keeps reporting the delete time.
        Returns the number of distinct ids asked for."""
        _check_name(collection)
        when = dict(ids) if isinstance(ids, dict) else None
        id_list = list(dict.fromkeys(when or ids))
        for i in id_list:
            check_id(i)
        if not id_list:
            return 0
        for start in range(0, len(id_list), UPSERT_CHUNK):
            chunk = id_list[start:start + UPSERT_CHUNK]
            self._call("delete", "delete", collection, ids=chunk, timeout=timeout)
        if when:
            tomb = self._ensure_tombstones(collection, timeout)
            stones = [{"id": i, "updated_at": int(when[i]), "dummy": [0.0, 0.0]} for i in id_list]
            for start in range(0, len(stones), UPSERT_CHUNK):
                self._call("upsert tombstones", "upsert", tomb,
                           stones[start:start + UPSERT_CHUNK], timeout=timeout)
        return len(id_list)

    # --- reads ---------------------------------------------------------------------------

    def get(self, collection: str, ids: Sequence[str], output_fields: Sequence[str] = (
            "uri", "metadata", "visibility", "updated_at"), *, consistency: str = "Strong",
            seen: int = 0, timeout: float | None = None) -> dict[str, dict]:
        """Rows by id as ``{id: {field: value}}`` (absent ids are missing), Strong by default.
        ``seen``: a Milvus timestamp (:meth:`last_write_ts`); the read then sees every write up to
        it (not necessarily later ones) instead of ``consistency``'s, and need not wait for the
        newest writes to become visible as a Strong read does."""
        _check_name(collection)
        ids = list(dict.fromkeys(ids))
        for i in ids:
            check_id(i)
        fields = _check_fields(output_fields)
        level = {"consistency_level": consistency}
        if seen:
            level = {"consistency_level": "Customized", "guarantee_timestamp": int(seen)}
        out: dict[str, dict] = {}
        for start in range(0, len(ids), UPSERT_CHUNK):
            chunk = ids[start:start + UPSERT_CHUNK]
            rows = self._call("query", "query", collection, ids=chunk, output_fields=["id", *fields],
                              timeout=timeout, **level)
            for r in rows:
                out[r["id"]] = _plain_row(r, fields)
        return out

    def versions(self, collection: str, ids: Sequence[str], *, seen: int = 0,
                 timeout: float | None = None) -> dict[str, int]:
        """``{id: updated_at}`` of the latest write known for each id: a stored row, or the
        delete time of a tombstone, whichever is newer (Strong; with ``seen``, every write up to
        that Milvus timestamp, see :meth:`get`). Absent ids are missing."""
        _check_name(collection)
        ids = list(dict.fromkeys(ids))
        out = {i: int(r["updated_at"]) for i, r in self.get(collection, ids, ("updated_at",), seen=seen,
                                                             timeout=timeout).items()}
        tomb = collection + TOMBSTONE_SUFFIX
        if tomb in self._tombstones or self.has_collection(tomb, timeout=timeout):
            self._tombstones.add(tomb)
            for i, r in self.get(tomb, ids, ("updated_at",), seen=seen, timeout=timeout).items():
                out[i] = max(out.get(i, r["updated_at"]), int(r["updated_at"]))
        return out

    def last_write_ts(self, collection: str) -> int:
        """The Milvus timestamp of the latest write this process saw finish on ``collection`` or
        its tombstones (pymilvus records it for its Session reads); 0 when none is known.
        Every write that finished before that write began has a smaller timestamp."""
        try:
            conn = self.client._get_connection()
            stamps = [ts_utils.get_collection_ts(name, conn.server_address, "")
                      for name in (collection, collection + TOMBSTONE_SUFFIX)]
        except Exception:  # noqa: BLE001  (a pymilvus without this cache: callers fall back to Strong)
            return 0
        return max((int(t) for t in stamps if t), default=0)

    def count(self, collection: str, *, filter: str = "", timeout: float | None = None) -> int:
        """Exact number of rows (Strong), optionally matching ``filter``."""
        _check_name(collection)
        rows = self._call("count", "query", collection, filter=filter, output_fields=["count(*)"],
                          consistency_level="Strong", timeout=timeout)
        return int(rows[0]["count(*)"]) if rows else 0

    def scan(self, collection: str, output_fields: Sequence[str] = ("uri", "metadata", "visibility",
                                                                     "updated_at"), *,
             filter: str = "", batch_size: int = 1000, timeout: float | None = None,
             passes: int = 4) -> Iterator[dict]:
        """Every row (``{"id": ..., field: value}``) exactly once, in pages; for evaluation and
        rollout checks of a collection nobody is writing to.

        pymilvus 2.6's query iterator reads a Milvus 2.3 server at a client-side time stamp
        that can miss the newest writes, so the rows are counted first (Strong) and the
        iterator is run again (after a pause, yielding only rows not seen yet) until it found
        them all; then, up to 16,384 rows, offset paging takes what is still missing."""
        _check_name(collection)
        fields = _check_fields(output_fields)
        if not 1 <= batch_size <= 16384:
            raise ValueError("batch_size must be in 1..16384")
        total = self.count(collection, filter=filter, timeout=timeout)
        seen: set[str] = set()
        for attempt in range(passes):
            for r in self._iterate(collection, fields, filter, batch_size, timeout):
                if r["id"] not in seen:
                    seen.add(r["id"])
                    yield r
            if len(seen) >= total:
                return
            time.sleep(0.5 * (attempt + 1))
        if total > 16384:
            raise StoreError(f"scan of {collection!r} found {len(seen)} of its {total} rows: this Milvus "
                             "server's query iterator misses rows and offset paging stops at 16384")
        for offset in range(0, total, batch_size):
            rows = self._call("query", "query", collection, filter=filter, output_fields=["id", *fields],
                              offset=offset, limit=min(batch_size, total - offset),
                              consistency_level="Strong", timeout=timeout)
            for r in rows:
                if r["id"] not in seen:
                    seen.add(r["id"])
                    yield {"id": r["id"], **_plain_row(r, fields)}

    def _iterate(self, collection: str, fields: list[str], filter: str, batch_size: int, timeout):
        try:
            it = self.client.query_iterator(collection, batch_size=batch_size, filter=filter,
                                            output_fields=["id", *fields], timeout=timeout or self.timeout,
                                            consistency_level="Strong")
        except Exception as exc:  # noqa: BLE001  (pymilvus and grpc raise many kinds)
            raise self._wrap("query_iterator", exc) from exc
        try:
            while True:
                try:
                    page = it.next()
                except Exception as exc:  # noqa: BLE001
                    raise self._wrap("query_iterator", exc) from exc
                if not page:
                    return
                for r in page:
                    yield {"id": r["id"], **_plain_row(r, fields)}
        finally:
            it.close()

    def search(self, name_or_alias: str, vectors, k: int = 10, *, filter: str | None = None,
               output_fields: Sequence[str] = DEFAULT_OUTPUT_FIELDS, search_params: dict | None = None,
               consistency: str | None = None, timeout: float | None = None) -> list[list[dict]]:
        """Top-``k`` nearest rows for each query vector: one list per query, best first, of
        ``{"id", "score", <output_fields>}`` (``score`` is the similarity, higher is closer;
        ask for ``"embedding"`` in ``output_fields`` to get the stored vector as float32).
        ``filter`` is a Milvus boolean expression, e.g. ``'visibility == "public"'``;
        ``consistency`` ``"Strong"`` sees every finished write (default: the collection's)."""
        _check_name(name_or_alias)
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[0] == 0 or q.shape[1] == 0:
            raise ValueError(f"query vectors must be a non-empty [N, D] array, got shape {q.shape}")
        if not np.all(np.isfinite(q)):
            raise ValueError("query vectors contain NaN or infinity")
        if not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= 16384:
            raise ValueError(f"k must be an integer in 1..16384, got {k!r}")
        fields = _check_fields(output_fields)
        params = {"params": self.index.search_params_for(int(k), search_params)}
        kwargs = {"consistency_level": consistency} if consistency else {}
        res = self._call("search", "search", name_or_alias, data=q.tolist(), limit=int(k),
                         filter=filter or "", output_fields=list(fields), search_params=params,
                         anns_field="embedding", timeout=timeout, **kwargs)
        out = []
        for hits in res:
            row = []
            for h in hits:
                ent = h.get("entity", {}) if isinstance(h, dict) else h.entity
                hit = {"id": h["id"], "score": float(h["distance"])}
                hit.update(_plain_row(ent, fields))
                row.append(hit)
            out.append(row)
        return out


def parse_model_record(text: str) -> dict | None:
    """The model record (JSON) written by :meth:`MilvusStore.ensure_model_collection`."""
    if not text:
        return None
    try:
        rec = json.loads(text)
    except ValueError:
        return None
    if not isinstance(rec, dict) or not rec.get("model") or not rec.get("version"):
        return None
    rec.setdefault("model_id", model_id(rec["model"], rec["version"]))
    rec.setdefault("embedder_url", "")
    return rec


# --- guards ------------------------------------------------------------------------------

def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a valid Milvus collection/alias name "
                         "(letters, digits, underscores; starts with a letter or underscore)")


def _check_fields(fields: Sequence[str]) -> list[str]:
    fields = [f for f in fields if f != "id"]
    bad = [f for f in fields if f not in FIELDS]
    if bad:
        raise ValueError(f"unknown output field(s) {bad}; fields are {FIELDS}")
    return fields


def _check_row(row: dict, i: int) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"row {i} is not a dict")
    missing = [f for f in FIELDS if f not in row]
    if missing:
        raise ValueError(f"row {i} ({row.get('id')!r}) lacks field(s) {missing}")
    check_id(row["id"])
    emb = np.asarray(row["embedding"], dtype=np.float32)
    if emb.ndim != 1 or emb.size == 0 or not np.all(np.isfinite(emb)):
        raise ValueError(f"row {row['id']!r}: embedding must be a finite 1-D vector")
    uri = row["uri"] or ""
    if not isinstance(uri, str) or len(uri.encode()) > MAX_URI_BYTES:
        raise ValueError(f"row {row['id']!r}: uri must be a string of at most {MAX_URI_BYTES} bytes")
    try:
        meta = check_metadata(row["metadata"])
    except ValueError as exc:
        raise ValueError(f"row {row['id']!r}: {exc}") from None
    if row["visibility"] not in VISIBILITIES:
        raise ValueError(f"row {row['id']!r}: visibility must be one of {VISIBILITIES}")
    ts = row["updated_at"]
    if isinstance(ts, bool) or not isinstance(ts, (int, np.integer)) or not 0 <= int(ts) < 2**63:
        raise ValueError(f"row {row['id']!r}: updated_at must be a non-negative integer (epoch-ms)")
    # a float32 array, not a list: pymilvus packs an array's bytes in one go (a list float by
    # float: 2.3x fewer rows/s on the 2.3.5 server, bench/ingest.py's bare upsert)
    return {"id": row["id"], "embedding": emb, "uri": uri, "metadata": meta,
            "visibility": row["visibility"], "updated_at": int(ts)}


def _plain_row(r: dict, fields: Sequence[str]) -> dict:
    out = {}
    for f in fields:
        v = r.get(f)
        if f == "embedding" and v is not None:
            v = np.asarray(v, dtype=np.float32)
        elif f == "updated_at" and v is not None:
            v = int(v)
        elif f == "metadata" and isinstance(v, (str, bytes)):
            v = json.loads(v)
        out[f] = v
    return out
