"""The rollout state machine of a ``SearchIndex``: blue-green reindex, quality gate, one alias
switch, rollback and retention. One code path for the cluster (kopf, :mod:`vsearch.operators.handlers`)
and local runs (``vsearch demo --rollout``): only the :class:`~vsearch.operators.workloads.Workloads`
differ.

:func:`reconcile` is a pure, idempotent step: it reads the object (spec, annotations,
generation) and its status (all state lives there), looks at the actual state (workloads,
Milvus, the consumer group's committed offsets), does at most one phase's work and returns the
new status, the Kubernetes Events to post and when to look again. A process killed at any
point resumes from the persisted phase: every step re-checks what is already done (a created
object is found, an alias already switched is not switched again, the previous version is
taken from the status, never from what the alias said), so nothing is duplicated and no switch
is half done.

Phases::

    Pending -> Deploying -> Backfilling -> Verifying -> [Experimenting] -> [AwaitingApproval] -> Switching -> Ready
                   \\____________\\______________\\_______________\\_______________/ -> Failed (serving untouched)
    Ready -> RollingBack -> Ready        (alias back to the retained previous version)

- Deploying: the golden set is read and checked first (no local files); then the candidate's
  embedder (InferenceService); once it answers, the collection
  ``images__<model>__<version>__<hash>`` (:func:`vsearch.operators.spec.collection_of`) is created with
  the configured index and the model record (model, version, embedder endpoint, the owning
  ``searchindex``), and the ingest consumer (own group) is started.
- Backfilling: the consumer replays the compacted catalog topic from offset 0 and keeps following
  it. Complete when the candidate's count equals the serving collection's (within
  ``countTolerance``) AND the group's committed offsets have not moved for ``idleSeconds``. No
  broker end offsets or lag are used (brokers report them differently; Tansu wrongly).
- Verifying: the quality gate (:mod:`vsearch.operators.gate`); figures into ``status.gate``.
- Experimenting (``rollout.experiment.enabled``, and a version serves: a first rollout skips it,
  saying so in ``status.experiment.skipped``): an online experiment between the serving version
  and the candidate, both live. Its id and salt are persisted in ``status.experiment`` first; the
  next step writes them as the property ``vsearch.experiment`` of the serving collection
  (:mod:`vsearch.core.experiment`), which the search services read with the alias (so a restarted
  operator re-writes the same experiment). Each look re-reads the search events from the topic's
  beginning and analyses them (:func:`vsearch.core.experiment_stats.analyze`, exactly once by
  construction: :mod:`vsearch.operators.experiments`); the figures go into ``status.experiment``.
  A decision (or ``maxDurationSeconds``, then ``onTimeout``) is persisted first; the next step
  clears the property (``""``) and goes on: promote -> AwaitingApproval / Switching, abort ->
  Failed ``ExperimentLost`` with the figures, serving untouched.
- AwaitingApproval (``rollout.requireApproval``): until annotation ``vsearch.io/approve`` equals
  the candidate version.
- Switching: one ``alter_alias`` call; serving -> previous (kept ``retentionSeconds``).
- Ready: serving; a changed ``spec.model`` starts the next rollout; the previous version is
  deleted (embedder, ingest, collection, consumer group) when its retention ends.
- RollingBack: annotation ``vsearch.io/rollback`` (a new value), or ``spec.model`` set back to
  the previous version: the alias moves back to the retained previous collection.
- Failed: the reason in ``status.reason``/``message``; the candidate is cleaned up; the target
  that failed is not retried until the spec names another one (terminal, never re-queued).

Before any of it: the object is validated against the CRD's schema (unknown fields pruned, as
the API server does) and against what the operator's configuration grants
(:mod:`vsearch.operators.trust`): ``InvalidSpec`` / ``NotAllowed``, nothing read, connected or created.

Ownership (several SearchIndexes may share a Milvus): every collection records the index that
created it; a collection, or the collection an alias names, that another index owns is never
adopted (``CollectionTaken``), switched away from (``AliasTaken``) or dropped. A collection
without an owner is this index's only when its status names it (the demo adopts the version it
already serves that way).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import io
import logging
import time
from typing import TYPE_CHECKING, Callable, Protocol

from PIL import Image
from pydantic import ValidationError

from ..core.experiment import EXPERIMENT_KEY, Experiment, new_experiment
from ..core.experiment_stats import analyze
from ..trainer.metrics import parse_judgments
from . import failpoints
from .crd import InvalidSearchIndex, prune, validate
from .experiments import OWN, stats_policy, summary
from .gate import GoldenSetError, VersionPath, check_golden_queries, run_gate
from .resource import Status
from .spec import APPROVE_ANNOTATION, ROLLBACK_ANNOTATION, IndexSpec, VersionRef, owner_of
from .training import Loop, Run, desired_model
from .trust import Trust

if TYPE_CHECKING:
    from ..core.store import MilvusStore
    from .kafka_groups import KafkaGroups
    from .workloads import Workloads

log = logging.getLogger(__name__)

PENDING, DEPLOYING, BACKFILLING, VERIFYING = "Pending", "Deploying", "Backfilling", "Verifying"
EXPERIMENTING = "Experimenting"
AWAITING, SWITCHING, READY, FAILED, ROLLING_BACK = "AwaitingApproval", "Switching", "Ready", "Failed", "RollingBack"
PHASES = (PENDING, DEPLOYING, BACKFILLING, VERIFYING, EXPERIMENTING, AWAITING, SWITCHING, READY, FAILED, ROLLING_BACK)
ROLLOUT_PHASES = (DEPLOYING, BACKFILLING, VERIFYING, EXPERIMENTING, AWAITING, SWITCHING)
DECISIONS = ("promote", "abort")
HISTORY = 10
REFUSED = ("InvalidSpec", "InvalidStatus")     # reasons an object is refused for (Degraded)
FAST, WAIT, SLOW = 0.0, 2.0, 10.0      # seconds until the next look


class Fetches(Protocol):
    """What the gate reads images with (:class:`vsearch.core.fetch.Fetcher`)."""

    def fetch(self, uri: str) -> bytes: ...


class ReadsEvents(Protocol):
    """The search events of a topic, every one from its beginning, decoded
    (:class:`vsearch.operators.experiments.TopicEvents`)."""

    def read(self, bootstrap: str, topic: str) -> list: ...


class Embeds(Protocol):
    """An embedder client (:class:`vsearch.predictor.client.EmbedderClient`)."""

    dim: int

    def embed_bytes(self, images: list[bytes]): ...

    def model_info(self) -> dict | None: ...


@dataclasses.dataclass
class Env:
    """What a reconcile step acts on: the workload layer, the spec's Milvus (``store``; None when
    the object was refused before connecting), its Kafka consumer groups, embedder clients by
    URL, the fetchers of catalog images (``fetcher``) and of golden-set URLs (``query_fetcher``,
    ``http(s)://`` only), what the operator's configuration grants (``trust``) and the reader of
    the search events an experiment is analysed from (``events``)."""
    workloads: "Workloads"
    store: "MilvusStore | None"
    groups: "KafkaGroups | None"
    embedder: Callable[[str], Embeds]
    fetcher: Fetches
    query_fetcher: Fetches
    trust: Trust = dataclasses.field(default_factory=Trust)
    now: Callable[[], float] = time.time
    events: ReadsEvents | None = None
    models: Callable[[str], dict] | None = None     # model URI -> its vsearch_model.json (the learning loop)


@dataclasses.dataclass
class Outcome:
    status: dict
    events: list = dataclasses.field(default_factory=list)     # (type, reason, message)
    requeue: float = WAIT
    error: str | None = None        # a transient failure: retry with backoff

    @property
    def phase(self) -> str:
        return self.status.get("phase", PENDING)


class StepError(RuntimeError):
    """A step failed in a way that retrying may fix (counted against ``maxRetries``)."""


class Fail(Exception):
    """The rollout cannot go on: Failed with this reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc).timestamp()


class Step:
    """One reconcile pass over one object."""

    def __init__(self, name: str, namespace: str, body: dict, env: Env):
        self.name, self.namespace, self.env = name, namespace, env
        self.body = body
        self.meta = body.get("metadata") or {}
        self.annotations = self.meta.get("annotations") or {}
        self.events: list = []
        self.status_error: str | None = None
        try:        # validated at the boundary (resource.Status); the steps edit its JSON
            self.status = Status.read(copy.deepcopy(body.get("status"))).dump()
        except ValidationError as exc:
            self.status = copy.deepcopy(body.get("status") or {})
            self.status_error = _brief_errors(exc)
        self.now = env.now()

    # -- helpers
    def ref(self, d: dict | None) -> VersionRef | None:
        return VersionRef.from_status(self.name, self.namespace, d) if d else None

    def event(self, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))
        (log.warning if kind == "Warning" else log.info)("%s/%s %s: %s", self.namespace, self.name, reason, message)

    def go(self, phase: str, message: str, *, kind: str = "Normal", reason: str | None = None) -> None:
        before = self.status.get("phase")
        self.status["phase"] = phase
        self.status["reason"] = reason or phase
        self.status["message"] = message
        self.status["phaseSince"] = iso(self.now)
        if self.status.get("candidate"):
            self.status["candidate"]["attempts"] = 0
        if before != phase:
            self.event(kind, reason or phase, message)

    def note(self, message: str) -> None:
        self.status["message"] = message

    def known(self) -> set[str]:
        """Collections this object's status names as its own."""
        s = self.status
        return {v["collection"] for v in [s.get("candidate"), s.get("serving"), s.get("previous"),
                                          *(s.get("retired") or [])] if v and v.get("collection")}

    def owner_of(self, collection: str) -> str | None:
        """The index that owns ``collection`` by its model record: ``"ns/name"``, this index's own
        name for an unowned collection its status names, ``""`` for any other unowned one, None
        when it does not exist."""
        store = self.env.store
        if not store.has_collection(collection):
            return None
        owner = (store.model_record(collection) or {}).get("searchindex") or ""
        if not owner and collection in self.known():
            return self.owner
        return owner

    def check_alias(self) -> None:
        """The alias names nothing, or a collection this index owns: else ``AliasTaken``."""
        target = self.env.store.describe_alias(self.spec.alias)
        if target and self.owner_of(target) not in (self.owner, None):
            raise Fail("AliasTaken", f"alias {self.spec.alias} names {target}, which SearchIndex "
                                     f"{self.owner_of(target) or '(none: not made by the operator)'} owns; "
                                     "set spec.milvus.alias to one of this index's own")

    # -- the pass
    def refuse(self, reason: str, message: str) -> Outcome:
        """Neither act nor touch anything: the object is invalid or asks for what is not granted."""
        if self.status.get("reason") != reason or self.status.get("message") != message:
            self.status.update(phase=self.status.get("phase") if self.status.get("serving") else FAILED)
            self.status["reason"], self.status["message"] = reason, message
            self.event("Warning", reason, message)
        return self.finish(SLOW)

    def run(self) -> Outcome:
        if self.status_error:
            return self.refuse("InvalidStatus", f"status does not match the CRD's schema: {self.status_error}")
        try:
            validate({"spec": self.body.get("spec")})
            spec = IndexSpec.from_dict(prune({"spec": self.body["spec"]})["spec"], namespace=self.namespace,
                                       index=self.name)
        except (InvalidSearchIndex, KeyError, TypeError, ValueError) as exc:
            return self.refuse("InvalidSpec", f"invalid spec: {exc}")
        refused = self.env.trust.refusals(self.namespace, spec)
        if refused:
            return self.refuse("NotAllowed", "not allowed by the operator's configuration: " + "; ".join(refused))
        self.spec = spec
        self.owner = owner_of(self.namespace, self.name)
        phase = self.status.get("phase") or PENDING
        try:
            if phase in ROLLOUT_PHASES:
                requeue = self.rollout_phase(phase)
            elif phase == ROLLING_BACK:
                requeue = self.rolling_back()
            else:
                requeue = self.steady(phase)
        except Fail as exc:
            self.fail(exc.reason, exc.message)
            return self.finish(FAST)
        except Exception as exc:  # noqa: BLE001  (Milvus, Kafka, the API: transient until proven otherwise)
            return self.transient(exc)
        return self.finish(requeue)

    def finish(self, requeue: float, error: str | None = None) -> Outcome:
        self.status["observedGeneration"] = self.meta.get("generation")
        self.status["conditions"] = conditions(self.body.get("status") or {}, self.status,
                                               self.meta.get("generation"), self.now)
        if not self.status_error:   # what is written back is a Status (a ValidationError: our own bug)
            self.status = Status.read(self.status).dump()
        return Outcome(status=self.status, events=self.events, requeue=requeue, error=error)

    def transient(self, exc: Exception) -> Outcome:
        text = f"{type(exc).__name__}: {str(exc)[:400]}"
        cand = self.status.get("candidate")
        phase = self.status.get("phase")
        if cand and phase in ROLLOUT_PHASES and phase != SWITCHING:
            cand["attempts"] = int(cand.get("attempts", 0)) + 1
            cand["lastError"] = text
            if cand["attempts"] > self.spec.policy.max_retries:
                self.fail("StepFailed", f"{phase} failed {cand['attempts']} times; last: {text}")
                return self.finish(FAST)
        self.note(f"{phase}: retrying after {text}")
        log.warning("%s/%s %s: %s", self.namespace, self.name, phase, text)
        return self.finish(WAIT, error=text)

    def fail(self, reason: str, message: str) -> None:
        cand = self.status.get("candidate") or {}
        self.status["failed"] = {"key": self.ref(cand).key if cand else None, "version": cand.get("version"),
                                 "reason": reason, "message": message, "at": iso(self.now)}
        self.go(FAILED, message, kind="Warning", reason=reason)

    # -- steady states: Pending, Ready, Failed
    def steady(self, phase: str) -> float:
        s, spec = self.status, self.spec
        if s.get("candidate"):                       # a failed or abandoned candidate: clean it up
            self.end_experiment()
            if self.retire(self.ref(s["candidate"])):
                s["candidate"] = None
            return FAST
        if self.cleanup_retired():
            return FAST
        loop = Loop(self)
        loop.settle_target()
        serving, previous = s.get("serving"), s.get("previous")
        model = desired_model(spec, s)
        desired = VersionRef.of(self.name, self.namespace, model)
        token = self.annotations.get(ROLLBACK_ANNOTATION)
        if token and token != s.get("rollbackToken"):
            s["rollbackToken"] = token
            if serving and previous:
                s["rolledBack"] = {"key": self.ref(serving).key, "version": serving["version"]}
                self.go(ROLLING_BACK, f"rollback requested: alias {spec.alias} back to {previous['version']} "
                                      f"({previous['collection']})")
                return FAST
            self.event("Warning", "NothingToRollBack", "rollback requested, but no previous version is retained")
        if serving and previous and desired.key == self.ref(previous).key and desired.key != self.ref(serving).key:
            self.go(ROLLING_BACK, f"spec.model names the previous version {previous['version']}: moving "
                                  f"alias {spec.alias} back to {previous['collection']}")
            return FAST
        if serving is None or desired.key != self.ref(serving).key:
            failed = s.get("failed") or {}
            if failed.get("key") == desired.key:
                if phase != FAILED:
                    self.go(FAILED, failed.get("message", "failed"), kind="Warning", reason=failed.get("reason"))
                return SLOW                                   # terminal for this target
            if (s.get("rolledBack") or {}).get("key") == desired.key:
                self.note(f"{desired.version} was rolled back; {serving['version']} serves. Change "
                          "spec.model to roll out again")
                return SLOW
            s["candidate"] = {**desired.to_status(), "startedAt": iso(self.now), "attempts": 0}
            s["gate"] = None
            s["experiment"] = None
            s["failed"] = None
            s["rolledBack"] = None
            self.go(DEPLOYING, f"rolling out {model.name} {model.version}"
                               + (" (trained)" if model != spec.model else "") + ": deploying its embedder"
                               + (f" (serving: {serving['version']})" if serving else ""))
            return FAST
        if phase != READY:
            self.go(READY, f"alias {spec.alias} serves {serving['version']} ({serving['collection']})")
        if previous and self.now >= (parse_iso(previous.get("retainUntil")) or 0):
            if self.retire(self.ref(previous)):
                self.event("Normal", "Retired", f"retention over: deleted {previous['version']} "
                                                f"({previous['collection']}, its embedder, ingest and consumer group)")
                s["previous"] = None
            return FAST
        requeue = SLOW
        if previous:
            left = (parse_iso(previous.get("retainUntil")) or self.now) - self.now
            requeue = max(1.0, min(SLOW, left))
        nxt = loop.look()                     # the learning loop: only while the desired version serves
        return requeue if nxt is None else min(requeue, nxt)

    def cleanup_retired(self) -> bool:
        """Versions pushed out of ``previous`` by a newer switch: delete them. True while busy."""
        retired = self.status.get("retired") or []
        if not retired:
            return False
        left = [r for r in retired if not self.retire(self.ref(r))]
        self.status["retired"] = left or None
        return True

    def retire(self, v: VersionRef) -> bool:
        """Delete a version that does not serve: workloads, collection (only if this index owns
        it), consumer group."""
        store = self.env.store
        if store.describe_alias(self.spec.alias) == v.collection:
            log.error("refusing to delete %s: alias %s serves it", v.collection, self.spec.alias)
            return True
        gone = self.env.workloads.delete_version(self.spec, v)
        if gone:
            owner = self.owner_of(v.collection)
            if owner == self.owner:
                store.drop_collection(v.collection)
            elif owner is not None:
                self.event("Warning", "NotOwned", f"kept collection {v.collection}: SearchIndex "
                                                  f"{owner or '(none)'} owns it, not {self.owner}")
            self.env.groups.delete(v.group)
        return gone

    # -- the rollout phases
    def rollout_phase(self, phase: str) -> float:
        s = self.status
        cand = self.ref(s.get("candidate"))
        if cand is None:
            self.go(READY if s.get("serving") else PENDING, "no candidate")
            return FAST
        desired = VersionRef.of(self.name, self.namespace, desired_model(self.spec, s))
        if phase != SWITCHING and desired.key != cand.key:
            self.event("Normal", "Superseded", f"spec.model changed to {desired.version} during the rollout "
                                               f"of {cand.version}: abandoning {cand.version}")
            self.end_experiment()
            if self.retire(cand):
                s["candidate"] = None
                self.go(READY if s.get("serving") else PENDING, f"abandoned {cand.version}")
            return FAST
        return {DEPLOYING: self.deploying, BACKFILLING: self.backfilling, VERIFYING: self.verifying,
                EXPERIMENTING: self.experimenting, AWAITING: self.awaiting, SWITCHING: self.switching}[phase](cand)

    def deploying(self, cand: VersionRef) -> float:
        spec, c = self.spec, self.status["candidate"]
        if spec.policy.gate.golden and not c.get("goldenChecked"):
            self.golden_judgments()                  # refused before anything is deployed
            c["goldenChecked"] = True
        owner = self.owner_of(cand.collection)
        if owner not in (None, self.owner):
            raise Fail("CollectionTaken", f"collection {cand.collection} exists and SearchIndex "
                                          f"{owner or '(none: not made by the operator)'} owns it")
        st = self.env.workloads.ensure_embedder(spec, cand)
        started = parse_iso(c.get("startedAt")) or self.now
        if st.failed:
            raise Fail("DeployFailed", f"embedder of {cand.version}: {st.message}")
        if not st.ready:
            if self.now - started > spec.policy.deploy_timeout_s:
                raise Fail("DeployTimeout", f"embedder of {cand.version} not ready after "
                                            f"{spec.policy.deploy_timeout_s}s: {st.message}")
            self.note(f"deploying the embedder of {cand.version}: {st.message}")
            return WAIT
        client = self.env.embedder(st.url)
        try:
            dim = int(client.dim)
            client.embed_bytes([_probe_image()])
        except Exception as exc:  # noqa: BLE001
            raise StepError(f"the embedder of {cand.version} at {st.url} does not answer: {exc}") from exc
        record = {"model": cand.model, "version": cand.version, "embedder_url": st.url,
                  "served_version": str(getattr(client, "version", "") or ""), "model_uri": cand.uri,
                  "searchindex": self.owner}
        try:
            created = self.env.store.ensure_model_collection(cand.collection, dim, record)
        except ValueError as exc:
            raise Fail("CollectionMismatch", str(exc)) from exc
        rec = self.env.store.model_record(cand.collection)
        if rec is not None and ((rec.get("model"), rec.get("version")) != (cand.model, cand.version)
                                or rec.get("searchindex") != self.owner):
            raise Fail("CollectionMismatch", f"collection {cand.collection} exists, built by {rec}")
        c.update(embedderUrl=st.url, dim=dim)
        ist = self.env.workloads.ensure_ingest(spec, cand, st.url)
        c["progress"] = {"indexed": 0, "offsets": {}, "offsetsChangedAt": iso(self.now),
                         "checkedAt": iso(self.now)}
        c["backfillStartedAt"] = iso(self.now)
        self.go(BACKFILLING, f"{cand.version}: collection {cand.collection} "
                             f"{'created' if created else 'exists'} (dim {dim}, {spec.index_type}); "
                             f"ingest group {cand.group} replaying {spec.topic} from the beginning"
                             + (f" ({ist.message})" if ist.message else ""))
        return FAST

    def backfilling(self, cand: VersionRef) -> float:
        s, spec, c = self.status, self.spec, self.status["candidate"]
        pol = spec.policy
        emb = self.env.workloads.ensure_embedder(spec, cand)            # heal what vanished
        ist = self.env.workloads.ensure_ingest(spec, cand, c.get("embedderUrl") or emb.url or "")
        started = parse_iso(c.get("backfillStartedAt")) or self.now
        if self.now - started > pol.backfill_timeout_s:
            raise Fail("BackfillTimeout", f"{cand.version} not caught up after {pol.backfill_timeout_s}s")
        store = self.env.store
        indexed = store.count(cand.collection)
        serving = s.get("serving")
        target = store.count(serving["collection"]) if serving else None
        offsets = self.env.groups.committed(cand.group)
        p = c.setdefault("progress", {})
        if offsets != p.get("offsets"):
            p["offsets"] = offsets
            p["offsetsChangedAt"] = iso(self.now)
        last_at = parse_iso(p.get("checkedAt")) or self.now
        dt = self.now - last_at
        if dt > 0:
            # the last interval's rate: 0 while the count stands still (a decaying average kept
            # showing a rate for minutes after the last item)
            p["ratePerSecond"] = round(max(0.0, (indexed - int(p.get("indexed", 0))) / dt), 2)
        p["indexed"], p["servingCount"], p["checkedAt"] = indexed, target, iso(self.now)
        rate = p.get("ratePerSecond") or 0
        p["etaSeconds"] = round((target - indexed) / rate, 1) if target is not None and rate > 0 and target > indexed else None
        idle = self.now - (parse_iso(p.get("offsetsChangedAt")) or self.now)
        p["idleSeconds"] = round(idle, 1)
        # The first version has no serving count to match: it needs its first committed batch.
        parity = bool(offsets) if target is None else abs(indexed - target) <= pol.count_tolerance
        p["parity"] = parity
        if ist.ready and emb.ready and parity and idle >= pol.idle_s:
            self.go(VERIFYING, f"{cand.version} caught up: {indexed} items"
                               + (f" (serving {target})" if target is not None else "")
                               + f", consumer idle {idle:.0f}s; running the quality gate")
            return FAST
        self.note(f"backfilling {cand.version}: {indexed}" + (f"/{target}" if target is not None else "")
                  + " items" + (f", {rate:.1f}/s" if rate else ", none new") + f", consumer idle {idle:.0f}s"
                  + ("" if ist.ready else f"; {ist.message}"))
        return WAIT

    def verifying(self, cand: VersionRef) -> float:
        s, spec, c = self.status, self.spec, self.status["candidate"]
        gate = spec.policy.gate
        judgments = self.golden_judgments() if gate.golden else None
        serving = s.get("serving")
        cand_path = VersionPath(cand.version, cand.collection, self.env.embedder(c["embedderUrl"]))
        serv_path = None
        if serving and serving.get("embedderUrl"):
            serv_path = VersionPath(serving["version"], serving["collection"],
                                    self.env.embedder(serving["embedderUrl"]))
        result = run_gate(self.env.store, cand_path, serv_path, gate, fetcher=self.env.fetcher,
                          query_fetcher=self.env.query_fetcher, judgments=judgments)
        result.update(candidate=cand.version, serving=serving["version"] if serving else None,
                      measuredAt=iso(self.now))
        s["gate"] = result
        log.info("%s/%s quality gate of %s: %s %s", self.namespace, self.name, cand.version,
                 result["verdict"], {k: v for k, v in result.items() if k in ("selfConsistency", "golden", "offline")})
        if result["verdict"] != "Passed":
            raise Fail("GateFailed", f"quality gate refused {cand.version}: " + "; ".join(result["reasons"]))
        passed = f"gate passed ({_gate_summary(result)})"
        x = spec.policy.experiment
        if x.enabled and serving:
            s["experiment"] = None
            self.go(EXPERIMENTING, f"{passed}; online experiment ({x.design}, {x.share:.0%} of the units) of "
                                   f"{cand.version} against {serving['version']}")
            return FAST
        if x.enabled:
            s["experiment"] = {"skipped": "no version serves yet (the first rollout): nothing to experiment against"}
            passed += "; no online experiment: no version serves yet"
        return self.after_checks(cand, passed)

    def after_checks(self, cand: VersionRef, passed: str) -> float:
        """The gate (and the experiment) passed: AwaitingApproval or Switching."""
        spec = self.spec
        if spec.policy.require_approval:
            self.go(AWAITING, f"{passed}; approve with: kubectl annotate searchindex "
                              f"{self.name} {APPROVE_ANNOTATION}={cand.version}")
            return SLOW
        self.go(SWITCHING, f"{passed}; switching alias {spec.alias} to {cand.collection}")
        return FAST

    # -- the online experiment
    def experimenting(self, cand: VersionRef) -> float:
        s, x = self.status, self.spec.policy.experiment
        serving, c = s.get("serving"), s["candidate"]
        if not serving:                         # nothing to experiment against (a status written by hand)
            s["experiment"] = {"skipped": "no version serves: nothing to experiment against"}
            return self.after_checks(cand, "no online experiment: no version serves")
        e = s.get("experiment") or {}
        if not e.get("id"):
            # persisted before any search service hears of it: a restart re-writes this one
            exp = new_experiment(x.design, x.share, cand.collection, serving["collection"], int(self.now * 1000))
            s["experiment"] = {"id": exp.id, "design": exp.design, "share": exp.share, "salt": exp.salt,
                               "candidate": cand.version, "serving": serving["version"],
                               "servingCollection": exp.serving, "candidateCollection": exp.candidate,
                               "started": exp.started, "startedAt": iso(self.now), "propertyWritten": False,
                               "looks": 0}
            self.note(f"experiment {exp.id} ({exp.design}, {exp.share:.0%}) of {cand.version} against "
                      f"{serving['version']}: starting")
            return FAST
        if e.get("decision") in DECISIONS and e.get("decidedAt"):
            return self.conclude(cand, e)
        exp = Experiment(id=e["id"], design=e["design"], share=float(e["share"]), salt=e["salt"],
                         candidate=e["candidateCollection"], serving=e["servingCollection"], started=int(e["started"]))
        # every look (re)writes it: one idempotent call, and a property someone cleared comes back
        self.env.store.set_collection_property(exp.serving, EXPERIMENT_KEY, exp.to_json())
        if not e.get("propertyWritten"):
            e["propertyWritten"] = True
            self.event("Normal", "ExperimentStarted",
                       f"experiment {exp.id}: {exp.design}, {exp.share:.0%} of the units; {cand.version} "
                       f"({exp.candidate}) against {serving['version']} ({exp.serving}); alpha {x.alpha}, "
                       f"margin {x.margin}, promote when {x.promote_when}, at least {x.min_units} units")
        failpoints.hit("experiment-started")
        records = self.env.events.read(self.spec.bootstrap, x.events_topic)
        elapsed = self.now - exp.started / 1000
        timed_out = elapsed >= x.max_duration_s
        result = analyze(records, exp.id, stats_policy(x), timed_out=timed_out)
        failpoints.hit("experiment-after-look")
        e.update({k: v for k, v in result.items() if k not in OWN})
        e.update(looks=int(e.get("looks") or 0) + 1, lookedAt=iso(self.now), events=len(records))
        c["attempts"] = 0                     # a look that worked: transient failures count afresh
        decision = result.get("decision")
        if timed_out and (decision not in DECISIONS or result.get("code") == "Timeout"):
            e["timedOut"] = True
            if decision not in DECISIONS:     # the analysis should have applied onTimeout itself
                e.update(decision=x.on_timeout, reason=f"maxDurationSeconds ({x.max_duration_s}) reached without "
                                                       f"a decision: onTimeout={x.on_timeout}")
                decision = x.on_timeout
        if decision in DECISIONS:
            e["decidedAt"] = iso(self.now)       # persisted before the property is cleared
            self.event("Normal", "ExperimentDecided",        # an abort's Warning is the Failed one
                       f"experiment {exp.id}: {decision}: {e.get('reason')}; {summary(e)}")
            self.note(f"experiment {exp.id} decided {decision}: {e.get('reason')}")
            return FAST
        self.note(f"experiment {exp.id} ({exp.design}), look {e['looks']}, {elapsed:.0f}s of "
                  f"{x.max_duration_s}s: {summary(e)}" + (f"; {e['reason']}" if e.get("reason") else ""))
        return WAIT

    def conclude(self, cand: VersionRef, e: dict) -> float:
        """A persisted decision: end the experiment (the search services stop it), then act on it."""
        self.end_experiment()
        failpoints.hit("experiment-ended")
        what = (f"experiment {e['id']} ({e.get('design')}) {'timed out' if e.get('timedOut') else 'decided'} "
                f"{e['decision']}: {e.get('reason')}; {summary(e)}")
        if e["decision"] != "promote":
            raise Fail("ExperimentLost", f"{what}; {e.get('serving')} keeps serving")
        return self.after_checks(cand, what)

    def end_experiment(self) -> None:
        """Clear the experiment's property (``""``) on the collection that carried it, once."""
        e = self.status.get("experiment") or {}
        if not e.get("id") or e.get("endedAt"):
            return
        coll = e.get("servingCollection")
        if coll and self.env.store.has_collection(coll):
            self.env.store.set_collection_property(coll, EXPERIMENT_KEY, "")
        e["endedAt"] = iso(self.now)
        self.status["experiment"] = e

    def golden_judgments(self) -> dict:
        """The golden set, parsed and checked (``GoldenSetRefused`` when a query names a local
        file or another scheme; the CRD allows only ``http(s)://`` for ``golden.uri``)."""
        golden = self.spec.policy.gate.golden
        if golden.config_map:
            text = self.env.workloads.read_config_map(golden.config_map, golden.config_map_key)
        else:
            if not golden.uri.lower().startswith(("http://", "https://")):
                raise Fail("GoldenSetRefused", f"golden.uri {golden.uri[:200]!r}: http(s):// only "
                                               "(the operator reads no local files)")
            text = self.env.query_fetcher.fetch(golden.uri).decode()
        judgments = parse_judgments(text, "golden set")
        try:
            check_golden_queries(judgments)
        except GoldenSetError as exc:
            raise Fail("GoldenSetRefused", str(exc)) from exc
        return judgments

    def awaiting(self, cand: VersionRef) -> float:
        approved = self.annotations.get(APPROVE_ANNOTATION)
        if approved == cand.version or not self.spec.policy.require_approval:
            self.go(SWITCHING, f"{cand.version} approved ({APPROVE_ANNOTATION}={approved}); switching alias "
                               f"{self.spec.alias} to {cand.collection}", reason="Approved")
            self.status["reason"] = SWITCHING
            return FAST
        return SLOW

    def switching(self, cand: VersionRef) -> float:
        s, spec, c = self.status, self.spec, self.status["candidate"]
        emb = self.env.workloads.ensure_embedder(spec, cand)
        if not emb.ready:
            self.note(f"waiting for the embedder of {cand.version} before switching: {emb.message}")
            return WAIT
        self.check_alias()
        before = self.env.store.switch_alias(spec.alias, cand.collection)     # one alter_alias call
        failpoints.hit("after-alias-switch")
        old = s.get("serving")
        if old:
            if s.get("previous"):
                s["retired"] = (s.get("retired") or []) + [s["previous"]]
            s["previous"] = {**old, "retainUntil": iso(self.now + spec.policy.retention_s)}
        s["serving"] = {k: v for k, v in c.items() if k not in ("attempts", "lastError", "progress", "startedAt",
                                                                 "backfillStartedAt")}
        s["serving"]["since"] = iso(self.now)
        s["candidate"] = None
        self.history("switch", old, cand.version)
        self.go(READY, f"alias {spec.alias} switched from {old['collection'] if old else before or '(none)'} to "
                       f"{cand.collection}: {cand.version} serves", reason="Switched")
        self.status["reason"] = READY
        return FAST

    def rolling_back(self) -> float:
        s, spec = self.status, self.spec
        prev, serv = s.get("previous"), s.get("serving")
        if not prev:
            self.go(READY, "nothing to roll back to")
            return FAST
        pref = self.ref(prev)
        emb = self.env.workloads.ensure_embedder(spec, pref)
        self.env.workloads.ensure_ingest(spec, pref, prev.get("embedderUrl") or emb.url or "")
        if not emb.ready:
            self.note(f"waiting for the embedder of {prev['version']} before rolling back: {emb.message}")
            return WAIT
        self.check_alias()
        self.env.store.switch_alias(spec.alias, prev["collection"])
        failpoints.hit("after-rollback-switch")
        s["serving"] = {**{k: v for k, v in prev.items() if k != "retainUntil"}, "since": iso(self.now)}
        s["previous"] = {**serv, "retainUntil": iso(self.now + spec.policy.retention_s)} if serv else None
        self.history("rollback", serv, prev["version"])
        self.go(READY, f"rolled back: alias {spec.alias} serves {prev['version']} ({prev['collection']}) again",
                reason="RolledBack")
        self.status["reason"] = READY
        return FAST

    def history(self, action: str, old: dict | None, to: str) -> None:
        h = list(self.status.get("history") or [])
        h.append({"action": action, "from": old["version"] if old else None, "to": to, "at": iso(self.now)})
        self.status["history"] = h[-HISTORY:]


def reconcile(name: str, namespace: str, body: dict, env: Env) -> Outcome:
    """One idempotent step for one SearchIndex (see the module docstring)."""
    return Step(name, namespace, body, env).run()


def cleanup(name: str, namespace: str, body: dict, env: Env) -> tuple[bool, list[str]]:
    """Delete everything the SearchIndex created: every version's embedder, ingest, collection and
    consumer group, and the alias when it names one of them. Returns (done, what is left)."""
    status = Status.read(body.get("status"))
    versions = [status.candidate, status.serving, status.previous, *(status.retired or [])]
    refs = [VersionRef.from_status(name, namespace, v) for v in versions if v]
    if not refs:
        return True, []                      # nothing was created (e.g. an invalid object)
    spec = IndexSpec.from_dict(prune({"spec": body["spec"]})["spec"], namespace=namespace, index=name)
    store = env.store
    if store is None:       # the operator's allow-lists no longer grant this index's Milvus
        return False, ["its Milvus, which the operator's configuration does not allow (now): nothing deleted"]
    me = owner_of(namespace, name)

    def owned(collection: str) -> bool:
        """Recorded as this index's, or unowned and named by this index's status."""
        if not store.has_collection(collection):
            return False
        return ((store.model_record(collection) or {}).get("searchindex") or me) == me

    training = status.training
    for run in [training.current] + list((training.runs or [])[-1:]) if training else []:
        if run and run.get("job") and run.get("backend"):      # owner references collect them too
            env.workloads.delete_training(Run.from_status(name, namespace, run))
    mine = {r.collection for r in refs if owned(r.collection)}
    left = []
    if store.describe_alias(spec.alias) in mine:
        store.drop_alias(spec.alias)
    for r in refs:
        if not env.workloads.delete_version(spec, r):
            left.append(f"workloads of {r.version}")
            continue
        if r.collection in mine:
            store.drop_collection(r.collection)
        else:
            log.warning("%s/%s: kept collection %s, which another index owns", namespace, name, r.collection)
        if not env.groups.delete(r.group):
            left.append(f"consumer group {r.group}")
    return not left, left


# --- conditions -------------------------------------------------------------------------------

def conditions(old_status: dict, status: dict, generation, now: float) -> list[dict]:
    phase = status.get("phase", PENDING)
    serving = status.get("serving")
    rolled = status.get("rolledBack")
    want = {
        "Ready": (bool(serving),
                  "Serving" if serving else "NoServingVersion",
                  f"alias serves {serving['version']} ({serving['collection']})" if serving
                  else "no model version serves yet"),
        "Progressing": (phase in ROLLOUT_PHASES or phase in (PENDING, ROLLING_BACK),
                        phase if phase in ROLLOUT_PHASES + (ROLLING_BACK, PENDING) else "Idle",
                        status.get("message", "") if phase in ROLLOUT_PHASES + (ROLLING_BACK,) else ""),
        "Degraded": (phase == FAILED or bool(rolled) or status.get("reason") in REFUSED,
                     (status.get("reason") if phase == FAILED or status.get("reason") in REFUSED
                      else "RolledBack" if rolled else "AsExpected"),
                     (status.get("message", "") if phase == FAILED or status.get("reason") in REFUSED
                      else f"{rolled['version']} was rolled back" if rolled else "")),
    }
    before = {c.get("type"): c for c in old_status.get("conditions") or []}
    out = []
    for ctype, (ok, reason, message) in want.items():
        st = "True" if ok else "False"
        prev = before.get(ctype) or {}
        since = prev.get("lastTransitionTime") if prev.get("status") == st else iso(now)
        out.append({"type": ctype, "status": st, "reason": reason, "message": message[:1000],
                    "lastTransitionTime": since or iso(now), "observedGeneration": generation})
    return out


def _brief_errors(exc: ValidationError) -> str:
    return "; ".join(f"status.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])


def _gate_summary(result: dict) -> str:
    parts = []
    sc = result.get("selfConsistency")
    if sc:
        parts.append(f"self-consistency {sc['found']}/{sc['checked']}")
    g = result.get("golden")
    if g:
        c = g["candidate"]
        parts.append(f"nDCG@10 {c['ndcg@10']}, recall@10 {c['recall@10']}")
        if g.get("serving"):
            parts.append(f"serving {g['serving']['ndcg@10']}/{g['serving']['recall@10']}")
    off = result.get("offline")
    if off:
        parts.append(f"offline verdict of {off.get('model')}: beats baselines")
    return ", ".join(parts) or "no checks configured"


def _probe_image() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 90, 60)).save(buf, "PNG")
    return buf.getvalue()
