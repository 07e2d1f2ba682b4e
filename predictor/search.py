"""The search service: a query image (or a crop of one) -> the catalog's most similar images.

Pipeline: embed (in process, or through the embedder's V2 endpoint) -> Milvus top-k on the
serving alias -> re-rank (drop ``visibility=private``, collapse near-duplicates, keep the order,
fill up to k from extra candidates) -> ``[{id, score, uri, metadata}]``, most similar first.
Every search logs an impression and every click a click record on the Kafka topic
``search.events`` (:mod:`vsearch.search_events`).

Interfaces of one KServe ``ModelServer`` (model name ``visual-search``)::

    POST /v1/models/visual-search:predict  {"instances": [{"image": {"b64": ...}, "crop": [x0,y0,x1,y1],
                                             "k": 20, "filter": {"label": "cat"}}]}
    POST /v2/models/visual-search/infer    inputs image BYTES [N] (base64), crop FP32 [N,4], k INT32 [1]
                                           -> outputs results BYTES [N] (JSON), query_id BYTES [N]
    POST /search        multipart: image (file), crop ("x0,y0,x1,y1"), k, filter (JSON) -- or JSON
                        {"image_b64", "crop", "k", "filter", "url"} -> {"query_id", "results": [...]}
    GET  /images/<id>   the catalog image (file served, http(s) redirected)
    POST /events        {"type": "click", "query_id", "item_id"} (and deferred impressions)
    GET  /              the web page;  /docs OpenAPI;  /metrics Prometheus;  /v2/health/*

Errors: 400 with a reason (not an image, crop out of range, k out of range, unknown filter
field), 401 without the API key (when one is configured), 413 for oversize uploads, 503 with a
reason while Milvus (or a remote embedder) is unreachable. The server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from fastapi import Request
from prometheus_client import Counter, Gauge, Histogram

from predictor.kserve_app import import_kserve, install_request_error_handler
from predictor.preprocess import Box, InvalidImage, parse_crop, parse_crop_text
from vsearch import search_events

log = logging.getLogger(__name__)

MODEL_NAME = "visual-search"
WEB_DIR = Path(__file__).resolve().parent / "web"

# --------------------------------------------------------------------------- metrics

SEARCHES = Counter("vsearch_search_requests_total", "Searches answered", ["model_version"])
REJECTED = Counter("vsearch_search_rejected_total", "Searches refused", ["status"])
LATENCY = Histogram("vsearch_search_seconds", "Search latency by stage", ["stage"],
                    buckets=(.002, .005, .01, .02, .05, .1, .15, .25, .5, 1, 2.5, 5))
IMPRESSIONS = Counter("vsearch_search_impressions_total", "Impressions logged", ["model_version"])
CLICKS = Counter("vsearch_search_clicks_total", "Clicks logged", ["model_version"])
EVENTS_SENT = Counter("vsearch_search_events_sent_total", "Search events acknowledged by Kafka")
EVENTS_FAILED = Counter("vsearch_search_events_send_failures_total",
                        "Failed attempts to send search events (they stay buffered and are retried)")
EVENTS_DROPPED = Counter("vsearch_search_events_dropped_total",
                         "Search events dropped because the buffer was full", ["reason"])
EVENTS_BUFFERED = Gauge("vsearch_search_events_buffered", "Search events waiting to be sent")


# --------------------------------------------------------------------------- errors

class SearchError(Exception):
    """An error with an HTTP status and a reason a person can act on."""

    status = 500

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BadQuery(SearchError, ValueError):
    status = 400


class TooLarge(SearchError):
    status = 413


class Unavailable(SearchError):
    """Milvus (or the remote embedder) cannot be reached: retry later."""
    status = 503


class NotFound(SearchError):
    status = 404


# --------------------------------------------------------------------------- settings

@dataclass
class SearchSettings:
    alias: str = "images"
    k_default: int = 20
    k_max: int = 100
    overfetch: float = 3.0            # candidates fetched per wanted result (re-ranking drops some)
    max_candidates: int = 2000        # most candidates asked of Milvus for one query
    dedup_distance: float = 0.02      # cosine distance under which two results are duplicates
    filter_fields: tuple[str, ...] = ("label", "category", "source", "group")
    max_upload_bytes: int = 20 * 1024 * 1024
    milvus_timeout: float = 10.0
    ef: int | None = None             # HNSW search breadth (None: the store's default)
    query_store: Path | None = None   # where query images are kept (by content hash)
    allow_url_queries: bool = False
    allow_private_urls: bool = False
    url_timeout: float = 5.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    image_roots: tuple[Path, ...] = ()   # file:// catalog images served only from these (empty: any)
    recent_queries: int = 10_000          # query ids remembered for clicks
    model_version: str | None = None      # override of the reported model version


# --------------------------------------------------------------------------- candidates and re-ranking

@dataclass
class Candidate:
    id: str
    score: float
    uri: str | None = None
    metadata: dict = field(default_factory=dict)
    visibility: str = "public"
    content_hash: str | None = None
    vector: np.ndarray | None = None

    def result(self) -> dict:
        return {"id": self.id, "score": round(float(self.score), 6), "uri": self.uri,
                "metadata": self.metadata}


def rerank(candidates: Sequence[Candidate], k: int, dedup_distance: float) -> list[Candidate]:
    """Most similar first; never a private item; of any group of near-duplicates (same content
    hash, or embeddings within ``dedup_distance`` cosine distance of a better result) only the
    best stays. The order is otherwise kept; at most ``k`` come back."""
    if k <= 0:
        return []
    ordered = sorted(candidates, key=lambda c: -c.score)      # stable: ties keep Milvus' order
    kept: list[Candidate] = []
    kept_vectors: list[np.ndarray] = []
    hashes: set[str] = set()
    for cand in ordered:
        if cand.visibility == "private":
            continue
        if cand.content_hash and cand.content_hash in hashes:
            continue
        if dedup_distance > 0 and cand.vector is not None and kept_vectors:
            sims = np.stack(kept_vectors) @ np.asarray(cand.vector, dtype=np.float32)
            if float(1.0 - sims.max()) <= dedup_distance:
                continue
        kept.append(cand)
        if cand.content_hash:
            hashes.add(cand.content_hash)
        if cand.vector is not None:
            v = np.asarray(cand.vector, dtype=np.float32)
            kept_vectors.append(v / max(float(np.linalg.norm(v)), 1e-12))
        if len(kept) == k:
            break
    return kept


# --------------------------------------------------------------------------- request parsing

def parse_k(value: Any, settings: SearchSettings) -> int:
    if value is None or value == "":
        return settings.k_default
    if isinstance(value, bool):
        raise BadQuery(f"k must be a whole number from 1 to {settings.k_max}, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise BadQuery(f"k must be a whole number from 1 to {settings.k_max}, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise BadQuery(f"k must be a whole number from 1 to {settings.k_max}, got {value!r}")
    k = int(f)
    if not 1 <= k <= settings.k_max:
        raise BadQuery(f"k must be from 1 to {settings.k_max}, got {k}")
    return k


def parse_crop_value(value: Any) -> Box | None:
    try:
        if value is None:
            return None
        if isinstance(value, str):
            return parse_crop_text(value)
        return parse_crop(value)
    except InvalidImage as exc:
        raise BadQuery(str(exc)) from exc


FilterSpec = dict[str, list]


def parse_filter(value: Any, allowed: Iterable[str]) -> FilterSpec:
    """``{"label": "cat"}`` or ``{"label": ["cat", "dog"], "source": "x"}`` (JSON text or an
    object): every named metadata field must match one of its values."""
    if value is None or value == "" or value == {}:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise BadQuery(f'filter must be a JSON object such as {{"label": "cat"}}: {exc}') from exc
    if not isinstance(value, dict):
        raise BadQuery(f'filter must be a JSON object such as {{"label": "cat"}}, got {type(value).__name__}')
    allowed = tuple(allowed)
    out: FilterSpec = {}
    for key, wanted in value.items():
        if key not in allowed:
            raise BadQuery(f"unknown filter field {key!r}: the fields that can be filtered on are "
                           f"{', '.join(allowed) or '(none)'}")
        values = wanted if isinstance(wanted, list) else [wanted]
        if not values or len(values) > 100:
            raise BadQuery(f"filter field {key!r} needs 1 to 100 values")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise BadQuery(f"filter field {key!r}: values must be strings or numbers, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise BadQuery(f"filter field {key!r}: values must be finite numbers")
            if isinstance(v, str) and len(v) > 256:
                raise BadQuery(f"filter field {key!r}: values must be at most 256 characters")
        out[key] = values
    return out


def filter_expr(spec: FilterSpec, metadata_field: str = "metadata") -> str:
    """A Milvus boolean expression for a parsed filter (values JSON-quoted: no injection)."""
    parts = []
    for key, values in spec.items():
        lhs = f'{metadata_field}[{json.dumps(key)}]'
        if len(values) == 1:
            parts.append(f"{lhs} == {json.dumps(values[0])}")
        else:
            parts.append(f"{lhs} in {json.dumps(values)}")
    return " and ".join(parts)


def decode_b64(value: Any, what: str = "image") -> bytes:
    if isinstance(value, dict) and "b64" in value:
        value = value["b64"]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise BadQuery(f"{what} must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:            # data URLs from browsers
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadQuery(f"{what} is not valid base64: {exc}") from exc


@dataclass
class Query:
    image: bytes
    crop: Box | None = None
    k: int = 20
    filter: FilterSpec = field(default_factory=dict)
    log_impression: bool = True
    query_uri: str | None = None          # set when the query is a catalog image, e.g. catalog:<id>


# --------------------------------------------------------------------------- image URLs as queries

def _address_is_public(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified)


def fetch_image_url(url: str, *, max_bytes: int, timeout: float, allow_private: bool = False) -> bytes:
    """Download a query image. Refuses non-http(s) schemes and, unless ``allow_private``,
    hosts that resolve to private, loopback or link-local addresses; no redirects; at most
    ``max_bytes`` and ``timeout`` seconds."""
    import requests

    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise BadQuery(f"url must be an http(s) URL, got {url[:200]!r}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parsed.hostname, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise BadQuery(f"url host {parsed.hostname!r} does not resolve: {exc}") from exc
    if not allow_private:
        bad = sorted({i[4][0] for i in infos if not _address_is_public(i[4][0])})
        if bad:
            raise BadQuery(f"url host {parsed.hostname!r} resolves to a private, loopback or "
                           f"link-local address ({', '.join(bad)}): refused")
    deadline = time.monotonic() + timeout
    try:
        with requests.get(url, stream=True, timeout=timeout, allow_redirects=False) as resp:
            if 300 <= resp.status_code < 400:
                raise BadQuery(f"url answered a redirect ({resp.status_code}); give the final URL")
            if resp.status_code != 200:
                raise BadQuery(f"url answered HTTP {resp.status_code}")
            length = resp.headers.get("content-length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise TooLarge(f"url image is {length} bytes, over the limit of {max_bytes}")
            chunks, total = [], 0
            for chunk in resp.iter_content(65536):
                total += len(chunk)
                if total > max_bytes:
                    raise TooLarge(f"url image is over the limit of {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise BadQuery(f"url took longer than {timeout:.0f}s to download")
                chunks.append(chunk)
            return b"".join(chunks)
    except requests.RequestException as exc:
        raise BadQuery(f"url could not be fetched: {exc}") from exc


# --------------------------------------------------------------------------- the event log

class EventLog:
    """Search events to Kafka without ever failing or slowing a search.

    Records go into a bounded in-memory buffer; a background thread sends them (acks=all) and
    removes them only once Kafka acknowledged them; failures are logged, counted
    (``vsearch_search_events_send_failures_total``) and retried with exponential backoff. When
    the buffer is full the oldest record is dropped, logged and counted
    (``vsearch_search_events_dropped_total``): memory stays bounded while Kafka is down."""

    def __init__(self, bootstrap: str | None, topic: str = search_events.TOPIC,
                 max_buffer: int = 10_000, batch: int = 500, send_timeout: float = 10.0):
        self.bootstrap, self.topic = bootstrap, topic
        self.max_buffer, self.batch, self.send_timeout = max_buffer, batch, send_timeout
        self._buf: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._inflight = 0
        self.sent = self.failures = self.dropped = 0
        self.last_error: str | None = None
        self._thread = None
        if bootstrap:
            self._thread = threading.Thread(target=self._run, name="search-events", daemon=True)
            self._thread.start()
        else:
            log.warning("no --bootstrap given: search events (impressions, clicks) are not logged")

    @property
    def enabled(self) -> bool:
        return self._thread is not None

    def emit(self, record: dict) -> None:
        if not self.enabled:
            EVENTS_DROPPED.labels("disabled").inc()
            return
        item = (str(record.get("query_id", "")).encode(), search_events.encode(record))
        with self._cv:
            if len(self._buf) >= self.max_buffer:
                self._buf.popleft()
                self.dropped += 1
                EVENTS_DROPPED.labels("buffer_full").inc()
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error("search events buffer full (%d records; Kafka at %s unreachable: %s): "
                              "dropped the oldest record (%d dropped so far)", self.max_buffer,
                              self.bootstrap, self.last_error, self.dropped)
            self._buf.append(item)
            EVENTS_BUFFERED.set(len(self._buf))
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._buf) + self._inflight

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every buffered record was acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.pending() == 0

    def close(self, timeout: float = 5.0) -> None:
        if not self.enabled:
            return
        self.flush(timeout)
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)
        if self.pending():
            log.error("stopping with %d search events not sent to Kafka", self.pending())

    def _producer(self):
        from kafka import KafkaAdminClient, KafkaProducer
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5,
                                 retries=3, request_timeout_ms=int(self.send_timeout * 1000),
                                 max_block_ms=int(self.send_timeout * 1000),
                                 bootstrap_timeout_ms=int(self.send_timeout * 1000),
                                 client_id="vsearch-search")
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="vsearch-search",
                                     bootstrap_timeout_ms=int(self.send_timeout * 1000))
            try:
                if self.topic not in admin.list_topics():
                    admin.create_topics([NewTopic(self.topic, 1, 1)])
            except TopicAlreadyExistsError:
                pass
            finally:
                admin.close()
        except Exception as exc:                 # the producer may still auto-create it
            log.warning("could not check/create topic %s: %s", self.topic, exc)
        return producer

    def _run(self) -> None:
        producer, backoff = None, 0.5
        while True:
            with self._cv:
                while not self._buf and not self._stop:
                    self._cv.wait(1.0)
                if self._stop and not self._buf:
                    break
                items = [self._buf.popleft() for _ in range(min(self.batch, len(self._buf)))]
                self._inflight = len(items)
                EVENTS_BUFFERED.set(len(self._buf))
            try:
                if producer is None:
                    producer = self._producer()
                futures = [producer.send(self.topic, key=k, value=v) for k, v in items]
                producer.flush(self.send_timeout)
                for fut in futures:
                    fut.get(timeout=self.send_timeout)
                self.sent += len(items)
                EVENTS_SENT.inc(len(items))
                backoff = 0.5
                with self._cv:
                    self._inflight = 0
            except Exception as exc:
                # Put the batch back in front (a record acknowledged before the failure may be
                # sent twice: at-least-once, the query id lets readers de-duplicate).
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                EVENTS_FAILED.inc()
                log.warning("sending %d search events to %s failed (%s); retrying in %.1fs",
                            len(items), self.bootstrap, self.last_error, backoff)
                with self._cv:
                    room = self.max_buffer - len(self._buf)
                    keep = items[-room:] if room > 0 else []
                    lost = len(items) - len(keep)
                    if lost:
                        self.dropped += lost
                        EVENTS_DROPPED.labels("buffer_full").inc(lost)
                        log.error("dropped %d search events: buffer full", lost)
                    self._buf.extendleft(reversed(keep))
                    self._inflight = 0
                    EVENTS_BUFFERED.set(len(self._buf))
                if producer is not None:
                    try:
                        producer.close(timeout=1)
                    except Exception:
                        pass
                    producer = None
                with self._cv:
                    if self._stop:
                        break
                    self._cv.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        if producer is not None:
            try:
                producer.close(timeout=2)
            except Exception:
                pass


# --------------------------------------------------------------------------- the query store

class QueryStore:
    """Query images kept by content hash so that events' ``query_uri`` points at a real file
    (the trainer reads (query image, clicked image) pairs from them)."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root else None
        if self.root:
            self.root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, digest: str) -> str | None:
        if not self.root:
            return None
        path = self.root / digest[:2] / f"{digest}{_suffix(data)}"
        if not path.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(path.suffix + f".{uuid.uuid4().hex}.tmp")
                tmp.write_bytes(data)
                tmp.replace(path)
            except OSError as exc:
                log.error("could not store query image %s: %s", path, exc)
                return None
        return path.resolve().as_uri()


def _suffix(data: bytes) -> str:
    head = data[:12]
    if head.startswith(b"\xff\xd8"):
        return ".jpg"
    if head.startswith(b"\x89PNG"):
        return ".png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    if head.startswith(b"GIF8"):
        return ".gif"
    return ".img"


def query_hashes(image: bytes, crop: Box | None) -> tuple[str, str]:
    """(hash of the image bytes, hash of the query = bytes + crop)."""
    image_hash = hashlib.sha256(image).hexdigest()
    if crop is None:
        return image_hash, image_hash
    box = ",".join(f"{v:.6f}" for v in crop)
    return image_hash, hashlib.sha256(image + b"|crop=" + box.encode()).hexdigest()


# --------------------------------------------------------------------------- the service

class SearchService:
    """Embed -> ANN -> re-rank -> results, plus the event log. Synchronous and thread-safe;
    the HTTP layer calls it on worker threads."""

    def __init__(self, embedder, index, settings: SearchSettings, events: EventLog | None = None):
        self.embedder = embedder
        self.index = index
        self.settings = settings
        self.events = events or EventLog(None)
        self.query_store = QueryStore(settings.query_store)
        self._recent: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._recent_lock = threading.Lock()

    # -- model version: what produced the ranking
    @property
    def model_version(self) -> str:
        if self.settings.model_version:
            return self.settings.model_version
        meta = getattr(self.embedder, "meta", None)
        if meta is not None:
            return meta.model_id
        name = getattr(self.embedder, "model_name", "embedder")
        version = getattr(self.embedder, "version", None)
        return f"{name}__{version}" if version else name

    def embed(self, image: bytes, crop: Box | None) -> np.ndarray:
        from predictor.client import EmbedderUnavailable

        if len(image) > self.settings.max_upload_bytes:
            raise TooLarge(f"image is {len(image)} bytes, over the limit of "
                           f"{self.settings.max_upload_bytes} bytes")
        try:
            with LATENCY.labels("embed").time():
                return np.asarray(self.embedder.embed_bytes([image], [crop])[0], dtype=np.float32)
        except InvalidImage as exc:
            raise BadQuery(str(exc)) from exc
        except EmbedderUnavailable as exc:
            raise Unavailable(str(exc)) from exc

    def search(self, query: Query) -> dict:
        t0 = time.perf_counter()
        vector = self.embed(query.image, query.crop)
        t1 = time.perf_counter()
        results = self.search_vector(vector, query.k, query.filter)
        t2 = time.perf_counter()
        query_id = uuid.uuid4().hex
        image_hash, query_hash = query_hashes(query.image, query.crop)
        model_version = self.model_version
        query_uri = query.query_uri or self.query_store.put(query.image, image_hash)
        impression = {
            "schema": search_events.SCHEMA, "type": "impression", "query_id": query_id,
            "query_hash": query_hash, "image_hash": image_hash, "query_uri": query_uri,
            "crop": list(query.crop) if query.crop else None, "model_version": model_version,
            "results": [{"id": c.id, "rank": i + 1, "score": round(float(c.score), 6),
                         "uri": c.uri} for i, c in enumerate(results)],
            "k": query.k, "ts": int(time.time() * 1000)}
        self._remember(impression, logged=query.log_impression)
        if query.log_impression:
            self.events.emit(impression)
            IMPRESSIONS.labels(model_version).inc()
        SEARCHES.labels(model_version).inc()
        return {"query_id": query_id, "model_version": model_version,
                "results": [c.result() for c in results],
                "took_ms": {"embed": round((t1 - t0) * 1000, 2), "search": round((t2 - t1) * 1000, 2)}}

    def search_vector(self, vector: np.ndarray, k: int, spec: FilterSpec | None = None) -> list[Candidate]:
        """ANN + re-rank, fetching more candidates while re-ranking leaves fewer than k."""
        expr = filter_expr(spec or {})
        limit = min(self.settings.max_candidates, max(k, int(math.ceil(k * self.settings.overfetch)) + 10))
        while True:
            with LATENCY.labels("ann").time():
                cands = self.index.search(vector, limit, expr)
            with LATENCY.labels("rerank").time():
                results = rerank(cands, k, self.settings.dedup_distance)
            if len(results) >= k or len(cands) < limit or limit >= self.settings.max_candidates:
                return results
            limit = min(self.settings.max_candidates, limit * 4)

    # -- events
    def _remember(self, impression: dict, logged: bool) -> None:
        with self._recent_lock:
            self._recent[impression["query_id"]] = {"impression": impression, "logged": logged,
                                                    "clicks": set()}
            while len(self._recent) > self.settings.recent_queries:
                self._recent.popitem(last=False)

    def record_event(self, event: Any) -> dict:
        """A click (or a deferred impression) reported by a client. The server completes the
        record from the query it answered, so the client cannot invent queries or results."""
        if not isinstance(event, dict):
            raise BadQuery('an event is an object {"type": "click", "query_id": ..., "item_id": ...}')
        kind = event.get("type")
        if kind not in search_events.TYPES:
            raise BadQuery(f"event type must be one of {', '.join(search_events.TYPES)}, got {kind!r}")
        query_id = event.get("query_id")
        if not isinstance(query_id, str) or not query_id:
            raise BadQuery("event needs the query_id of the search it belongs to")
        with self._recent_lock:
            entry = self._recent.get(query_id)
        if entry is None:
            raise BadQuery(f"unknown or expired query_id {query_id!r} (the server remembers the "
                           f"last {self.settings.recent_queries} searches)")
        imp = entry["impression"]
        if kind == "impression":
            with self._recent_lock:
                if entry["logged"]:
                    return {"accepted": False, "reason": "impression already logged"}
                entry["logged"] = True
            self.events.emit({**imp, "ts": int(time.time() * 1000)})
            IMPRESSIONS.labels(imp["model_version"]).inc()
            return {"accepted": True}
        item_id = event.get("item_id")
        match = [r for r in imp["results"] if r["id"] == item_id]
        if not match:
            raise BadQuery(f"item_id {item_id!r} was not among the results of query {query_id}")
        with self._recent_lock:
            if item_id in entry["clicks"]:
                return {"accepted": False, "reason": "click already logged"}
            entry["clicks"].add(item_id)
        hit = match[0]
        record = {"schema": search_events.SCHEMA, "type": "click", "query_id": query_id,
                  "query_hash": imp["query_hash"], "image_hash": imp["image_hash"],
                  "query_uri": imp["query_uri"], "crop": imp["crop"], "item_id": item_id,
                  "item_uri": hit.get("uri"), "rank": hit["rank"], "score": hit["score"],
                  "model_version": imp["model_version"], "ts": int(time.time() * 1000)}
        self.events.emit(record)
        CLICKS.labels(imp["model_version"]).inc()
        return {"accepted": True}

    # -- catalog images
    def image_location(self, item_id: str) -> str:
        item = self.index.get(item_id)
        if item is None or item.visibility == "private":
            raise NotFound(f"no catalog image with id {item_id!r}")
        if not item.uri:
            raise NotFound(f"catalog image {item_id!r} has no uri to serve")
        return item.uri

    def close(self) -> None:
        self.events.close()


# --------------------------------------------------------------------------- the Milvus side

class CatalogIndex:
    """The search side of the catalog collection behind the serving alias, through
    :class:`vsearch.store.MilvusStore` (the one Milvus access layer). Store outages become
    :class:`Unavailable` (503); the store reconnects by itself on the next call."""

    OUTPUT_FIELDS = ("uri", "metadata", "visibility", "embedding")

    def __init__(self, uri: str, alias: str = "images", *, timeout: float = 10.0, ef: int | None = None,
                 store=None):
        from vsearch.store import MilvusStore
        self.alias, self.ef = alias, ef
        self.store = store or MilvusStore(uri, timeout=timeout)

    def _call(self, fn: Callable, what: str):
        from vsearch.store import StoreError, StoreUnavailable
        try:
            return fn()
        except StoreUnavailable as exc:
            raise Unavailable(f"Milvus is unreachable ({what}): {str(exc)[:300]}") from exc
        except StoreError as exc:
            text = str(exc).lower()
            if "not exist" in text or "not found" in text:
                raise Unavailable(f"nothing to search yet: alias/collection {self.alias!r} does not "
                                  f"exist in Milvus ({what})") from exc
            raise SearchError(f"Milvus refused to {what}: {str(exc)[:300]}") from exc

    def _loaded(self, fn: Callable):
        """Run ``fn``; after a Milvus restart collections come back released: load and retry once."""
        from vsearch.store import StoreError
        try:
            return fn()
        except StoreError as exc:
            if "released" not in str(exc) and "load()" not in str(exc):
                raise
            log.warning("collection behind %r is not loaded; loading it", self.alias)
            self.store.ensure_loaded(self.alias)
            return fn()

    def search(self, vector: np.ndarray, limit: int, expr: str = "") -> list[Candidate]:
        visible = 'visibility != "private"'
        flt = f"({expr}) and {visible}" if expr else visible
        params = {"ef": max(self.ef, limit)} if self.ef else None
        hits = self._call(lambda: self._loaded(lambda: self.store.search(
            self.alias, vector, k=limit, filter=flt, output_fields=self.OUTPUT_FIELDS,
            search_params=params)[0]), f"search alias {self.alias!r}")
        return [self._candidate(h) for h in hits]

    def get(self, item_id: str) -> Candidate | None:
        try:
            rows = self._call(lambda: self._loaded(lambda: self.store.get(
                self.alias, [item_id], ("uri", "metadata", "visibility"), consistency="Bounded")),
                f"read item {item_id!r}")
        except ValueError as exc:            # an id the store refuses (quotes, too long)
            raise NotFound(f"no catalog image with id {item_id!r}: {exc}") from exc
        row = rows.get(item_id)
        return self._candidate({"id": item_id, **row}) if row else None

    def collection(self) -> str | None:
        return self._call(lambda: self.store.describe_alias(self.alias), "describe the alias")

    @staticmethod
    def _candidate(hit: dict) -> Candidate:
        metadata = hit.get("metadata") or {}
        metadata = metadata if isinstance(metadata, dict) else {}
        vec = hit.get("embedding")
        return Candidate(id=str(hit["id"]), score=float(hit.get("score", 0.0)), uri=hit.get("uri") or None,
                         metadata=metadata, visibility=hit.get("visibility") or "public",
                         content_hash=metadata.get("content_hash") or metadata.get("sha256") or None,
                         vector=np.asarray(vec, np.float32) if vec is not None else None)


# --------------------------------------------------------------------------- KServe model + HTTP routes

def _v1_queries(payload: Any, settings: SearchSettings, fetch_url: Callable[[str], bytes]) -> list[Query]:
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        raise BadQuery('V1 body must be {"instances": [{"image": {"b64": ...}, "crop": [...], "k": 20}]}')
    instances = payload["instances"]
    if not 1 <= len(instances) <= 16:
        raise BadQuery(f"1 to 16 instances per request, got {len(instances)}")
    return [query_from_fields(inst, settings, fetch_url, where=f"instance {i}: ")
            for i, inst in enumerate(instances)]


def query_from_fields(fields: Any, settings: SearchSettings, fetch_url: Callable[[str], bytes] | None,
                      where: str = "") -> Query:
    """A query from a JSON object: image_b64 / image ({"b64": ...}) / url, crop, k, filter."""
    if not isinstance(fields, dict):
        raise BadQuery(f"{where}expected an object with 'image' (base64)")
    known = {"image", "image_b64", "url", "crop", "k", "filter", "log_impression"}
    unknown = set(fields) - known
    if unknown:
        raise BadQuery(f"{where}unknown field(s) {sorted(unknown)}: expected {sorted(known)}")
    sources = [f for f in ("image", "image_b64", "url") if fields.get(f) not in (None, "")]
    if len(sources) != 1:
        raise BadQuery(f"{where}give exactly one of image (base64), image_b64 or url")
    try:
        if sources[0] == "url":
            if not settings.allow_url_queries or fetch_url is None:
                raise BadQuery("image URLs as queries are turned off on this server (--allow-url-queries)")
            image = fetch_url(str(fields["url"]))
        else:
            image = decode_b64(fields[sources[0]])
        return Query(image=image, crop=parse_crop_value(fields.get("crop")),
                     k=parse_k(fields.get("k"), settings),
                     filter=parse_filter(fields.get("filter"), settings.filter_fields),
                     log_impression=fields.get("log_impression", True) is not False)
    except SearchError as exc:
        exc.reason = where + exc.reason
        raise


def _v2_queries(req, settings: SearchSettings) -> list[Query]:
    names = [i.name for i in req.inputs]
    unknown = set(names) - {"image", "crop", "k"}
    if unknown:
        raise BadQuery(f"unknown input(s) {sorted(unknown)}: expected image, optional crop and k")
    image = req.get_input_by_name("image")
    if image is None or image.datatype != "BYTES":
        raise BadQuery("input 'image' (BYTES, base64 of the image file) is required")
    data = image.data
    if isinstance(data, np.ndarray):
        data = data.reshape(-1).tolist()
    if not isinstance(data, list) or not 1 <= len(data) <= 16:
        raise BadQuery("input 'image' must hold 1 to 16 base64 strings")
    blobs = [decode_b64(d, f"image {i}") for i, d in enumerate(data)]
    crops: list = [None] * len(blobs)
    crop = req.get_input_by_name("crop")
    if crop is not None:
        if list(crop.shape) != [len(blobs), 4]:
            raise BadQuery(f"input 'crop' shape must be [{len(blobs)}, 4], got {list(crop.shape)}")
        boxes = np.asarray(crop.data, dtype=np.float64).reshape(len(blobs), 4)
        crops = [parse_crop_value(b.tolist()) for b in boxes]
    params = req.parameters or {}
    k_value = params.get("k")
    k_in = req.get_input_by_name("k")
    if k_in is not None:
        vals = np.asarray(k_in.data).reshape(-1).tolist()
        if len(vals) != 1:
            raise BadQuery("input 'k' must hold one number")
        k_value = vals[0]
    k = parse_k(k_value, settings)
    spec = parse_filter(params.get("filter"), settings.filter_fields)
    return [Query(image=b, crop=c, k=k, filter=spec) for b, c in zip(blobs, crops)]


def make_model(service_factory: Callable[[], SearchService], name: str = MODEL_NAME):
    """The KServe model ``visual-search`` (V1 predict and V2 infer)."""
    kserve = import_kserve()
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    class SearchModel(kserve.Model):
        def __init__(self):
            super().__init__(name)
            self.service: SearchService | None = None

        def load(self) -> bool:
            self.service = service_factory()
            self.ready = True
            return self.ready

        def get_input_types(self):
            return [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                    {"name": "crop", "datatype": "FP32", "shape": [-1, 4]},
                    {"name": "k", "datatype": "INT32", "shape": [1]}]

        def get_output_types(self):
            return [{"name": "results", "datatype": "BYTES", "shape": [-1]},
                    {"name": "query_id", "datatype": "BYTES", "shape": [-1]}]

        async def predict(self, payload, headers=None):
            svc = self.service
            settings = svc.settings
            if isinstance(payload, InferRequest):
                queries = _v2_queries(payload, settings)
            else:
                queries = await asyncio.to_thread(_v1_queries, payload, settings, svc_fetch(svc))
            answers = [await asyncio.to_thread(svc.search, q) for q in queries]
            if not isinstance(payload, InferRequest):
                return {"predictions": answers}
            results = InferOutput(name="results", shape=[len(answers)], datatype="BYTES",
                                  data=[json.dumps(a["results"]) for a in answers])
            ids = InferOutput(name="query_id", shape=[len(answers)], datatype="BYTES",
                              data=[a["query_id"] for a in answers])
            return InferResponse(response_id=payload.id or "", model_name=self.name,
                                 infer_outputs=[results, ids],
                                 parameters={"model_version": answers[0]["model_version"]})

    return SearchModel()


def svc_fetch(svc: SearchService) -> Callable[[str], bytes]:
    s = svc.settings
    return lambda url: fetch_image_url(url, max_bytes=s.max_upload_bytes, timeout=s.url_timeout,
                                       allow_private=s.allow_private_urls)


HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready", "/v1/models", "/v2/models")


def _is_health(path: str, method: str) -> bool:
    if path in ("/v2/health/live", "/v2/health/ready", "/v2"):
        return True
    # /v1/models/<name> (ready), /v2/models/<name>/ready
    return method == "GET" and (path.endswith("/ready") or
                                (path.startswith("/v1/models/") and ":" not in path))


def add_routes(app, get_service: Callable[[], SearchService | None], settings: SearchSettings) -> None:
    """The plain HTTP routes (page, /search, /images, /events) and middlewares, added to KServe's
    FastAPI app before its own routes so that ``/`` is the web page."""
    import hmac

    from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.middleware.cors import CORSMiddleware

    def error(status: int, reason: str) -> JSONResponse:
        REJECTED.labels(str(status)).inc()
        return JSONResponse({"error": reason}, status_code=status)

    async def search_error_handler(_request, exc: SearchError):
        if exc.status >= 500:
            log.warning("search failed (%d): %s", exc.status, exc.reason)
        return error(exc.status, exc.reason)

    app.add_exception_handler(SearchError, search_error_handler)
    install_request_error_handler()

    def service() -> SearchService:
        svc = get_service()
        if svc is None:
            raise Unavailable("the search model is still loading")
        return svc

    max_body = settings.max_upload_bytes * 4 // 3 + 256 * 1024     # base64 + multipart overhead

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path, method = request.url.path, request.method
        if settings.api_key and method != "OPTIONS" and not (
                path == "/" or path.startswith("/web/") or path in ("/favicon.ico",)
                or _is_health(path, method)):
            given = request.headers.get("x-api-key") or ""
            auth = request.headers.get("authorization") or ""
            if auth.lower().startswith("bearer "):
                given = given or auth[7:].strip()
            if not given or not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return error(401, "missing or wrong API key: send it in the X-API-Key header")
        length = request.headers.get("content-length")
        if method in ("POST", "PUT") and length and length.isdigit() and int(length) > max_body:
            return error(413, f"request body is {length} bytes; uploads are limited to "
                              f"{settings.max_upload_bytes} bytes")
        return await call_next(request)

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["content-type", "x-api-key", "authorization"])

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

    @app.get("/api/config", tags=["search"], summary="What the web page needs to know")
    async def config():
        svc = get_service()
        return {"k_default": settings.k_default, "k_max": settings.k_max,
                "filter_fields": list(settings.filter_fields),
                "max_upload_bytes": settings.max_upload_bytes,
                "model_version": svc.model_version if svc else None,
                "url_queries": settings.allow_url_queries, "api_key_required": bool(settings.api_key)}

    @app.post("/search", tags=["search"], summary="Search with an image (multipart or JSON)",
              description="multipart/form-data: `image` (file), optional `crop` (x0,y0,x1,y1 "
                          "normalised), `k`, `filter` (JSON object), `url` (when URL queries are "
                          "on). Or a JSON body {image_b64, crop, k, filter, url}. Answers "
                          '{"query_id", "model_version", "results": [{id, score, uri, metadata}]}.')
    async def search(request: Request):
        svc = service()
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            try:
                body = await request.json()
            except ValueError as exc:
                raise BadQuery(f"body is not valid JSON: {exc}") from exc
            query = await asyncio.to_thread(query_from_fields, body, settings, svc_fetch(svc))
        elif ctype.startswith("multipart/form-data") or ctype.startswith("application/x-www-form-urlencoded"):
            try:
                form = await request.form(max_files=1, max_fields=10)
            except Exception as exc:
                raise BadQuery(f"could not read the form: {exc}") from exc
            fields: dict[str, Any] = {}
            upload = form.get("image")
            unknown = set(form.keys()) - {"image", "crop", "k", "filter", "url", "log_impression"}
            if unknown:
                raise BadQuery(f"unknown form field(s) {sorted(unknown)}: expected image, crop, k, filter, url")
            if upload is not None and not isinstance(upload, str):
                data = await upload.read(settings.max_upload_bytes + 1)
                if len(data) > settings.max_upload_bytes:
                    raise TooLarge(f"image is over the limit of {settings.max_upload_bytes} bytes")
                fields["image"] = base64.b64encode(data).decode() if data else None
                if not data:
                    raise BadQuery("the uploaded image file is empty")
            elif isinstance(upload, str) and upload:
                raise BadQuery("form field 'image' must be a file upload (multipart/form-data)")
            for key in ("crop", "k", "filter", "url"):
                if form.get(key) not in (None, ""):
                    fields[key] = form.get(key)
            if str(form.get("log_impression", "")).lower() in ("0", "false", "no"):
                fields["log_impression"] = False
            query = await asyncio.to_thread(query_from_fields, fields, settings, svc_fetch(svc))
        else:
            raise BadQuery("send multipart/form-data with an 'image' file, or a JSON body with image_b64")
        return await asyncio.to_thread(svc.search, query)

    @app.get("/images/{item_id:path}", tags=["search"], summary="The catalog image of a result")
    async def image(item_id: str):
        svc = service()
        uri = await asyncio.to_thread(svc.image_location, item_id)
        parsed = urllib.parse.urlsplit(uri)
        if parsed.scheme in ("http", "https"):
            return RedirectResponse(uri, status_code=307)
        if parsed.scheme == "file" or not parsed.scheme:
            path = Path(urllib.parse.unquote(parsed.path)).resolve()
            if settings.image_roots and not any(path.is_relative_to(r) for r in settings.image_roots):
                raise NotFound(f"catalog image {item_id!r} lies outside the served folders")
            if not path.is_file():
                raise NotFound(f"catalog image {item_id!r} is gone from {path}")
            if path.stat().st_size > settings.max_upload_bytes:
                raise NotFound(f"catalog image {item_id!r} is too large to serve")
            data = await asyncio.to_thread(path.read_bytes)
            kind = _suffix(data)
            if kind == ".img":
                raise NotFound(f"catalog item {item_id!r} does not point at a JPEG/PNG/WebP/GIF image")
            media = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                     ".gif": "image/gif"}[kind]
            return Response(data, media_type=media, headers={"cache-control": "max-age=300"})
        raise NotFound(f"catalog image {item_id!r} has a uri this server cannot serve ({parsed.scheme}:)")

    @app.post("/events", tags=["search"], summary="Record clicks (and deferred impressions)",
              description='{"type": "click", "query_id": ..., "item_id": ...} or a list of such '
                          'objects; {"type": "impression", "query_id": ...} logs the impression of '
                          "a search made with log_impression=false.")
    async def events(request: Request):
        svc = service()
        try:
            body = await request.json()
        except ValueError as exc:
            raise BadQuery(f"body is not valid JSON: {exc}") from exc
        items = body if isinstance(body, list) else [body]
        if not 1 <= len(items) <= 100:
            raise BadQuery("send 1 to 100 events")
        return {"events": [svc.record_event(e) for e in items]}


@dataclass
class ServeOptions:
    milvus_uri: str
    model_dir: str | None = None
    embedder_url: str | None = None
    embedder_name: str = "embedder"
    bootstrap: str | None = None
    http_port: int = 8000
    device: str | None = None
    threads: int | None = None
    max_pixels: int = 40_000_000
    settings: SearchSettings = field(default_factory=SearchSettings)


def build_service(opts: ServeOptions) -> SearchService:
    from predictor.preprocess import Limits
    if opts.embedder_url:
        from predictor.client import EmbedderClient
        embedder = EmbedderClient(opts.embedder_url, model_name=opts.embedder_name, timeout=30.0)
    elif opts.model_dir:
        from predictor.model import Embedder
        embedder = Embedder(opts.model_dir, device=opts.device, threads=opts.threads, batch_size=1,
                            limits=Limits(max_bytes=opts.settings.max_upload_bytes,
                                          max_pixels=opts.max_pixels), decode_workers=2)
    else:
        raise ValueError("give --model-dir (embed in process) or --embedder-url")
    index = CatalogIndex(opts.milvus_uri, opts.settings.alias, timeout=opts.settings.milvus_timeout,
                         ef=opts.settings.ef)
    events = EventLog(opts.bootstrap)
    svc = SearchService(embedder, index, opts.settings, events)
    log.info("search service: alias %r on %s, embedder %s, events %s, model version %s",
             opts.settings.alias, opts.milvus_uri, opts.embedder_url or opts.model_dir,
             opts.bootstrap or "off", svc.model_version)
    return svc


def serve(opts: ServeOptions) -> None:
    """Run the KServe ModelServer with the ``visual-search`` model and the plain routes."""
    kserve = import_kserve()
    from kserve.model_server import app

    model = make_model(lambda: build_service(opts))
    add_routes(app, lambda: model.service, opts.settings)
    model.load()
    try:
        kserve.ModelServer(http_port=opts.http_port, enable_grpc=False, enable_docs_url=True
                           ).start([model])
    finally:
        if model.service is not None:
            model.service.close()
