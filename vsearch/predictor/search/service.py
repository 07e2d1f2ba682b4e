"""The search service: a query image (or a crop of one) -> the catalog's most similar images.

Pipeline: embed (in process, or through the embedder's V2 endpoint) -> Milvus top-k on the
serving alias -> re-rank (drop ``visibility=private``, collapse near-duplicates, keep the order,
fill up to k from extra candidates) -> ``[{id, score, uri, metadata}]``, most similar first.
Every search logs an impression and every click a click record on the Kafka topic
``search.events`` (:mod:`vsearch.core.search_events`). The HTTP side is in ``routes.py`` and
``model.py`` (KServe); this class is synchronous and thread-safe.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...core import search_events
from ...core.experiment import CANDIDATE, INTERLEAVED, SERVING, Experiment, team_draft
from ...core.fetch import FetchConfig, Fetcher, FetchError
from ...core.images import web_media_type
from ...core.text import names_brief
from ..client import EmbedderClient, EmbedderUnavailable
from ..embedding import ImageEmbedder
from ..preprocess import Box, InvalidImage
from .errors import BadQuery, NotFound, SearchError, TooLarge, Unavailable
from .event_log import EventLog
from .index import CatalogIndex, CollectionGone, Target
from .metrics import CLICKS, EXP_ERRORS, EXP_LATENCY, EXP_SEARCHES, IMPRESSIONS, LATENCY, SEARCHES
from .query_store import QueryStore, query_hashes
from .request import FilterSpec, Query
from .rerank import Candidate, rerank
from .settings import SearchSettings
from .tokens import TokenSigner

log = logging.getLogger(__name__)
# What a client may send to POST /events ("error" events are the service's own).
CLIENT_EVENT_TYPES = ("impression", "click")


@dataclass
class _Query:
    query: Query
    query_id: str
    image_hash: str
    query_hash: str


@dataclass
class _Answer:
    """What answered a query: the target whose model version and collection the impression
    names, the results, each one's team (interleaving), the ``experiment`` object of events."""
    target: Target
    results: list[Candidate]
    teams: list[str] | None = None
    experiment: dict | None = None
    embed_s: float = 0.0
    search_s: float = 0.0



def embedder_url_allowed(url: str, patterns) -> bool:
    """Whether ``url`` (``scheme://host[:port]``, nothing else) matches one of ``patterns`` (shell
    patterns over ``scheme://host[:port]``, e.g. ``http://*-predictor.shop.svc``)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname or "@" in u.netloc or u.query or u.fragment \
            or u.path not in ("", "/"):
        return False
    return any(fnmatch.fnmatchcase(f"{u.scheme}://{u.netloc.lower()}", p) for p in patterns)

class SearchService:
    """Embed -> ANN -> re-rank -> results, plus the event log. Synchronous and thread-safe;
    the HTTP layer calls it on worker threads."""

    def __init__(self, embedder: ImageEmbedder, index: CatalogIndex, settings: SearchSettings,
                 events: EventLog | None = None, *, embedder_name: str = "embedder",
                 embedder_api_key: str | None = None, embedder_timeout: float = 30.0):
        # In process (a model directory) or remote: then one client per model version's
        # endpoint, as the collection records it (``embedder`` serves collections recording none).
        self.embedder = embedder
        self.embedder_name, self.embedder_api_key = embedder_name, embedder_api_key
        self.embedder_timeout = embedder_timeout
        self._clients: dict[str, EmbedderClient] = {}
        self._clients_lock = threading.Lock()
        self.index = index
        self.settings = settings
        self.events = events or EventLog(None)
        self.query_store = QueryStore(settings.query_store, max_bytes=settings.query_store_max_bytes)
        # Query images by URL: http(s) only, no redirects, public addresses unless allowed.
        self.url_fetcher = Fetcher(FetchConfig(
            schemes=("http", "https"), allow_private=settings.allow_private_urls, max_redirects=0,
            max_bytes=settings.max_upload_bytes, connect_timeout=settings.url_timeout,
            read_timeout=settings.url_timeout, total_timeout=settings.url_timeout, retries=0, workers=1))
        # Catalog images shown by /images: file:// only under --image-roots (none by default),
        # http(s) fetched here (proxied, never redirected: a browser keeps custom headers such
        # as the API key on a redirect) from public addresses unless allowed.
        self.image_fetcher = Fetcher(FetchConfig(
            allow_private=settings.allow_private_image_urls, file_roots=tuple(settings.image_roots),
            max_bytes=settings.max_upload_bytes, connect_timeout=settings.url_timeout,
            read_timeout=settings.url_timeout, total_timeout=settings.url_timeout, retries=1, workers=1))
        # The searches are not remembered: each answer carries its impression, signed, and any
        # replica with the same secret turns it into click records.
        self.tokens = TokenSigner(settings.click_secret, settings.click_token_ttl_s)
        # the candidate's retrieval of an interleaved query, beside the serving one
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="candidate")

    @property
    def in_process(self) -> bool:
        return self.embedder.endpoint is None

    # -- model version: what produced the ranking
    @property
    def model_version(self) -> str:
        return self.settings.model_version or self.embedder.model_id

    def model_of(self, target: Target | None = None) -> dict:
        """``{"name", "version"}`` of the model that built ``target``'s collection (its record),
        else of this server's embedder: what a person reads (the web page's header)."""
        rec = target.record if target is not None else None
        if rec and rec.get("model") is not None:
            return {"name": str(rec["model"]), "version": str(rec.get("version", ""))}
        meta = getattr(self.embedder, "meta", None)
        if meta is not None:
            return {"name": str(meta.name), "version": str(meta.version)}
        return {"name": str(getattr(self.embedder, "model_name", self.embedder_name)),
                "version": str(getattr(self.embedder, "version", "") or "")}

    def fetch_url(self, url: str) -> bytes:
        """The query image at ``url`` (URL queries), or a 400/413 saying why not."""
        try:
            return self.url_fetcher.fetch(url)
        except FetchError as exc:
            # The client learns the kind of failure only, never what answered inside the network.
            log.info("URL query %r refused: %s", str(url)[:200], exc)
            raise (TooLarge if exc.too_large else BadQuery)(f"url could not be used: {exc.public}") from exc

    def embedder_for(self, target: Target) -> ImageEmbedder:
        """The embedder of the model version that built ``target``'s collection, never another
        one. In process: this server's model, and only for a collection built by it (or one
        that records no model). Remote: a client of the endpoint the collection records."""
        rec = target.record
        if self.in_process:
            name, version = self.embedder.model_name, self.embedder.version
            if rec and (str(rec["model"]), str(rec["version"])) != (str(name), str(version)):
                raise Unavailable(
                    f"collection {target.collection!r} behind alias {self.index.alias!r} was built by model "
                    f"{rec['model']} version {rec['version']}, but this server embeds in process with "
                    f"{name} version {version}: refusing to mix them (serve it with "
                    f"--embedder-url, or --model-dir of that model)")
            return self.embedder
        url = (rec or {}).get("embedder_url") or None
        if not url or url.rstrip("/") == str(getattr(self.embedder, "url", "")).rstrip("/"):
            return self.embedder
        if not embedder_url_allowed(url, self.settings.allowed_embedder_urls):
            # whoever created the collection wrote the record: the query image (and the embedder
            # API key) go only where this service's own configuration allows
            raise Unavailable(f"collection {target.collection!r} records embedder {url[:200]!r}, which is not "
                              "--embedder-url nor in --allowed-embedder-urls: refusing to send queries there")
        with self._clients_lock:
            client = self._clients.get(url)
            if client is None:
                client = self._clients[url] = EmbedderClient(
                    url, model_name=self.embedder_name, timeout=self.embedder_timeout,
                    api_key=self.embedder_api_key)
        return client

    def embed(self, image: bytes, crop: Box | None, target: Target | None = None) -> np.ndarray:
        if len(image) > self.settings.max_upload_bytes:
            raise TooLarge(f"image is {len(image)} bytes, over the limit of "
                           f"{self.settings.max_upload_bytes} bytes")
        embedder = self.embedder_for(target) if target is not None else self.embedder
        try:
            with LATENCY.labels("embed").time():
                vector = np.asarray(embedder.embed_bytes([image], [crop])[0], dtype=np.float32)
        except InvalidImage as exc:
            raise BadQuery(str(exc)) from exc
        except EmbedderUnavailable as exc:
            which = (f"the embedder of {target.model_version or 'the model'} (collection {target.collection})"
                     if target else "the embedder")
            log.warning("embedding failed (%s, collection %s): %s", which,
                        target.collection if target else "?", exc)
            raise Unavailable(f"{which} is unreachable; retry later") from exc
        # The endpoint a collection records must still serve the version that built it.
        expected = ((target.record if target is not None else None) or {}).get("served_version")
        served = None if self.in_process else embedder.version
        if expected and served is not None and str(served) != str(expected):
            raise Unavailable(f"the embedder of collection {target.collection!r} now serves model version "
                              f"{served}, not {expected} that built it: refusing to mix them")
        return vector

    def search(self, query: Query) -> dict:
        """One query, answered by one model version end to end (its embedder, its collection),
        or, for a unit in an interleaving experiment, by both merged by team draft."""
        t_start = time.perf_counter()
        query_id = uuid.uuid4().hex
        image_hash, query_hash = query_hashes(query.image, query.crop)
        ctx = _Query(query, query_id, image_hash, query_hash)
        for attempt in (0, 1):
            # alias -> collection -> the model version that built it -> its embedder; the query
            # is embedded by that version and searches that concrete collection, never the
            # alias, so a switch in between cannot mix versions.
            target = self.index.resolve(fresh=attempt > 0)
            try:
                answer = self._answer(target, ctx)
                break
            except CollectionGone as exc:
                if attempt:
                    raise Unavailable(f"collection {exc} disappeared while searching it") from exc
        took_ms = round((time.perf_counter() - t_start) * 1000, 2)
        by = answer.target
        model_version = by.model_version or self.model_version
        query_uri = query.query_uri or self.query_store.put(query.image, image_hash)
        results = [{"id": c.id, "rank": i + 1, "score": round(float(c.score), 6)} for i, c in enumerate(answer.results)]
        if answer.teams is not None:
            for r, team in zip(results, answer.teams):
                r["team"] = team
        impression = {
            "schema": search_events.SCHEMA, "type": "impression", "query_id": query_id,
            "query_hash": query_hash, "image_hash": image_hash, "query_uri": query_uri,
            "crop": list(query.crop) if query.crop else None, "model_version": model_version,
            "collection": by.collection, "results": results, "k": query.k, "took_ms": took_ms,
            "error": False, "ts": int(time.time() * 1000)}
        if answer.experiment is not None:
            impression["experiment"] = answer.experiment
            exp = answer.experiment
            if exp["arm"] == INTERLEAVED:       # the whole query (each side is counted as its team)
                EXP_SEARCHES.labels(exp["id"], INTERLEAVED).inc()
                EXP_LATENCY.labels(exp["id"], INTERLEAVED).observe(took_ms / 1000)
        if query.log_impression:
            self.events.emit(impression)
            IMPRESSIONS.labels(model_version).inc()
        SEARCHES.labels(model_version).inc()
        # the token names the stored query image by its name in the store, never its URI
        token = self.tokens.sign({**impression, "query_ref": self.query_store.ref_of(query_uri)})
        out = {"query_id": query_id, "model_version": model_version, "model": self.model_of(by),
               "collection": by.collection,
               # which version answered is no secret; the team of each interleaved result is
               # (only the events and the token carry it): a client must not present them apart
               "results": [c.result() for c in answer.results], "token": token,
               "took_ms": {"embed": round(answer.embed_s * 1000, 2), "search": round(answer.search_s * 1000, 2),
                           "total": took_ms}}
        if answer.experiment is not None:
            out["experiment"] = {"id": answer.experiment["id"], "arm": answer.experiment["arm"]}
        return out

    def _answer(self, target: Target, q: "_Query") -> "_Answer":
        """Who answers ``q``: plain serving without an experiment; the unit's arm with one."""
        exp = target.experiment if target.candidate is not None else None
        if exp is None:
            return self._retrieve(target, q.query)
        unit = q.query.unit or f"image:{q.image_hash}"
        arm = exp.arm(unit)
        if arm == INTERLEAVED:
            return self._interleave(target, exp, unit, q)
        answer = self._arm_retrieve(target.candidate if arm == CANDIDATE else target, exp, arm, unit, q)
        answer.experiment = exp.event(unit, arm)
        return answer

    def _retrieve(self, target: Target, query: Query) -> "_Answer":
        """Embed with ``target``'s embedder, search ``target``'s collection, re-rank."""
        t0 = time.perf_counter()
        vector = self.embed(query.image, query.crop, target)
        t1 = time.perf_counter()
        results = self.search_vector(vector, query.k, query.filter, collection=target.collection)
        return _Answer(target, results, embed_s=t1 - t0, search_s=time.perf_counter() - t1)

    def _arm_retrieve(self, target: Target, exp: Experiment, arm: str, unit: str, q: "_Query") -> "_Answer":
        """:meth:`_retrieve` of one arm (or of one side of an interleaved query), counted in
        the experiment's metrics; a failure on the service's side (5xx) is also logged as an
        ``error`` event of that arm. A vanished collection is no error: the caller resolves again."""
        EXP_SEARCHES.labels(exp.id, arm).inc()
        t0 = time.perf_counter()
        try:
            answer = self._retrieve(target, q.query)
        except CollectionGone:
            raise
        except Exception as exc:
            status = exc.status if isinstance(exc, SearchError) else 500
            if status >= 500:
                EXP_ERRORS.labels(exp.id, arm).inc()
                self.events.emit({
                    "schema": search_events.SCHEMA, "type": "error", "query_id": q.query_id,
                    "query_hash": q.query_hash, "image_hash": q.image_hash,
                    "model_version": target.model_version or self.model_version,
                    "collection": target.collection, "experiment": exp.event(unit, arm), "error": True,
                    "status": status, "reason": str(getattr(exc, "reason", exc))[:300],
                    "took_ms": round((time.perf_counter() - t0) * 1000, 2), "ts": int(time.time() * 1000)})
            raise
        EXP_LATENCY.labels(exp.id, arm).observe(time.perf_counter() - t0)
        return answer

    def _interleave(self, target: Target, exp: Experiment, unit: str, q: "_Query") -> "_Answer":
        """Both versions retrieve (in parallel: the candidate on the service's pool) and their
        rankings are merged by team draft, each result remembering its team. When the candidate
        fails (or its collection is gone), the query gets the serving ranking alone (counted
        and logged as the candidate's error; the impression says ``fallback``); when serving
        fails, the query fails as it would without the experiment."""
        cand = self._pool.submit(self._arm_retrieve, target.candidate, exp, CANDIDATE, unit, q)
        try:
            a = self._arm_retrieve(target, exp, SERVING, unit, q)
        except BaseException:
            cand.cancel()
            raise
        event = exp.event(unit, INTERLEAVED)
        try:
            b = cand.result()
        except Exception as exc:  # noqa: BLE001  (whatever failed, serving's answer stands)
            log.warning("experiment %s: the candidate (%s) failed, query %s answered by serving alone: %s",
                        exp.id, exp.candidate, q.query_id, getattr(exc, "reason", exc))
            a.experiment = {**event, "fallback": True}
            return a
        # one result per item (and per content: exact copies count as one item)
        key = {}
        for c in a.results + b.results:
            key.setdefault(c.id, c.content_hash or c.id)
        by_key = {SERVING: {key[c.id]: c for c in reversed(a.results)},
                  CANDIDATE: {key[c.id]: c for c in reversed(b.results)}}
        merged = team_draft([key[c.id] for c in a.results], [key[c.id] for c in b.results], q.query.k,
                            seed=q.query_id)
        results = [by_key[team][k] for k, team in merged]
        event["arm_ms"] = {SERVING: round((a.embed_s + a.search_s) * 1000, 2),
                           CANDIDATE: round((b.embed_s + b.search_s) * 1000, 2)}
        return _Answer(target, results, [team for _, team in merged], event, a.embed_s, a.search_s)

    def search_vector(self, vector: np.ndarray, k: int, spec: FilterSpec | None = None,
                      collection: str | None = None) -> list[Candidate]:
        """ANN + re-rank, fetching more candidates while re-ranking leaves fewer than k;
        ``collection``: search that concrete collection (default: the alias)."""
        limit = min(self.settings.max_candidates, max(k, int(math.ceil(k * self.settings.overfetch)) + 10))
        while True:
            with LATENCY.labels("ann").time():
                cands = self.index.search(vector, limit, spec, collection=collection)
            with LATENCY.labels("rerank").time():
                results = rerank(cands, k, self.settings.dedup_distance)
            if len(results) >= k or len(cands) < limit or limit >= self.settings.max_candidates:
                return results
            limit = min(self.settings.max_candidates, limit * 4)

    # -- events
    def record_events(self, events: list) -> list[dict]:
        """:meth:`record_event` for each of ``events`` (one catalog read per clicked item)."""
        uris: dict[str, str | None] = {}
        return [self.record_event(e, uris) for e in events]

    def record_event(self, event: Any, uris: dict | None = None) -> dict:
        """A click (or a deferred impression) reported by a client: ``{"type": "click", "token":
        <the search's token>, "item_id": ...}``. The record is completed from the signed token,
        so the client can neither invent searches nor click results it was not shown, and any
        replica sharing the secret accepts it. Delivery is at least once: a repeated click is
        logged again, and readers count one per (query_id, item_id)."""
        if not isinstance(event, dict):
            raise BadQuery('an event is an object {"type": "click", "token": ..., "item_id": ...}')
        kind = event.get("type")
        if kind not in CLIENT_EVENT_TYPES:
            raise BadQuery(f"event type must be one of {', '.join(CLIENT_EVENT_TYPES)}, got {kind!r}")
        unknown = set(event) - {"type", "token", "item_id", "query_id"}
        if unknown:
            raise BadQuery(f"unknown event field(s) {names_brief(unknown)}: expected type, token, item_id")
        if "token" not in event:
            raise BadQuery("an event needs the 'token' of the search it belongs to")
        imp = self.tokens.verify(event["token"])
        if event.get("query_id") not in (None, imp["query_id"]):
            raise BadQuery("query_id does not match the token's search")
        now = int(time.time() * 1000)
        query_uri = self.query_store.uri_of(imp.get("query_ref"))
        if kind == "impression":
            record = {k: v for k, v in imp.items() if k != "query_ref"}
            self.events.emit({**record, "schema": search_events.SCHEMA, "type": "impression",
                              "query_uri": query_uri, "error": False, "ts": now})
            IMPRESSIONS.labels(imp["model_version"]).inc()
            return {"accepted": True}
        item_id = event.get("item_id")
        match = [r for r in imp["results"] if r["id"] == item_id]
        if not match:
            raise BadQuery(f"item_id {item_id!r} was not among the results of query {imp['query_id']}")
        hit = match[0]
        record = {"schema": search_events.SCHEMA, "type": "click", "query_id": imp["query_id"],
                  "query_hash": imp["query_hash"], "image_hash": imp["image_hash"],
                  "query_uri": query_uri, "crop": imp["crop"], "item_id": item_id,
                  "item_uri": self._item_uri(item_id, {} if uris is None else uris),
                  "rank": hit["rank"], "score": hit["score"],
                  "model_version": imp["model_version"], "collection": imp.get("collection"), "ts": now}
        if isinstance(imp.get("experiment"), dict):
            # the arm of the search, and for an interleaved one the team that showed the item
            record["experiment"] = {**imp["experiment"], **({"team": hit["team"]} if hit.get("team") else {})}
        self.events.emit(record)
        CLICKS.labels(imp["model_version"]).inc()
        return {"accepted": True}

    def _item_uri(self, item_id: str, known: dict) -> str | None:
        """A clicked item's catalog URI (for the trainer's pairs), read when the click is
        logged (``known``: the ones read already); None (and logged) when the catalog cannot say."""
        if item_id not in known:
            try:
                item = self.index.get(item_id)
                known[item_id] = item.uri if item is not None else None
            except SearchError as exc:
                log.warning("click on %r logged without its uri: %s", str(item_id)[:200], exc.reason)
                return None
        return known[item_id]

    # -- catalog images
    def image_location(self, item_id: str) -> str:
        item = self.index.get(item_id)
        if item is None or item.visibility == "private":
            raise NotFound(f"no catalog image with id {item_id!r}")
        if not item.uri:
            raise NotFound(f"catalog image {item_id!r} has no uri to serve")
        return item.uri

    def catalog_image(self, item_id: str) -> tuple[bytes, str]:
        """``(bytes, media type)`` of a public catalog item's image (JPEG, PNG, WebP or GIF),
        read through the guarded image fetcher; :class:`NotFound` otherwise, without saying
        where the image lives."""
        uri = self.image_location(item_id)
        try:
            data = self.image_fetcher.fetch(uri)
        except FetchError as exc:
            log.info("catalog image %r not served: %s", item_id[:200], exc)
            raise NotFound(f"catalog image {item_id!r} cannot be served: {exc.public}") from exc
        kind = web_media_type(data)
        if kind is None:
            raise NotFound(f"catalog item {item_id!r} does not point at a JPEG/PNG/WebP/GIF image")
        return data, kind[0]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.events.close()
        self.url_fetcher.close()
        self.image_fetcher.close()
