"""The learning loop of a ``SearchIndex`` on Kubernetes (``spec.training``, off by default): clicks
on ``search.events`` -> a distributed training run from the serving model -> the trained version
judged offline against the serving one -> the normal rollout of the winner. No person in it.

When (:meth:`Loop.due`), looked at in the steady phase only (a version serves and no rollout is
under way): ``schedule`` (a cron expression, :mod:`vsearch.operators.cron`; the next time is
kept in ``status.training.nextScheduleAt``) and/or ``minNewClicks``: the clicks on
``eventsTopic`` (counted once per query and item, :func:`vsearch.core.search_events.count_clicks`,
whose timestamp is later than the serving version's ``since`` and the last run's start), read
from the topic's beginning by the experiment's reader (:class:`vsearch.operators.experiments.TopicEvents`)
at most every :data:`CLICKS_EVERY_S`. With both, a scheduled time trains only when the clicks are
there. Every run is one version: ``t<UTC yyyymmddHHMMSS>``, at ``modelUri`` with ``{version}``
(and ``{index}``, ``{namespace}``, ``{model}``) filled in.

The run: a Kubeflow Trainer v2 ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``, naming the
``TrainingRuntime`` the chart ships, whose torch plugin sets torchrun's ``PET_*`` variables) when
API discovery finds the Trainer's ``trainjobs`` (``backend: auto``), otherwise an indexed ``Job``
(``completionMode: Indexed``, completions = parallelism = ``nodes``) with a headless Service for
torchrun's static rendezvous (pods ``<job>-<index>.<service>``; rank 0 is ``<job>-0``). Each node
runs ``vsearch train-node`` (:mod:`vsearch.operators.train_node`): it fetches the serving model
(``s3://`` or a path), copies the catalog topic's images into a folder (items written before the run
began), then ``torchrun ... --module vsearch train --init <serving> --catalog <snapshot>
--data kafka://<bootstrap>/<eventsTopic> --out <model dir> --judge-against <serving> <recipe>``,
and node 0 uploads the model directory to ``s3://`` (a path is written in place). The pods have the
same hygiene as every workload of the operator (:mod:`vsearch.operators.workloads`).

The result: once the run succeeded, the new version's ``vsearch_model.json`` is read at its
``modelUri`` (``s3://``, or a path under the operator's ``--model-file-roots``); its
``evaluation.verdict`` (written by the trainer's ``--judge-against``, the format the gate's
``requireOfflineVerdict`` reads) must beat every reference, a ``serving ...`` one included. A
version that does not is not rolled out: the run's ``result`` is ``NotBetter`` with the
verdict's words in ``reason``, the serving version stays, and the loop waits for its next
trigger (counted from that run). A failed run (``Failed``, ``Timeout``, ``Lost``) is recorded the
same way.

The rollout target: ``status.training.target`` (model, version, uri and ``specKey``: the key of
``spec.model`` when it was set). While ``spec.model`` is unchanged, the target is what the index
should serve (:func:`desired_model`), so the rollout machinery (backfill, gate, experiment,
approval, switch, rollback) treats a trained version exactly as one a person named; a person who
changes ``spec.model`` overrides it (the target is dropped). The operator does not write
``spec.model``: the spec stays the user's (a GitOps tool would revert an operator's edit, and
the revert would read as a rollback). A trained version that fails its rollout (gate,
experiment) or is rolled back is recorded in its run (``RolloutFailed``/``RolledBack``) and the
target returns to the version that serves.

``status.training.runs``: the last ``history`` runs, each with its job, backend, version,
modelUri, trigger, startedAt, finishedAt, result, reason and figures (the verdict's metrics
against each reference)."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
from typing import Callable

from ..core.search_events import count_clicks
from .pods import CONTAINER_SECURITY, POD_SECURITY, SCRATCH_MOUNTS, SCRATCH_VOLUMES, label_value
from .spec import LABEL_COMPONENT, LABEL_INDEX, LABEL_VERSION, IndexSpec, ModelRef, Training, dns_name

log = logging.getLogger(__name__)

TRAINER = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
LABEL_RUN = "vsearch.io/training-run"
RDZV_PORT = 29500
WORK = "/var/lib/vsearch"                 # the scratch volume "data" of every pod
FAST, WAIT, SLOW = 0.0, 2.0, 10.0         # seconds until the next look (as the rollout's)
CLICKS_EVERY_S = 10.0                     # at most one read of the events topic per this long
IDLE, TRAINING, ROLLING_OUT = "Idle", "Training", "RollingOut"
ROLLED_OUT, NOT_BETTER, FAILED, ROLLOUT_FAILED, ROLLED_BACK = (
    "RolledOut", "NotBetter", "Failed", "RolloutFailed", "RolledBack")


@dataclasses.dataclass
class JobState:
    """What the workload layer says about one training run."""
    phase: str = "Pending"        # Pending | Running | Succeeded | Failed | Missing
    message: str = ""


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: its objects' name, the version it makes and where that goes."""
    index: str
    namespace: str
    job: str
    version: str
    model: str
    uri: str                      # the new version's modelUri
    init_uri: str                 # the serving version's
    backend: str                  # TrainJob | Job
    trigger: str
    started_ms: int
    clicks_since_ms: int = 0      # the clicks that train: after this (0: all; see Loop.clicks_window_ms)

    @classmethod
    def from_status(cls, index: str, namespace: str, d: dict) -> "Run":
        return cls(index=index, namespace=namespace, job=d["job"], version=d["version"], model=d["model"],
                   uri=d["modelUri"], init_uri=d["initUri"], backend=d["backend"], trigger=d.get("trigger") or "",
                   started_ms=int(d["startedMs"]), clicks_since_ms=int(d.get("clicksSinceMs") or 0))

    def to_status(self) -> dict:
        return {"job": self.job, "version": self.version, "model": self.model, "modelUri": self.uri,
                "initUri": self.init_uri, "backend": self.backend, "trigger": self.trigger,
                "startedMs": self.started_ms, "startedAt": iso_ms(self.started_ms),
                "clicksSinceMs": self.clicks_since_ms}

    @property
    def service(self) -> str:
        return self.job                   # the headless Service of an indexed Job


def iso_ms(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_version(now: float) -> str:
    return "t" + datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y%m%d%H%M%S")


def job_name(index: str, version: str) -> str:
    """At most 47 characters: pods of an indexed Job are ``<job>-<index>-<random>`` (63 at most)."""
    return dns_name(index, version, limit=47, suffix="train")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> str | None:
    """A model URI that is a path (``/...``, ``file://...``), else None."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return uri if uri.startswith("/") else None


# --- what the pods run ------------------------------------------------------------------------

def train_args(spec: IndexSpec, run: Run) -> list[str]:
    """``vsearch train`` for one run: from the serving model, the catalog's snapshot and the
    clicks, judged against the serving model (the recipe's flags last, so they win)."""
    t = spec.training
    init = local_path(run.init_uri) or f"{WORK}/init"
    out = local_path(run.uri) or f"{WORK}/out"
    args = ["train", "--init", init, "--catalog", f"{WORK}/catalog", "--data",
            f"kafka://{spec.bootstrap}/{t.events_topic}", "--out", out, "--judge-against", init,
            "--name", run.model, "--version", run.version, "--max-steps", str(t.max_steps),
            "--batch-size", str(t.batch_size), "--no-progress"]
    for flag, value in (("--lr", t.lr), ("--simclr-ratio", t.simclr_ratio), ("--holdout", t.holdout)):
        if value is not None:
            args += [flag, f"{value:g}"]
    if run.clicks_since_ms:
        args += ["--clicks-since-ms", str(run.clicks_since_ms)]
    return args + list(t.args)


def node_args(spec: IndexSpec, run: Run) -> list[str]:
    """The container's arguments (``vsearch`` is the command): ``train-node`` prepares the
    node, then runs torchrun. For a Job torchrun gets the static rendezvous on the headless
    Service; in a TrainJob the runtime's torch plugin sets it (``PET_*``)."""
    t = spec.training
    launcher = []
    if run.backend == "Job":
        launcher = ["--nnodes", str(t.nodes), "--nproc-per-node", str(t.nproc_per_node),
                    "--node-rank", "$(JOB_COMPLETION_INDEX)", "--master-addr", f"{run.job}-0.{run.service}",
                    "--master-port", str(RDZV_PORT)]
    return ["train-node", "--catalog-bootstrap", spec.bootstrap, "--catalog-topic", spec.topic,
            "--catalog-dir", f"{WORK}/catalog", "--catalog-until-ms", str(run.started_ms),
            "--init-uri", run.init_uri, "--init-dir", f"{WORK}/init",
            "--out-dir", local_path(run.uri) or f"{WORK}/out", "--upload-to", run.uri if is_s3(run.uri) else "",
            "--", "torchrun", *launcher, "--max-restarts", str(t.max_restarts), "--module", "vsearch",
            *train_args(spec, run)]


def labels(run: Run) -> dict:
    return {LABEL_INDEX: run.index, LABEL_VERSION: label_value(run.version), LABEL_COMPONENT: "training",
            LABEL_RUN: run.job, "app.kubernetes.io/managed-by": "vsearch-operator"}


def container(spec: IndexSpec, run: Run) -> dict:
    """The training container (the Job's; a TrainJob's trainer has the same image, command, args
    and env)."""
    t = spec.training
    env = [dict(e) for e in t.env]
    if run.backend == "Job":
        env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}})
    c = {"name": "trainer", "image": t.image, "command": ["vsearch"], "args": node_args(spec, run), "env": env,
         "ports": [{"name": "rendezvous", "containerPort": RDZV_PORT, "protocol": "TCP"}],
         "securityContext": copy.deepcopy(CONTAINER_SECURITY),
         "volumeMounts": copy.deepcopy(SCRATCH_MOUNTS) + [{"name": "shm", "mountPath": "/dev/shm"}]}
    if t.resources:
        c["resources"] = copy.deepcopy(t.resources)
    return c


def job_body(spec: IndexSpec, run: Run, owner_ref: dict) -> dict:
    """An indexed ``batch/v1`` Job: one pod per node, each ``<job>-<index>`` under the headless
    Service's subdomain; the pod security of every other workload, no service-account token."""
    t = spec.training
    pod = {"restartPolicy": "Never", "subdomain": run.service, "containers": [container(spec, run)],
           "terminationGracePeriodSeconds": 30,
           "securityContext": copy.deepcopy(POD_SECURITY), "automountServiceAccountToken": False,
           "volumes": copy.deepcopy(SCRATCH_VOLUMES) + [{"name": "shm", "emptyDir": {"medium": "Memory",
                                                                                    "sizeLimit": "1Gi"}}]}
    placement = {"nodeSelector": t.node_selector, "tolerations": t.tolerations,
                 "serviceAccountName": t.service_account, "imagePullSecrets": t.image_pull_secrets}
    pod.update({k: copy.deepcopy(v) for k, v in placement.items() if v})
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": run.job, "namespace": run.namespace, "labels": labels(run),
                         "ownerReferences": [owner_ref],
                         "annotations": {"vsearch.io/model-uri": run.uri, "vsearch.io/init-uri": run.init_uri}},
            "spec": {"completionMode": "Indexed", "completions": t.nodes, "parallelism": t.nodes,
                     # torchrun restarts the group (--max-restarts); a pod that fails ends the run
                     "backoffLimit": 0, "activeDeadlineSeconds": t.timeout_s,
                     "template": {"metadata": {"labels": labels(run)}, "spec": pod}}}


def service_body(run: Run, owner_ref: dict) -> dict:
    """The headless Service of an indexed Job's pods: DNS names before they are ready
    (``publishNotReadyAddresses``) for torchrun's rendezvous on ``<job>-0``."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": run.service, "namespace": run.namespace, "labels": labels(run),
                         "ownerReferences": [owner_ref]},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {LABEL_RUN: run.job},
                     "ports": [{"name": "rendezvous", "port": RDZV_PORT, "targetPort": RDZV_PORT,
                                "protocol": "TCP"}]}}


def trainjob_body(spec: IndexSpec, run: Run, owner_ref: dict) -> dict:
    """A Kubeflow Trainer v2 ``TrainJob`` on the runtime ``spec.training.runtimeRef`` (the
    chart's ``TrainingRuntime`` carries the pod security, scratch volumes and placement)."""
    t = spec.training
    c = container(spec, run)
    trainer = {"image": c["image"], "command": c["command"], "args": c["args"], "numNodes": t.nodes,
               "numProcPerNode": t.nproc_per_node}
    if c["env"]:
        trainer["env"] = c["env"]
    if t.resources:
        trainer["resourcesPerNode"] = copy.deepcopy(t.resources)
    return {"apiVersion": "/".join(TRAINER[:2]), "kind": "TrainJob",
            "metadata": {"name": run.job, "namespace": run.namespace, "labels": labels(run),
                         "ownerReferences": [owner_ref],
                         "annotations": {"vsearch.io/model-uri": run.uri, "vsearch.io/init-uri": run.init_uri}},
            "spec": {"runtimeRef": {"apiGroup": TRAINER[0], "kind": t.runtime_kind, "name": t.runtime_name},
                     "trainer": trainer, "activeDeadlineSeconds": t.timeout_s}}


def job_state(obj: dict | None, completions: int) -> JobState:
    """A Job's or a TrainJob's state from its status (conditions ``Complete``/``Failed``)."""
    if obj is None:
        return JobState("Missing", "gone")
    st = obj.get("status") or {}
    conds = {c.get("type"): c for c in st.get("conditions") or [] if c.get("status") == "True"}
    for kind in ("Failed", "FailureTarget"):
        if kind in conds:
            c = conds[kind]
            return JobState("Failed", f"{c.get('reason') or kind}: {c.get('message') or ''}".strip(": "))
    if "Complete" in conds or int(st.get("succeeded") or 0) >= completions > 0 and "jobsStatus" not in st:
        return JobState("Succeeded", "complete")
    active = int(st.get("active") or 0)
    return JobState("Running" if active else "Pending",
                    f"{active} of {completions} pods running, {int(st.get('succeeded') or 0)} done"
                    if "succeeded" in st or active else "starting")


# --- the verdict ------------------------------------------------------------------------------

def judge(meta: dict) -> tuple[bool, str, dict]:
    """(rolled out?, why, figures) from a trained model's ``vsearch_model.json``: its offline
    verdict must beat every reference, a ``serving`` one among them."""
    ev = (meta or {}).get("evaluation") or {}
    verdict = ev.get("verdict") or {}
    against = verdict.get("against") or {}
    figures = {"metrics": {k: round(v, 4) for k, v in (ev.get("metrics") or {}).items()
                           if isinstance(v, (int, float)) and k in (verdict.get("metrics") or ev.get("metrics") or {})},
               "against": {name: {"beats": a.get("beats"),
                                  **{m: {"model": _r(x.get("model")), "reference": _r(x.get("reference"))}
                                     for m, x in (a.get("metrics") or {}).items() if isinstance(x, dict)}}
                           for name, a in against.items() if isinstance(a, dict)}}
    name = f"{meta.get('name')}:{meta.get('version')}" if meta else "the trained model"
    if not verdict:
        return False, f"{name} carries no offline verdict (evaluation.verdict in its vsearch_model.json)", figures
    serving = [k for k, a in against.items() if isinstance(a, dict) and (a.get("kind") == "serving"
                                                                          or k.startswith("serving"))]
    if not serving:
        return False, f"{name}'s offline verdict does not judge it against the serving model", figures
    text = verdict.get("text") or ""
    if verdict.get("beats_all") is True and all(a.get("beats") is True for a in against.values()
                                                if isinstance(a, dict)):
        return True, "; ".join(line for line in text.splitlines() if line) or f"{name} beats every reference", figures
    lost = [line for line in text.splitlines() if "DOES NOT BEAT" in line]
    if not lost:
        lost = [f"{name} does not beat {k}" for k, a in against.items() if isinstance(a, dict) and not a.get("beats")]
    return False, "; ".join(lost) or f"{name} does not beat its references", figures


def _r(x):
    return round(x, 4) if isinstance(x, (int, float)) else x


def model_meta_reader(fetcher) -> Callable[[str], dict]:
    """``uri -> the vsearch_model.json there`` through ``fetcher`` (a
    :class:`vsearch.core.fetch.Fetcher` for ``s3://`` and the ``--model-file-roots``)."""
    def read(uri: str) -> dict:
        path = local_path(uri)
        where = (f"file://{path.rstrip('/')}" if path else uri.rstrip("/")) + "/vsearch_model.json"
        return json.loads(fetcher.fetch(where))
    return read


# --- the loop ---------------------------------------------------------------------------------

def desired_model(spec: IndexSpec, status: dict) -> ModelRef:
    """What the index should serve: the training target while ``spec.model`` is what it was when
    the target was set, else ``spec.model`` (turning training off keeps the trained version that
    serves; changing ``spec.model`` replaces it)."""
    target = (status.get("training") or {}).get("target")
    if target and target.get("specKey") == spec.model.key:
        return ModelRef(target["model"], target["version"], target["uri"])
    return spec.model


class Loop:
    """One look at the learning loop, inside a rollout step (:class:`vsearch.operators.rollout.Step`)."""

    def __init__(self, step):
        self.step = step
        self.spec: IndexSpec = step.spec
        self.t: Training = step.spec.training
        self.status = step.status
        self.tr: dict = dict(self.status.get("training") or {})
        self.now = step.now

    def save(self) -> None:
        self.status["training"] = self.tr or None

    # -- the target
    def settle_target(self) -> None:
        """Drop a target that ``spec.model`` overrode; record a trained version's rollout that
        ended (served, failed, rolled back) in its run."""
        target = self.tr.get("target")
        if not target:
            return
        if target.get("specKey") != self.spec.model.key:
            self.tr["target"] = None
            self.tr["state"] = IDLE
            self.save()
            return
        key = ModelRef(target["model"], target["version"], target["uri"]).key
        s = self.status
        serving = s.get("serving") or {}
        for what, result in ((s.get("failed"), ROLLOUT_FAILED), (s.get("rolledBack"), ROLLED_BACK)):
            if what and what.get("key") == key:
                self.record(target["version"], result=result, reason=what.get("message") or what.get("reason")
                            or result, only_if_open=True)
                self.retarget_to_serving()
                return
        if serving.get("version") == target["version"] and (serving.get("modelUri") or "") == target["uri"]:
            if self.record(target["version"], result=ROLLED_OUT, rolledOutAt=step_iso(self.now), only_if_open=True):
                self.step.event("Normal", "TrainedVersionServes", f"trained version {target['version']} serves")
            if self.tr.get("state") == ROLLING_OUT:
                self.tr["state"] = IDLE
            self.save()

    def retarget_to_serving(self) -> None:
        """The target goes back to what serves (a trained version, or ``spec.model`` itself)."""
        serving = self.status.get("serving")
        if serving and ModelRef(serving["model"], serving["version"], serving.get("modelUri") or "").key \
                != self.spec.model.key:
            self.tr["target"] = {"model": serving["model"], "version": serving["version"],
                                 "uri": serving.get("modelUri") or "", "specKey": self.spec.model.key}
        else:
            self.tr["target"] = None
        self.tr["state"] = IDLE
        self.save()

    def record(self, version: str, *, only_if_open: bool = False, **fields) -> bool:
        runs = self.tr.get("runs") or []
        for r in reversed(runs):
            if r.get("version") == version:
                if only_if_open and r.get("result") not in (None, "Trained"):
                    return False
                r.update(fields)
                r.setdefault("finishedAt", step_iso(self.now))
                self.tr["runs"] = runs
                return True
        return False

    # -- the steady phase
    def look(self) -> float | None:
        """In the steady phase (desired == serving): start, follow or finish a run. Returns when
        to look again (None: nothing to do, the caller's pace)."""
        if not self.t.enabled:
            if self.tr.get("current"):
                self.stop_current("spec.training.enabled is false")
                return FAST
            return None
        cur = self.tr.get("current")
        if cur:
            return self.follow(Run.from_status(self.step.name, self.step.namespace, cur))
        if self.t.schedule and (not self.tr.get("nextScheduleAt") or self.tr.get("schedule") != self.t.schedule.text):
            self.tr.update(schedule=self.t.schedule.text,        # a changed schedule: its own next time
                           nextScheduleAt=step_iso(self.t.schedule.next_after(self.now)))
        trigger = self.due()
        self.tr.setdefault("state", IDLE)
        self.save()
        if trigger is None:
            return SLOW if self.t.schedule and not self.t.min_new_clicks else WAIT
        return self.start(trigger)

    def since_ms(self) -> int:
        """Clicks count from the later of the serving version's start and the last run's."""
        serving = self.status.get("serving") or {}
        since = (parse_iso(serving.get("since")) or 0) * 1000
        runs = self.tr.get("runs") or []
        if runs:
            since = max(since, int(runs[-1].get("startedMs") or 0))
        return int(since)

    def clicks_window_ms(self) -> int:
        """The clicks a run trains on: those after the start of the run that trained the serving
        version (that run read the log from then on: what it trained on is in the model), or all
        of them when the serving version was not trained by this loop (a person's model has
        learnt from none of them) or its run is no longer known."""
        version = (self.status.get("serving") or {}).get("version")
        target = self.tr.get("target") or {}
        for r in reversed(self.tr.get("runs") or []):
            if r.get("version") == version and r.get("startedMs"):
                return int(r["startedMs"])
        if target.get("version") == version and target.get("trainedFromMs"):
            return int(target["trainedFromMs"])
        return 0

    def new_clicks(self) -> int | None:
        """Clicks since :meth:`since_ms` (None: not looked at this time, too soon since the last)."""
        last = parse_iso(self.tr.get("checkedAt"))
        if last is not None and self.now - last < CLICKS_EVERY_S and self.tr.get("newClicks") is not None:
            return int(self.tr["newClicks"])
        records = self.step.env.events.read(self.spec.bootstrap, self.t.events_topic)
        since = self.since_ms()
        n = sum(1 for c in count_clicks(records).clicks if int(c.get("ts") or 0) > since)
        self.tr.update(checkedAt=step_iso(self.now), newClicks=n)
        return n

    def due(self) -> str | None:
        t = self.t
        scheduled = False
        if t.schedule:
            nxt = parse_iso(self.tr.get("nextScheduleAt"))
            scheduled = nxt is not None and self.now >= nxt
            if not scheduled and not t.min_new_clicks:
                self.tr["message"] = f"next run at {self.tr.get('nextScheduleAt')} (schedule {t.schedule.text!r})"
                return None
        if t.min_new_clicks:
            if t.schedule and not scheduled:
                self.tr["message"] = f"next run at {self.tr.get('nextScheduleAt')} when {t.min_new_clicks} new clicks"
                return None
            n = self.new_clicks()
            if n < t.min_new_clicks:
                self.tr["message"] = (f"{n} of {t.min_new_clicks} new clicks on {t.events_topic} since "
                                      f"{step_iso(self.since_ms() / 1000)}")
                return None
            return f"{n} new clicks (minNewClicks {t.min_new_clicks})" + (
                f", schedule {t.schedule.text!r}" if scheduled else "")
        return f"schedule {t.schedule.text!r}"

    def backend(self) -> str:
        if self.t.backend != "auto":
            return self.t.backend
        return "TrainJob" if self.step.env.workloads.trainer_installed() else "Job"

    def start(self, trigger: str) -> float:
        serving = self.status["serving"]
        init_uri = serving.get("modelUri") or ""
        version = new_version(self.now)
        model = self.t.model_name or self.spec.model.name
        run = Run(index=self.step.name, namespace=self.step.namespace, job=job_name(self.step.name, version),
                  version=version, model=model,
                  uri=self.t.uri_of(self.step.namespace, self.step.name, model, version), init_uri=init_uri,
                  backend=self.backend(), trigger=trigger, started_ms=int(self.now * 1000),
                  clicks_since_ms=self.clicks_window_ms())
        runs = list(self.tr.get("runs") or [])
        entry = {**run.to_status(), "servingVersion": serving["version"], "result": None}
        if not (is_s3(init_uri) or local_path(init_uri)):
            entry.update(result=FAILED, reason=f"the serving model {init_uri or '(no URI)'} is neither s3:// nor a "
                                               "path: the training pods cannot read it", finishedAt=step_iso(self.now))
            self.tr["runs"] = (runs + [entry])[-self.t.history:]
            self.tr["state"] = IDLE
            self.after_run()
            self.step.event("Warning", "TrainingNotStarted", entry["reason"])
            self.save()
            return FAST
        # the objects of the run before are deleted when the next begins (their logs kept till then)
        for old in runs[-1:]:
            if old.get("job") and old.get("backend"):
                self.step.env.workloads.delete_training(Run.from_status(self.step.name, self.step.namespace, old))
        self.tr["runs"] = (runs + [entry])[-self.t.history:]
        self.tr.update(current=run.to_status(), state=TRAINING, backend=run.backend, newClicks=None,
                       message=f"training {version} ({run.backend} {run.job}): {trigger}")
        self.after_run()
        self.save()
        self.step.event("Normal", "TrainingStarted",
                        f"training {version} from {serving['version']} as {run.backend} {run.job} "
                        f"({self.t.nodes} node(s) x {self.t.nproc_per_node} process(es)) -> {run.uri}: {trigger}")
        return FAST

    def after_run(self) -> None:
        if self.t.schedule:
            self.tr["nextScheduleAt"] = step_iso(self.t.schedule.next_after(self.now))

    def follow(self, run: Run) -> float:
        st = self.step.env.workloads.ensure_training(self.spec, run)
        elapsed = self.now - run.started_ms / 1000
        if st.phase in ("Pending", "Running"):
            if elapsed > self.t.timeout_s + 300:
                return self.finish(run, FAILED, f"not finished after {self.t.timeout_s}s: {st.message}")
            self.tr["message"] = f"training {run.version} ({run.backend} {run.job}), {elapsed:.0f}s: {st.message}"
            self.save()
            return WAIT
        if st.phase != "Succeeded":
            return self.finish(run, FAILED, f"{run.backend} {run.job} {st.phase.lower()}: {st.message}")
        serving = self.status["serving"]
        if (serving.get("modelUri") or "") != run.init_uri:
            return self.finish(run, FAILED, f"{serving['version']} began serving during the run: {run.version} was "
                                            f"trained from and judged against {run.init_uri}, not what serves")
        try:
            meta = self.step.env.models(run.uri)
        except Exception as exc:  # noqa: BLE001  (storage: say so, the run is over)
            return self.finish(run, FAILED, f"succeeded, but its model at {run.uri} cannot be read: "
                                            f"{type(exc).__name__}: {str(exc)[:300]}")
        beats, why, figures = judge(meta)
        if not beats:
            self.finish(run, NOT_BETTER, f"not rolled out: {why}", figures=figures, verdict=why)
            return FAST
        self.finish(run, "Trained", f"beats the serving version: {why}", figures=figures, keep_state=True,
                    verdict=why)
        self.tr["target"] = {"model": run.model, "version": run.version, "uri": run.uri,
                             "specKey": self.spec.model.key, "trainedFromMs": run.started_ms}
        self.tr.update(state=ROLLING_OUT, message=f"rolling out trained version {run.version}")
        self.save()
        self.step.event("Normal", "TrainedVersionWins", f"{run.version} beats {self.status['serving']['version']} "
                                                         f"offline: rolling it out ({why})"[:1000])
        return FAST

    def finish(self, run: Run, result: str, reason: str, *, figures: dict | None = None,
               keep_state: bool = False, verdict: str | None = None) -> float:
        extra = {k: v for k, v in (("figures", figures), ("verdict", verdict)) if v is not None}
        self.record(run.version, result=result, reason=reason, finishedAt=step_iso(self.now), **extra)
        self.tr["current"] = None
        if not keep_state:
            self.tr.update(state=IDLE, message=f"{run.version}: {result}: {reason}"[:1000])
        self.save()
        if result != "Trained":
            self.step.event("Warning", "TrainingNotRolledOut" if result == NOT_BETTER else "TrainingFailed",
                            f"{run.version}: {reason}"[:1000])
        return FAST

    def stop_current(self, why: str) -> None:
        run = Run.from_status(self.step.name, self.step.namespace, self.tr["current"])
        self.step.env.workloads.delete_training(run)
        self.record(run.version, result=FAILED, reason=f"stopped: {why}")
        self.tr.update(current=None, state=IDLE, message=f"stopped {run.version}: {why}")
        self.save()


def step_iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc).timestamp()
