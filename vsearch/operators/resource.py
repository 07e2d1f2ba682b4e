"""The ``SearchIndex`` resource's ``spec`` and ``status`` as pydantic models, field for field the
CRD's schema (``searchindex.yaml``): snake_case attributes, the CRD's camelCase names as aliases
(``alias_generator=to_camel``), so no code maps names by hand. A test
(``tests/operators/test_crd.py``) walks the schema and the models together: every property has a
field and every field a property, at every depth; a field is required exactly where the schema
requires it or has a default; extra fields follow the schema's pruning.

Defaults: the CRD is their one home. The spec's models have none of their own: a field the schema
defaults is *required* here, and objects are defaulted by the schema first
(:func:`vsearch.operators.crd.apply_defaults`, as the API server stores them), so a default the
models and the schema disagree on cannot exist. A field the schema neither requires nor defaults
is ``None`` when absent.

Extra fields: the spec's schema is structural, so the API server prunes what it does not declare;
:class:`SpecModel` ignores them the same way (``extra="ignore"``). The status' schema keeps
unknown fields at every level (``x-kubernetes-preserve-unknown-fields``: kopf keeps its own state
there, an older operator may have written others), and :class:`StatusModel` keeps them too
(``extra="allow"``), so a status read and written back is unchanged.

:meth:`Status.read` and :meth:`Status.dump` are the status' boundary: the object's status (a
dict, camelCase) in, the same JSON out, with only the fields that were set (a field set to
``None`` stays, as ``null``: the patch removes it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class SpecModel(BaseModel):
    """A node of the spec: frozen, camelCase aliases, undeclared fields ignored (pruned)."""
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True,
                              coerce_numbers_to_str=True)


class StatusModel(BaseModel):
    """A node of the status: camelCase aliases, undeclared fields kept."""
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    def dump(self) -> dict:
        """As the object holds it: camelCase JSON, the fields that were set only (``None`` too)."""
        return self.model_dump(by_alias=True, exclude_unset=True)     # values as they are (kopf writes the JSON)


# --- spec -------------------------------------------------------------------------------------

class Catalog(SpecModel):
    bootstrap: str
    topic: str


class SecretKeyRef(SpecModel):
    name: str
    key: str


class IndexSettings(SpecModel):
    type: str
    metric: str
    params: dict[str, Any] | None = None
    search_params: dict[str, Any] | None = None


class Milvus(SpecModel):
    uri: str
    token_secret_ref: SecretKeyRef | None = None
    alias: str | None = None
    index: IndexSettings


class Model(SpecModel):
    name: str
    version: str
    uri: str


class LocalObjectRef(SpecModel):
    name: str


class WorkloadSettings(SpecModel):
    """``spec.embedder`` and ``spec.search`` (one schema in the CRD)."""
    image: str
    replicas: int
    resources: dict[str, Any] | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    affinity: dict[str, Any] | None = None
    service_account_name: str | None = None
    image_pull_secrets: list[LocalObjectRef] | None = None
    runtime_class_name: str | None = None
    env: list[dict[str, Any]] | None = None
    args: list[str] | None = None


class IngestSettings(WorkloadSettings):
    """``spec.ingest``: a workload with a batch size."""
    batch_size: int


class Backfill(SpecModel):
    idle_seconds: float
    timeout_seconds: int
    count_tolerance: int


class ConfigMapKeyRef(SpecModel):
    name: str
    key: str


class Golden(SpecModel):
    config_map_ref: ConfigMapKeyRef | None = None
    uri: str | None = None
    margin: float


class GateSettings(SpecModel):
    sample_size: int
    min_self_score: float
    min_self_consistency: float
    require_offline_verdict: bool
    golden: Golden | None = None


class Guardrails(SpecModel):
    max_error_ratio: float
    max_p99_ratio: float


class ExperimentSettings(SpecModel):
    """``spec.rollout.experiment``: the online experiment of the ``Experimenting`` phase."""
    enabled: bool
    design: str
    share: float
    alpha: float
    margin: float
    promote_when: str
    min_units: int
    max_duration_seconds: int
    on_timeout: str
    events_topic: str
    guardrails: Guardrails


class Rollout(SpecModel):
    require_approval: bool
    retention_seconds: int
    max_retries: int
    deploy_timeout_seconds: int
    backfill: Backfill
    gate: GateSettings
    experiment: ExperimentSettings


class Recipe(SpecModel):
    """``spec.training.recipe``: the flags of ``vsearch train``."""
    max_steps: int
    batch_size: int
    lr: float | None = None
    simclr_ratio: float | None = None
    holdout: float | None = None
    args: list[str] | None = None


class RuntimeRef(SpecModel):
    name: str
    kind: str


class TrainingSettings(SpecModel):
    """``spec.training``: the learning loop (:mod:`vsearch.operators.training`)."""
    enabled: bool
    schedule: str | None = None
    min_new_clicks: int | None = None
    events_topic: str
    model_uri: str | None = None
    model_name: str | None = None
    recipe: Recipe
    image: str
    nodes: int
    nproc_per_node: int
    backend: str
    runtime_ref: RuntimeRef
    timeout_seconds: int
    max_restarts: int
    history: int
    resources: dict[str, Any] | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    service_account_name: str | None = None
    image_pull_secrets: list[LocalObjectRef] | None = None
    env: list[dict[str, Any]] | None = None


class Spec(SpecModel):
    """``spec`` of a SearchIndex, as the API server stores it (defaulted, pruned)."""
    catalog: Catalog
    milvus: Milvus
    model: Model
    embedder: WorkloadSettings
    ingest: IngestSettings
    search: WorkloadSettings
    training: TrainingSettings
    rollout: Rollout


# --- status -----------------------------------------------------------------------------------

class Progress(StatusModel):
    """The candidate's backfill: items, the serving count, rate, ETA, the group's committed offsets."""
    indexed: int | None = None
    serving_count: int | None = None
    offsets: dict[str, int] | None = None      # {"topic/partition": committed offset}
    offsets_changed_at: str | None = None
    checked_at: str | None = None
    rate_per_second: float | None = None
    eta_seconds: float | None = None
    idle_seconds: float | None = None
    parity: bool | None = None


class VersionStatus(StatusModel):
    """One model version in the status (``serving``, ``previous``, ``retired[]``, ``candidate``):
    what :class:`vsearch.operators.spec.VersionRef` is read from, and what the rollout recorded."""
    model: str
    version: str
    model_uri: str | None = None
    collection: str
    consumer_group: str
    embedder_url: str | None = None
    dim: int | None = None
    since: str | None = None               # serving: since when
    retain_until: str | None = None        # previous: kept until
    started_at: str | None = None          # candidate: the rollout's start
    backfill_started_at: str | None = None
    attempts: int | None = None            # candidate: failed attempts of the current step
    last_error: str | None = None
    golden_checked: bool | None = None
    progress: Progress | None = None


class TargetStatus(StatusModel):
    """A rollout target that failed (``failed``) or was rolled back (``rolledBack``): not retried
    while the spec names it (``key``: :attr:`vsearch.operators.spec.ModelRef.key`)."""
    key: str | None = None
    version: str | None = None
    reason: str | None = None
    message: str | None = None
    at: str | None = None


class HistoryEntry(StatusModel):
    action: str | None = None             # switch | rollback
    from_: str | None = Field(default=None, alias="from")
    to: str | None = None
    at: str | None = None


class ExperimentStatus(StatusModel):
    """``status.experiment``: the online experiment of the candidate (:mod:`vsearch.operators.rollout`'s
    ``Experimenting``); the analysis' figures (``arms``, ``interleave``, ``effect``, ``guardrails``)
    as :func:`vsearch.core.experiment_stats.analyze` returns them."""
    id: str | None = None
    design: str | None = None
    share: float | None = None
    salt: str | None = None
    candidate: str | None = None
    serving: str | None = None
    serving_collection: str | None = None
    candidate_collection: str | None = None
    started: int | None = None             # epoch ms (the property's)
    started_at: str | None = None
    property_written: bool | None = None
    skipped: str | None = None
    looks: int | None = None
    looked_at: str | None = None
    events: int | None = None
    decision: str | None = None
    reason: str | None = None
    method: str | None = None
    timed_out: bool | None = None
    decided_at: str | None = None
    ended_at: str | None = None
    arms: dict[str, Any] | None = None
    interleave: dict[str, Any] | None = None
    effect: dict[str, Any] | None = None
    guardrails: dict[str, Any] | None = None


class TrainingStatus(StatusModel):
    """``status.training``: the learning loop's state (:mod:`vsearch.operators.training`)."""
    state: str | None = None
    message: str | None = None
    checked_at: str | None = None
    new_clicks: int | None = None
    next_schedule_at: str | None = None
    backend: str | None = None
    current: dict[str, Any] | None = None
    target: dict[str, Any] | None = None
    runs: list[dict[str, Any]] | None = None


class Condition(StatusModel):
    type: str
    status: str
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = None
    observed_generation: int | None = None


class Status(StatusModel):
    """``status`` of a SearchIndex: all of the rollout's state (:mod:`vsearch.operators.rollout`)."""
    phase: str | None = None
    reason: str | None = None
    message: str | None = None
    phase_since: str | None = None
    observed_generation: int | None = None
    serving: VersionStatus | None = None
    candidate: VersionStatus | None = None
    previous: VersionStatus | None = None
    retired: list[VersionStatus] | None = None
    gate: dict[str, Any] | None = None     # the quality gate's figures (vsearch.operators.gate.run_gate)
    experiment: ExperimentStatus | None = None
    training: TrainingStatus | None = None
    failed: TargetStatus | None = None
    rolled_back: TargetStatus | None = None
    rollback_token: str | None = None
    history: list[HistoryEntry] | None = None
    conditions: list[Condition] | None = None

    @classmethod
    def read(cls, status: dict | None) -> "Status":
        """The object's status (camelCase JSON; ``None`` for none yet), validated."""
        return cls.model_validate(status or {})
