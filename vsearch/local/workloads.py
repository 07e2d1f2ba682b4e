"""The workload layer on local processes (``vsearch demo --rollout``, benchmarks): the same
:class:`vsearch.operators.workloads.Workloads` interface as the Kubernetes one, so the rollout logic
(:mod:`vsearch.operators.rollout`) is one code path; here a model version's embedder is a
``vsearch serve embedder`` process and its ingest a ``vsearch ingest`` process on free ports.

:class:`LocalRollout` drives :func:`vsearch.operators.rollout.reconcile` over an in-memory object the way
kopf's timer does over a Kubernetes one."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from ..core.fetch import FetchConfig, Fetcher
from ..core.store import MilvusStore
from ..operators.experiments import TopicEvents
from ..operators.kafka_groups import KafkaGroups
from ..operators.rollout import Env, reconcile
from ..operators.spec import IndexSpec
from ..operators.trust import Trust
from ..operators.workloads import Workloads, WorkloadState, embedder_args, ingest_args
from ..predictor.client import EmbedderClient
from .services import Service, free_port, http_ok, vsearch_argv

log = logging.getLogger(__name__)


class LocalWorkloads(Workloads):
    def __init__(self, log_dir: str | Path, *, threads: int = 1, ingest_extra=(),
                 config_maps: dict[str, dict[str, str]] | None = None):
        self.log_dir = Path(log_dir)
        self.config_maps = dict(config_maps or {})          # name -> {key: text}, like ConfigMaps
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.threads, self.ingest_extra = threads, tuple(ingest_extra)
        self.procs: dict[str, tuple[Service, str]] = {}          # name -> (process, ready URL)

    def _ensure(self, name: str, argv_of, ready_path: str) -> WorkloadState:
        have = self.procs.get(name)
        if have is not None and not have[0].alive():
            log.warning("%s exited (%s); restarting it:\n%s", name, have[0].proc.returncode, have[0].log_tail(10))
            have = None
        if have is None:
            port = free_port()
            svc = Service(name, vsearch_argv(*argv_of(port)), port=port, log_path=self.log_dir / f"{name}.log")
            self.procs[name] = have = (svc, f"http://127.0.0.1:{port}")
            return WorkloadState(message=f"started {name}")
        svc, url = have
        if http_ok(url + ready_path):
            return WorkloadState(ready=True, url=url)
        return WorkloadState(message=f"{name} starting")

    def ensure_embedder(self, spec, v) -> WorkloadState:
        path = v.uri[len("file://"):] if v.uri.startswith("file://") else v.uri
        if not Path(path).is_dir():
            return WorkloadState(failed=True, message=f"model directory {path} does not exist "
                                 "(local runs take a path or file:// URI)")
        return self._ensure(v.embedder_name, lambda port: embedder_args(
            path, port=port, max_batch=spec.ingest.batch_size,
            extra=("--threads", str(self.threads), *spec.embedder.args)),
            "/v2/models/embedder/ready")

    def ensure_ingest(self, spec, v, embedder_url: str) -> WorkloadState:
        return self._ensure(v.ingest_name, lambda port: [*ingest_args(spec, v, embedder_url, metrics_port=port),
                                                         *self.ingest_extra], "/metrics")

    def delete_version(self, spec, v) -> bool:
        for name in (v.ingest_name, v.embedder_name):
            have = self.procs.pop(name, None)
            if have is not None:
                have[0].stop()
        return True

    def read_config_map(self, name: str, key: str) -> str:
        data = self.config_maps.get(name)
        if data is None:
            raise LookupError(f"ConfigMap {name} not found")
        if key not in data:
            raise LookupError(f"ConfigMap {name} has no key {key!r} (keys: {sorted(data)})")
        return data[key]

    def close(self) -> None:
        for svc, _ in reversed(list(self.procs.values())):
            svc.stop()
        self.procs.clear()


class LocalRollout:
    """An in-memory SearchIndex reconciled by the operator's own rollout logic."""

    def __init__(self, spec: dict, workloads: Workloads, *, name: str = "demo", namespace: str = "local",
                 status: dict | None = None, store=None, printer=print, trust=None):
        """``trust``: what the object may use (:class:`vsearch.operators.trust.Trust`); by default
        Milvus on this machine, no Secrets, and catalog images read nowhere locally."""
        self.name, self.namespace, self.printer = name, namespace, printer
        self.body = {"apiVersion": "vsearch.io/v1alpha1", "kind": "SearchIndex",
                     "metadata": {"name": name, "namespace": namespace, "generation": 1, "annotations": {}},
                     "spec": copy.deepcopy(spec), "status": copy.deepcopy(status or {})}
        trust = trust or Trust(milvus_hosts=("127.0.0.1", "localhost"))
        ispec = IndexSpec.from_dict(spec, namespace=namespace, index=name)
        clients: dict[str, EmbedderClient] = {}
        roots = tuple(Path(r) for r in trust.catalog_file_roots)
        self.env = Env(workloads=workloads,
                       store=store or MilvusStore(ispec.milvus_uri, timeout=30, index=ispec.index_config()),
                       groups=KafkaGroups(ispec.bootstrap),
                       embedder=lambda url: clients.get(url) or clients.setdefault(url, EmbedderClient(url, timeout=60)),
                       fetcher=Fetcher(FetchConfig(schemes=("file", "http", "https") if roots else ("http", "https"),
                                                   file_roots=roots, allow_networks=trust.fetch_allow_networks)),
                       query_fetcher=Fetcher(FetchConfig(schemes=("http", "https"), file_roots=(),
                                                         allow_networks=trust.fetch_allow_networks)),
                       trust=trust, events=TopicEvents())
        self.events = self.env.events

    @property
    def status(self) -> dict:
        return self.body["status"]

    def set_model(self, name: str, version: str, uri: str) -> None:
        self.body["spec"]["model"] = {"name": name, "version": version, "uri": uri}
        self.body["metadata"]["generation"] += 1

    def annotate(self, key: str, value: str) -> None:
        self.body["metadata"]["annotations"][key] = value

    def step(self):
        out = reconcile(self.name, self.namespace, self.body, self.env)
        self.body["status"] = out.status
        for _kind, reason, message in out.events:
            self.printer(f"  [{reason}] {message}")
            self._said = message
        return out

    _said: str | None = None          # the last message printed (a phase's event says it once)

    def close(self) -> None:
        """Close the Kafka clients: before the broker stops, or they log the refused reconnects."""
        self.env.groups.close()
        self.events.close()

    def run_until(self, done, timeout: float, poll: float = 0.5, on_tick=None):
        """Step until ``done(status)``; returns the last outcome (TimeoutError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        last_msg = None
        while True:
            out = self.step()
            if done(out.status):
                return out
            msg = out.status.get("message")
            if on_tick is not None:
                on_tick(out)
            elif msg not in (last_msg, self._said) and out.phase in ("Backfilling", "Experimenting"):
                self.printer(f"    {msg}")
            last_msg = msg
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout not done after {timeout:.0f}s: {out.status.get('phase')}: "
                                   f"{out.status.get('message')}")
            time.sleep(poll if out.requeue > 0 or out.error else 0.05)
