"""The kopf operator for ``SearchIndex`` objects: a timer that runs one idempotent step of the
rollout (:func:`vsearch.operators.rollout.reconcile`) against the actual state, a deletion handler (kopf
adds the finalizer ``vsearch.io/cleanup``) that removes everything the object created, Milvus
included, Kubernetes Events for every phase change, and Prometheus metrics.

No handler sleeps: waiting is the next timer tick; failures that may pass raise
``kopf.TemporaryError(delay=...)`` (kopf's backoff), and a step that keeps failing ends the
rollout as Failed after ``spec.rollout.maxRetries`` (see :mod:`vsearch.operators.rollout`).

Least-privilege RBAC (``operators/rbac.yaml``): searchindexes get/list/watch/patch,
searchindexes/status get/patch, searchindexes/finalizers update (owner references that block
deletion); inferenceservices and deployments get/create/delete; configmaps
and secrets get (golden sets, the Milvus token); events create/patch; jobs, services and trainjobs
get/create/delete (the learning loop, :mod:`vsearch.operators.training`)."""

from __future__ import annotations

import collections
import copy
import logging
import threading
import time
from pathlib import Path

import kopf
from prometheus_client import Counter, Gauge, Histogram

from ..core.fetch import FetchConfig, Fetcher
from ..core.store import MilvusStore
from ..predictor.client import EmbedderClient
from . import rollout
from .crd import GROUP, PLURAL, VERSION, prune
from .experiments import TopicEvents
from .kafka_groups import KafkaGroups
from .spec import IndexSpec
from .training import model_meta_reader
from .trust import Trust
from .workloads import KubernetesWorkloads

log = logging.getLogger(__name__)

RECONCILES = Counter("vsearch_operator_reconciles_total", "Reconcile steps by phase and outcome",
                     ["phase", "outcome"])
TRANSITIONS = Counter("vsearch_operator_phase_transitions_total", "Phase changes", ["phase"])
PHASE = Gauge("vsearch_operator_phase", "1 for the phase each SearchIndex is in",
              ["namespace", "name", "phase"])
STEP_SECONDS = Histogram("vsearch_operator_step_seconds", "Time of one reconcile step", ["phase"],
                         buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
BACKFILL_INDEXED = Gauge("vsearch_operator_candidate_indexed_items", "Items in the candidate collection",
                         ["namespace", "name"])
# The online experiment (phase Experimenting), as its last look counted it from the search events.
EXP_RUNNING = Gauge("vsearch_experiment_running", "1 while a SearchIndex runs an online experiment",
                    ["namespace", "name"])
EXP_FIGURES = {key: Gauge(f"vsearch_experiment_{metric}", help_, ["namespace", "name", "arm"])
               for key, metric, help_ in (
                   ("impressions", "impressions", "Impressions (searches) counted per arm"),
                   ("clicks", "clicks", "Clicks counted per arm (once per query and item)"),
                   ("units", "units", "Randomisation units seen per arm"),
                   ("ctr", "ctr", "Click-through rate per arm"),
                   ("errors", "errors", "Failed searches per arm"))}
EXP_LOOKS = Counter("vsearch_experiment_looks_total", "Looks at an experiment's events", ["namespace", "name"])
EXP_DECISIONS = Counter("vsearch_experiment_decisions_total", "Experiment decisions", ["decision"])

class Clients:
    """Clients kept between steps (Milvus, Kafka admin, embedders), at most ``size``, the least
    recently used closed first; lives in the operator's ``kopf.Memo``."""

    def __init__(self, size: int = 64):
        self.size = size
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = self._items[key] = make()
            while len(self._items) > self.size:
                _, old = self._items.popitem(last=False)
                close = getattr(old, "close", None)
                if close is not None:
                    try:
                        close()
                    except Exception as exc:  # noqa: BLE001  (closing an evicted client)
                        log.debug("closing an evicted client: %s", exc)
            return value


def operator_memo(api_client, trust: Trust) -> kopf.Memo:
    """The operator's shared state for kopf (``kopf.run(memo=...)``; each handler gets it as
    ``memo``): the Kubernetes API client, the allow-lists, the fetchers and the client cache."""
    roots = tuple(Path(r) for r in trust.catalog_file_roots)
    catalog = Fetcher(FetchConfig(schemes=("file", "http", "https") if roots else ("http", "https"),
                                  file_roots=roots, allow_networks=trust.fetch_allow_networks))
    queries = Fetcher(FetchConfig(schemes=("http", "https"), file_roots=(),
                                  allow_networks=trust.fetch_allow_networks))
    models = Fetcher(FetchConfig(schemes=("file", "s3") if trust.model_file_roots else ("s3",),
                                 file_roots=tuple(Path(r) for r in trust.model_file_roots)))
    return kopf.Memo(api_client=api_client, trust=trust, fetcher=catalog, query_fetcher=queries,
                     models=model_meta_reader(models), clients=Clients())


def build_env(body: dict, memo: kopf.Memo) -> rollout.Env:
    """The reconcile environment for one object: its workloads, Milvus and Kafka (clients kept
    in ``memo.clients``). Nothing is read or connected for an object the operator's
    configuration does not allow (the step reports why)."""
    clients: Clients = memo.clients
    workloads = KubernetesWorkloads(memo.api_client, owner=body)
    store = groups = None
    try:
        meta = body.get("metadata") or {}
        spec = IndexSpec.from_dict(prune({"spec": body["spec"]})["spec"], namespace=meta.get("namespace", ""),
                                   index=meta.get("name", ""))
        if not memo.trust.refusals(meta.get("namespace", ""), spec):
            token = workloads.milvus_token(spec)
            idx = spec.index_config()
            store = clients.get(("store", spec.milvus_uri, token, repr(idx)),
                                lambda: MilvusStore(spec.milvus_uri, token=token, timeout=30, index=idx))
            groups = clients.get(("groups", spec.bootstrap), lambda: KafkaGroups(spec.bootstrap))
    except Exception as exc:  # noqa: BLE001  (an invalid spec: the step reports it)
        log.debug("no environment for an invalid spec: %s", exc)
    return rollout.Env(workloads=workloads, store=store, groups=groups,
                       embedder=lambda url: clients.get(("embedder", url), lambda: EmbedderClient(url, timeout=60)),
                       fetcher=memo.fetcher, query_fetcher=memo.query_fetcher, trust=memo.trust,
                       events=clients.get(("events",), TopicEvents), models=memo.models)


def plain(body) -> dict:
    """A deep, plain-dict copy of a kopf body."""
    def conv(v):
        if hasattr(v, "items"):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(body)


def apply_status(patch, old: dict, new: dict) -> None:
    """Write ``new`` as the status: changed keys set, vanished keys removed (kopf's own kept)."""
    for key, value in new.items():
        if old.get(key) != value:
            patch.status[key] = copy.deepcopy(value)
    for key in old:
        if key not in new and key != "kopf":
            patch.status[key] = None


def step(name: str, namespace: str, body: dict, patch, env: rollout.Env) -> rollout.Outcome:
    """One reconcile step for a kopf handler: run it, write the status, post the Events."""
    obj = plain(body)
    phase = (obj.get("status") or {}).get("phase") or rollout.PENDING
    t0 = time.monotonic()
    outcome = rollout.reconcile(name, namespace, obj, env)
    STEP_SECONDS.labels(phase).observe(time.monotonic() - t0)
    RECONCILES.labels(phase, "error" if outcome.error else "ok").inc()
    apply_status(patch, obj.get("status") or {}, outcome.status)
    for p in rollout.PHASES:
        PHASE.labels(namespace, name, p).set(1 if p == outcome.phase else 0)
    cand = outcome.status.get("candidate") or {}
    BACKFILL_INDEXED.labels(namespace, name).set((cand.get("progress") or {}).get("indexed") or 0)
    experiment_metrics(namespace, name, outcome, obj.get("status"))
    for kind, reason, message in outcome.events:
        TRANSITIONS.labels(outcome.phase).inc()
        try:
            kopf.event(body, type=kind, reason=reason, message=message[:1000])
        except Exception as exc:  # noqa: BLE001  (an Event is information, not state)
            log.warning("could not post event %s: %s", reason, exc)
    return outcome


def experiment_metrics(namespace: str, name: str, outcome: rollout.Outcome, old: dict | None = None) -> None:
    """The ``vsearch_experiment_*`` gauges from ``status.experiment`` (the last look's figures)."""
    e = outcome.status.get("experiment") or {}
    running = outcome.phase == rollout.EXPERIMENTING and bool(e.get("id")) and not e.get("endedAt")
    EXP_RUNNING.labels(namespace, name).set(1 if running else 0)
    for arm, figures in (e.get("arms") or {}).items():
        if isinstance(figures, dict):
            for key, gauge in EXP_FIGURES.items():
                value = figures.get(key)
                if isinstance(value, (int, float)):
                    gauge.labels(namespace, name, arm).set(value)
    for _kind, reason, _message in outcome.events:
        if reason == "ExperimentDecided":
            EXP_DECISIONS.labels(e.get("decision") or "unknown").inc()
    if (e.get("looks") or 0) > (((old or {}).get("experiment") or {}).get("looks") or 0):
        EXP_LOOKS.labels(namespace, name).inc()


def register(interval: float = 5.0) -> None:
    """Register the handlers with kopf's default registry (``interval``: seconds between steps)."""

    @kopf.on.startup()
    def configure(settings: kopf.OperatorSettings, **_):
        settings.persistence.finalizer = "vsearch.io/cleanup"
        # Exact namespaces (or all): no namespace or CRD watching, so no RBAC for them either.
        settings.scanning.disabled = True
        settings.posting.level = logging.WARNING          # our own Events say what happens
        settings.watching.connect_timeout = 10
        settings.watching.server_timeout = 120
        settings.networking.request_timeout = 30

    @kopf.timer(GROUP, VERSION, PLURAL, interval=interval, initial_delay=0.1, id="rollout")
    def rollout_timer(name, namespace, body, meta, patch, memo, **_):
        if meta.get("deletionTimestamp"):
            return
        outcome = step(name, namespace, body, patch, build_env(plain(body), memo))
        if outcome.error:
            raise kopf.TemporaryError(outcome.error, delay=max(interval, 2.0))

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup")
    def cleanup(name, namespace, body, memo, **_):
        obj = plain(body)
        try:
            done, left = rollout.cleanup(name, namespace, obj, build_env(obj, memo))
        except Exception as exc:  # noqa: BLE001
            raise kopf.TemporaryError(f"cleaning up {namespace}/{name}: {exc}", delay=5) from exc
        if not done:
            raise kopf.TemporaryError(f"still deleting: {', '.join(left)}", delay=3)
        log.info("%s/%s: deleted its workloads, collections, alias and consumer groups", namespace, name)
