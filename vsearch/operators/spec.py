"""The operator's view of a ``SearchIndex`` spec. Its defaults and field names have one home, the
CRD's schema: an object is defaulted by it (:func:`vsearch.operators.crd.apply_defaults`, as the
API server does), then read as :class:`vsearch.operators.resource.Spec` (the schema's fields,
camelCase aliases) and mapped here to what the steps use; the dataclasses' own defaults equal the
schema's (a test checks it)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

from ..core.naming import collection_name, sanitise
from ..core.store import IndexConfig
from .crd import apply_defaults
from .cron import Cron, CronError
from .resource import IngestSettings, Spec, TrainingSettings, VersionStatus, WorkloadSettings

APPROVE_ANNOTATION = "vsearch.io/approve"        # = the candidate version: approves its switch
ROLLBACK_ANNOTATION = "vsearch.io/rollback"      # any new value: move the alias back to the previous version
LABEL_INDEX = "vsearch.io/searchindex"
LABEL_VERSION = "vsearch.io/model-version"
LABEL_COMPONENT = "vsearch.io/component"


@dataclasses.dataclass(frozen=True)
class Workload:
    image: str = "vsearch:latest"
    replicas: int = 1
    resources: dict = dataclasses.field(default_factory=dict)
    node_selector: dict = dataclasses.field(default_factory=dict)
    tolerations: list = dataclasses.field(default_factory=list)
    env: list = dataclasses.field(default_factory=list)
    args: list = dataclasses.field(default_factory=list)
    batch_size: int = 256
    affinity: dict = dataclasses.field(default_factory=dict)
    service_account: str | None = None
    image_pull_secrets: list = dataclasses.field(default_factory=list)    # [{"name": ...}]
    runtime_class: str | None = None

    @classmethod
    def from_model(cls, w: WorkloadSettings) -> "Workload":
        """From a defaulted workload (``spec.embedder``, ``spec.ingest``, ``spec.search``)."""
        return cls(image=w.image, replicas=w.replicas, resources=dict(w.resources or {}),
                   node_selector=dict(w.node_selector or {}), tolerations=list(w.tolerations or []),
                   env=list(w.env or []), args=list(w.args or []),
                   batch_size=w.batch_size if isinstance(w, IngestSettings) else cls.batch_size,
                   affinity=dict(w.affinity or {}), service_account=w.service_account_name or None,
                   image_pull_secrets=[{"name": s.name} for s in w.image_pull_secrets or []],
                   runtime_class=w.runtime_class_name or None)


@dataclasses.dataclass(frozen=True)
class Golden:
    config_map: str | None = None
    config_map_key: str = "judgments.csv"
    uri: str | None = None
    margin: float = 0.02


@dataclasses.dataclass(frozen=True)
class Gate:
    sample_size: int = 50
    min_self_score: float = 0.99
    min_self_consistency: float = 1.0
    golden: Golden | None = None
    require_offline_verdict: bool = True


@dataclasses.dataclass(frozen=True)
class Experiment:
    """``spec.rollout.experiment``: the ``Experimenting`` phase (off by default)."""
    enabled: bool = False
    design: str = "ab"                  # ab | interleave
    share: float = 0.1
    alpha: float = 0.05
    margin: float = 0.0
    promote_when: str = "notWorse"      # notWorse | better
    min_units: int = 200
    max_duration_s: int = 86400
    on_timeout: str = "abort"           # abort | promote
    events_topic: str = "search.events"
    max_error_ratio: float = 2.0
    max_p99_ratio: float = 1.5


@dataclasses.dataclass(frozen=True)
class Policy:
    require_approval: bool = False
    retention_s: int = 86400
    max_retries: int = 5
    deploy_timeout_s: int = 1800
    idle_s: float = 30.0
    backfill_timeout_s: int = 86400
    count_tolerance: int = 0
    gate: Gate = Gate()
    experiment: Experiment = Experiment()


@dataclasses.dataclass(frozen=True)
class Training:
    """``spec.training``: the learning loop (off by default; :mod:`vsearch.operators.training`)."""
    enabled: bool = False
    schedule: Cron | None = None
    min_new_clicks: int | None = None
    events_topic: str = "search.events"
    model_uri: str = ""                  # a template: {version}, {index}, {namespace}, {model}
    model_name: str | None = None
    max_steps: int = 500
    batch_size: int = 64
    lr: float | None = None
    simclr_ratio: float | None = None
    holdout: float | None = None
    args: tuple = ()
    image: str = "vsearch:latest"
    nodes: int = 1
    nproc_per_node: int = 1
    backend: str = "auto"                # auto | TrainJob | Job
    runtime_name: str = "vsearch-torch"
    runtime_kind: str = "TrainingRuntime"
    timeout_s: int = 86400
    max_restarts: int = 0
    history: int = 10
    resources: dict = dataclasses.field(default_factory=dict)
    node_selector: dict = dataclasses.field(default_factory=dict)
    tolerations: list = dataclasses.field(default_factory=list)
    service_account: str | None = None
    image_pull_secrets: list = dataclasses.field(default_factory=list)    # [{"name": ...}]
    env: list = dataclasses.field(default_factory=list)

    @classmethod
    def from_model(cls, t: TrainingSettings, now: float | None = None) -> "Training":
        """From a defaulted ``spec.training``; a ``ValueError`` worded as the API server's for what
        the schema cannot say (a schedule that is no cron expression, a trigger missing)."""
        schedule = None
        if t.schedule:
            try:
                schedule = Cron.parse(t.schedule)
                schedule.next_after(0 if now is None else now)
            except CronError as exc:
                raise ValueError(f"spec.training.schedule: Invalid value: {t.schedule!r}: {exc}") from None
        if t.enabled and not t.model_uri:
            raise ValueError("spec.training.modelUri: Required value: enabled training needs where its models go")
        if t.enabled and schedule is None and t.min_new_clicks is None:
            raise ValueError("spec.training: Invalid value: enabled training needs a trigger: schedule and/or "
                             "minNewClicks")
        r = t.recipe
        return cls(enabled=t.enabled, schedule=schedule, min_new_clicks=t.min_new_clicks,
                   events_topic=t.events_topic, model_uri=t.model_uri or "", model_name=t.model_name,
                   max_steps=r.max_steps, batch_size=r.batch_size, lr=r.lr, simclr_ratio=r.simclr_ratio,
                   holdout=r.holdout, args=tuple(r.args or ()), image=t.image, nodes=t.nodes,
                   nproc_per_node=t.nproc_per_node, backend=t.backend, runtime_name=t.runtime_ref.name,
                   runtime_kind=t.runtime_ref.kind, timeout_s=t.timeout_seconds, max_restarts=t.max_restarts,
                   history=t.history, resources=dict(t.resources or {}), node_selector=dict(t.node_selector or {}),
                   tolerations=list(t.tolerations or []), service_account=t.service_account_name or None,
                   image_pull_secrets=[{"name": s.name} for s in t.image_pull_secrets or []], env=list(t.env or []))

    def uri_of(self, namespace: str, index: str, model: str, version: str) -> str:
        """``modelUri`` for one trained version."""
        return self.model_uri.format_map({"version": version, "index": index, "namespace": namespace,
                                          "model": model})


@dataclasses.dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    uri: str

    @property
    def key(self) -> str:
        """What identifies a rollout target: a new version or a new URI is a new rollout."""
        return f"{self.name}:{self.version}@{self.uri}"


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    bootstrap: str
    topic: str
    milvus_uri: str
    token_secret: tuple[str, str] | None
    alias: str
    index_type: str
    metric: str
    index_params: dict
    search_params: dict
    model: ModelRef
    embedder: Workload
    ingest: Workload
    search: Workload
    policy: Policy
    training: Training = Training()

    @classmethod
    def from_dict(cls, spec: dict, *, namespace: str = "", index: str = "") -> "IndexSpec":
        """The typed spec of SearchIndex ``namespace/index`` (whose names derive the default alias),
        defaulted by the CRD's schema first, then read as :class:`vsearch.operators.resource.Spec`
        (``pydantic.ValidationError``, a ``ValueError``, when it does not fit): no default and no
        field name is written here."""
        return cls.from_model(Spec.model_validate(apply_defaults({"spec": spec})["spec"]),
                              namespace=namespace, index=index)

    @classmethod
    def from_model(cls, spec: Spec, *, namespace: str = "", index: str = "") -> "IndexSpec":
        mil, idx, ro = spec.milvus, spec.milvus.index, spec.rollout
        bf, g, tok = ro.backfill, ro.gate, spec.milvus.token_secret_ref
        gd = g.golden
        golden = None
        if gd and (gd.config_map_ref or gd.uri):
            cm = gd.config_map_ref
            golden = Golden(config_map=cm.name if cm else None, config_map_key=cm.key if cm else Golden.config_map_key,
                            uri=gd.uri, margin=float(gd.margin))
        gate = Gate(sample_size=g.sample_size, min_self_score=float(g.min_self_score),
                    min_self_consistency=float(g.min_self_consistency), golden=golden,
                    require_offline_verdict=g.require_offline_verdict)
        x = ro.experiment
        experiment = Experiment(enabled=x.enabled, design=x.design, share=float(x.share), alpha=float(x.alpha),
                                margin=float(x.margin), promote_when=x.promote_when, min_units=x.min_units,
                                max_duration_s=x.max_duration_seconds, on_timeout=x.on_timeout,
                                events_topic=x.events_topic, max_error_ratio=float(x.guardrails.max_error_ratio),
                                max_p99_ratio=float(x.guardrails.max_p99_ratio))
        policy = Policy(require_approval=ro.require_approval, retention_s=ro.retention_seconds,
                        max_retries=ro.max_retries, deploy_timeout_s=ro.deploy_timeout_seconds,
                        idle_s=float(bf.idle_seconds), backfill_timeout_s=bf.timeout_seconds,
                        count_tolerance=bf.count_tolerance, gate=gate, experiment=experiment)
        return cls(bootstrap=spec.catalog.bootstrap, topic=spec.catalog.topic,
                   milvus_uri=mil.uri, token_secret=(tok.name, tok.key) if tok else None,
                   alias=mil.alias or default_alias(namespace, index), index_type=idx.type,
                   metric=idx.metric, index_params=dict(idx.params or {}),
                   search_params=dict(idx.search_params or {}),
                   model=ModelRef(spec.model.name, spec.model.version, spec.model.uri),
                   embedder=Workload.from_model(spec.embedder), ingest=Workload.from_model(spec.ingest),
                   search=Workload.from_model(spec.search), policy=policy,
                   training=Training.from_model(spec.training))

    def index_config(self):
        return IndexConfig(self.index_type, self.metric, self.index_params, self.search_params)


def tuple_key(*parts: str) -> str:
    """An injective encoding of ``parts`` (each as ``<length>:<text>``): ``("a-b", "c")`` and
    ``("a", "b-c")`` differ, ``("1.0",)`` and ``("1-0",)`` too. The chart's helpers build the same."""
    return "".join(f"{len(p)}:{p}" for p in parts)


def name_hash(*parts: str, n: int = 8) -> str:
    """``n`` hex digits of the sha256 of :func:`tuple_key` of ``parts``: the suffix that keeps
    every derived name unique per tuple whatever its readable part became."""
    return hashlib.sha256(tuple_key(*parts).encode()).hexdigest()[:n]


def dns_name(*parts: str, limit: int = 63, suffix: str = "") -> str:
    """A DNS-1123 label from ``parts`` (lower case, dashes), then ``-<suffix>``; the readable part
    is shortened (with a hash of ``parts``) when the whole would be longer than ``limit``."""
    raw = "-".join(p for p in parts if p)
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    name = re.sub(r"-+", "-", name)
    room = limit - (len(suffix) + 1 if suffix else 0)
    if len(name) > room:
        digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
        name = name[:room - 9].rstrip("-") + "-" + digest
    name = name or "x"
    return f"{name}-{suffix}" if suffix else name


def default_alias(namespace: str, index: str) -> str:
    """The alias of a SearchIndex that names none: ``vs_<namespace>_<index>_<hash>``, one per
    (namespace, index), so indexes sharing a Milvus never share the global ``images``."""
    readable = f"{sanitise(namespace)}_{sanitise(index)}"[:200]
    return f"vs_{readable}_{name_hash('alias', namespace, index, n=10)}"


def collection_of(namespace: str, index: str, model: str, version: str) -> str:
    """``images__<model>__<version>__<hash>``: readable, and unique per (namespace, index, model,
    version) through the hash of the tuple (``1.0`` and ``1-0`` read alike, hash apart)."""
    return f"{collection_name(model, version)[:180]}__{name_hash(namespace, index, model, version, n=10)}"


def owner_of(namespace: str, index: str) -> str:
    """How a collection's model record names the SearchIndex that owns it."""
    return f"{namespace}/{index}"


@dataclasses.dataclass(frozen=True)
class VersionRef:
    """One model version of one SearchIndex: what the workload layer creates for it."""
    index: str                  # the SearchIndex's name
    namespace: str
    model: str
    version: str
    uri: str
    collection: str
    group: str                  # the ingest consumer group (one per version)

    @classmethod
    def of(cls, index: str, namespace: str, model: ModelRef) -> "VersionRef":
        coll = collection_of(namespace, index, model.name, model.version)
        return cls(index=index, namespace=namespace, model=model.name, version=model.version, uri=model.uri,
                   collection=coll, group=f"vsearch-ingest-{coll}")

    @property
    def _suffix(self) -> str:
        return name_hash(self.index, self.model, self.version)

    @property
    def embedder_name(self) -> str:
        """``<index>-<model>-<version>-<hash>-embedder`` (at most 45: KServe adds ``-predictor...``)."""
        return dns_name(self.index, self.model, self.version, limit=45, suffix=f"{self._suffix}-embedder")

    @property
    def ingest_name(self) -> str:
        return dns_name(self.index, self.model, self.version, suffix=f"{self._suffix}-ingest")

    @property
    def owner(self) -> str:
        return owner_of(self.namespace, self.index)

    def to_status(self) -> dict[str, Any]:
        """Its entry in the status (:class:`vsearch.operators.resource.VersionStatus`, camelCase)."""
        return VersionStatus(model=self.model, version=self.version, model_uri=self.uri,
                             collection=self.collection, consumer_group=self.group).dump()

    @classmethod
    def from_status(cls, index: str, namespace: str, d: dict | VersionStatus) -> "VersionRef":
        v = d if isinstance(d, VersionStatus) else VersionStatus.model_validate(d)
        return cls(index=index, namespace=namespace, model=v.model, version=v.version, uri=v.model_uri or "",
                   collection=v.collection, group=v.consumer_group)

    @property
    def key(self) -> str:
        return ModelRef(self.model, self.version, self.uri).key
