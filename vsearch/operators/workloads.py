"""The workload layer: what runs a model version's embedder and ingest consumer. The rollout
logic (:mod:`vsearch.operators.rollout`) talks only to :class:`Workloads`; this module has the
Kubernetes implementation (a KServe InferenceService running ``vsearch serve embedder`` and a
Deployment running ``vsearch ingest`` per version, owned by the SearchIndex), and
``vsearch.local.workloads`` the one that runs local processes (``vsearch demo --rollout``).

Kubernetes objects made for version V of SearchIndex S (labels ``vsearch.io/searchindex=S``,
``vsearch.io/model-version=V``, owner reference to S, so deleting S garbage-collects them even
if the operator is gone):

- InferenceService ``<S>-<model>-<V>-embedder`` (``serving.kserve.io/v1beta1``): one custom
  predictor container ``vsearch serve embedder --model-dir /mnt/models``; the model URI is given
  to KServe's storage initializer as ``STORAGE_URI`` (s3://, gs://, pvc://, http(s)://), or used
  as the model directory when it is a path. Ready when its ``Ready`` condition is True; its URL
  is ``status.address.url`` (in-cluster) or ``status.url``.
- Deployment ``<S>-<model>-<V>-ingest`` (``apps/v1``): ``vsearch ingest`` with its own consumer
  group, embedding through that InferenceService, writing the version's collection, never
  touching the alias. Ready when ``status.readyReplicas`` reaches the replicas.

Both run as the image's user (10001) with the `restricted` Pod Security Standard's security
context, a read-only root filesystem (writable: an emptyDir at ``/tmp`` for caches and one at
``/var/lib/vsearch``, as the chart's pods) and no service-account token. Names carry a hash of
(index, model, version) (:class:`vsearch.operators.spec.VersionRef`), so no two versions share one."""

from __future__ import annotations

import abc
import base64
import copy
import dataclasses
import json
import logging
import threading
import time

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .pods import CONTAINER_SECURITY, POD_SECURITY, SCRATCH_MOUNTS, SCRATCH_VOLUMES, label_value
from .spec import LABEL_COMPONENT, LABEL_INDEX, LABEL_VERSION, IndexSpec, VersionRef
from .training import job_body, job_state, service_body, trainjob_body

log = logging.getLogger(__name__)

KSERVE = ("serving.kserve.io", "v1beta1", "inferenceservices")
DEPLOYMENTS = ("apps", "v1", "deployments")
JOBS = ("batch", "v1", "jobs")
TRAINJOBS = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
DISCOVERY_TTL_S = 60.0
_discovered: dict = {}                   # (api server host, group/version) -> (when, plurals)
_discovery_lock = threading.Lock()
MODEL_MOUNT = "/mnt/models"
EMBEDDER_PORT = 8080
METRICS_PORT = 9100


@dataclasses.dataclass
class WorkloadState:
    ready: bool = False
    url: str | None = None
    message: str = ""
    failed: bool = False


class Workloads(abc.ABC):
    """Runs (and removes) the embedder and the ingest consumer of one model version."""

    @abc.abstractmethod
    def ensure_embedder(self, spec: IndexSpec, v: VersionRef) -> WorkloadState:
        """Create the version's embedder unless it exists; report whether it is ready and where."""

    @abc.abstractmethod
    def ensure_ingest(self, spec: IndexSpec, v: VersionRef, embedder_url: str) -> WorkloadState:
        """Create the version's ingest consumer unless it exists (own consumer group, writes
        ``v.collection``, embeds through ``embedder_url``); report whether it is ready."""

    @abc.abstractmethod
    def delete_version(self, spec: IndexSpec, v: VersionRef) -> bool:
        """Remove the version's embedder and ingest; True once both are gone."""

    def read_config_map(self, name: str, key: str) -> str:
        raise LookupError(f"ConfigMap {name}: this workload layer has no ConfigMaps")

    # -- training runs (spec.training; :mod:`vsearch.operators.training`)
    def trainer_installed(self) -> bool:
        """Whether the Kubeflow Trainer's ``TrainJob`` is served (API discovery)."""
        return False

    def ensure_training(self, spec: IndexSpec, run):
        """Create a training run's objects unless they exist; its state (a
        :class:`vsearch.operators.training.JobState`)."""
        raise LookupError("this workload layer runs no training jobs")

    def delete_training(self, run) -> bool:
        """Remove a training run's objects; True once gone."""
        return True

    def milvus_token(self, spec: IndexSpec) -> str:
        return ""


def ingest_args(spec: IndexSpec, v: VersionRef, embedder_url: str, *, metrics_port: int) -> list[str]:
    """The ``vsearch ingest`` arguments of a version's consumer (shared by both layers)."""
    args = ["ingest", "--bootstrap", spec.bootstrap, "--topic", spec.topic, "--group", v.group,
            "--embedder-url", embedder_url, "--collection", v.collection, "--alias", "",
            "--model-name", v.model, "--model-version", v.version,
            "--milvus-uri", spec.milvus_uri, "--index-type", spec.index_type, "--metric", spec.metric,
            "--batch-size", str(spec.ingest.batch_size), "--metrics-port", str(metrics_port)]
    if spec.index_params:
        args += ["--index-params", json.dumps(spec.index_params)]
    if spec.search_params:
        args += ["--search-params", json.dumps(spec.search_params)]
    return args + list(spec.ingest.args)


def embedder_args(model_dir: str, *, port: int, max_batch: int = 64, extra=()) -> list[str]:
    """``vsearch serve embedder`` arguments; ``max_batch`` must cover the ingest batch size (a
    larger request is refused with a 400, and the consumer would then embed one image at a time)."""
    return ["serve", "embedder", "--model-dir", model_dir, "--model-name", "embedder",
            "--http-port", str(port), "--max-batch", str(max(64, max_batch)), *extra]


class KubernetesWorkloads(Workloads):
    """InferenceServices and Deployments through the Kubernetes API (``kubernetes`` client)."""

    def __init__(self, api_client, owner: dict):
        self.api = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.owner = owner

    # -- helpers
    def _owner_ref(self) -> dict:
        meta = self.owner["metadata"]
        return {"apiVersion": self.owner.get("apiVersion", "vsearch.io/v1alpha1"),
                "kind": self.owner.get("kind", "SearchIndex"), "name": meta["name"],
                "uid": meta.get("uid", ""), "controller": True, "blockOwnerDeletion": True}

    @staticmethod
    def _labels(v: VersionRef, component: str) -> dict:
        return {LABEL_INDEX: v.index, LABEL_VERSION: label_value(v.version), LABEL_COMPONENT: component,
                "app.kubernetes.io/managed-by": "vsearch-operator"}

    def _get(self, kind, namespace, name) -> dict | None:
        try:
            return self.api.get_namespaced_custom_object(*kind[:2], namespace, kind[2], name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _create(self, kind, namespace, body) -> dict:
        try:
            return self.api.create_namespaced_custom_object(*kind[:2], namespace, kind[2], body)
        except ApiException as exc:
            if exc.status == 409:       # created meanwhile (a restarted operator): fine
                return self._get(kind, namespace, body["metadata"]["name"]) or body
            raise

    def _delete(self, kind, namespace, name) -> bool:
        try:
            self.api.delete_namespaced_custom_object(*kind[:2], namespace, kind[2], name,
                                                     propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise
        return self._get(kind, namespace, name) is None

    def _env(self, spec: IndexSpec, workload) -> list[dict]:
        env = [dict(e) for e in workload.env]
        if spec.token_secret:
            env.append({"name": "VSEARCH_MILVUS_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": spec.token_secret[0], "key": spec.token_secret[1]}}})
        return env

    # -- embedder
    def embedder_body(self, spec: IndexSpec, v: VersionRef) -> dict:
        w = spec.embedder
        local_path = v.uri[len("file://"):] if v.uri.startswith("file://") else v.uri if v.uri.startswith("/") else None
        env = self._env(spec, w)
        if local_path is None:
            env.append({"name": "STORAGE_URI", "value": v.uri})     # KServe's storage initializer
        container = {"name": "kserve-container", "image": w.image, "command": ["vsearch"],
                     "args": embedder_args(local_path or MODEL_MOUNT, port=EMBEDDER_PORT,
                                           max_batch=spec.ingest.batch_size, extra=w.args),
                     "env": env, "ports": [{"containerPort": EMBEDDER_PORT, "protocol": "TCP"}],
                     "securityContext": copy.deepcopy(CONTAINER_SECURITY)}
        predictor = _placed(w, container, {"minReplicas": w.replicas, "maxReplicas": max(1, w.replicas),
                                           "containers": [container]})
        return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                "metadata": {"name": v.embedder_name, "namespace": v.namespace,
                             "labels": self._labels(v, "embedder"), "ownerReferences": [self._owner_ref()],
                             "annotations": {"vsearch.io/model-uri": v.uri}},
                "spec": {"predictor": predictor}}

    def ensure_embedder(self, spec: IndexSpec, v: VersionRef) -> WorkloadState:
        obj = self._get(KSERVE, v.namespace, v.embedder_name)
        if obj is None:
            self._create(KSERVE, v.namespace, self.embedder_body(spec, v))
            return WorkloadState(message=f"created InferenceService {v.embedder_name}")
        st = obj.get("status") or {}
        ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), None)
        url = (st.get("address") or {}).get("url") or st.get("url")
        if ready and ready.get("status") == "True" and url:
            return WorkloadState(ready=True, url=url.rstrip("/"))
        msg = (ready or {}).get("message") or (ready or {}).get("reason") or "InferenceService not ready yet"
        return WorkloadState(message=f"InferenceService {v.embedder_name}: {msg}")

    # -- ingest
    def ingest_body(self, spec: IndexSpec, v: VersionRef, embedder_url: str) -> dict:
        w = spec.ingest
        labels = self._labels(v, "ingest")
        selector = {LABEL_INDEX: v.index, LABEL_VERSION: labels[LABEL_VERSION], LABEL_COMPONENT: "ingest"}
        container = {"name": "ingest", "image": w.image, "command": ["vsearch"],
                     "args": ingest_args(spec, v, embedder_url, metrics_port=METRICS_PORT),
                     "env": self._env(spec, w),
                     "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
                     "readinessProbe": {"httpGet": {"path": "/metrics", "port": METRICS_PORT}},
                     "securityContext": copy.deepcopy(CONTAINER_SECURITY)}
        pod = _placed(w, container, {"containers": [container], "terminationGracePeriodSeconds": 60})
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": v.ingest_name, "namespace": v.namespace, "labels": labels,
                             "ownerReferences": [self._owner_ref()]},
                "spec": {"replicas": w.replicas, "selector": {"matchLabels": selector},
                         "template": {"metadata": {"labels": selector}, "spec": pod}}}

    def ensure_ingest(self, spec: IndexSpec, v: VersionRef, embedder_url: str) -> WorkloadState:
        obj = self._get(DEPLOYMENTS, v.namespace, v.ingest_name)
        if obj is None:
            self._create(DEPLOYMENTS, v.namespace, self.ingest_body(spec, v, embedder_url))
            return WorkloadState(message=f"created Deployment {v.ingest_name}")
        want = int((obj.get("spec") or {}).get("replicas", 1))
        have = int((obj.get("status") or {}).get("readyReplicas") or 0)
        if have >= max(1, want):
            return WorkloadState(ready=True)
        return WorkloadState(message=f"Deployment {v.ingest_name}: {have}/{want} replicas ready")

    def delete_version(self, spec: IndexSpec, v: VersionRef) -> bool:
        a = self._delete(DEPLOYMENTS, v.namespace, v.ingest_name)
        b = self._delete(KSERVE, v.namespace, v.embedder_name)
        return a and b

    # -- training runs
    def trainer_installed(self) -> bool:
        group, version, plural = TRAINJOBS
        key = (self.api.api_client.configuration.host, f"{group}/{version}")
        with _discovery_lock:
            when, plurals = _discovered.get(key, (0.0, None))
        if plurals is None or time.monotonic() - when > DISCOVERY_TTL_S:
            try:
                found = self.api.get_api_resources(group, version)
                plurals = {r.name for r in (found.resources if found else None) or []}
            except ApiException as exc:
                if exc.status != 404:
                    raise
                plurals = set()
            with _discovery_lock:
                _discovered[key] = (time.monotonic(), plurals)
        return plural in plurals

    def ensure_training(self, spec: IndexSpec, run):
        ns = run.namespace
        if run.backend == "TrainJob":
            obj = self._get(TRAINJOBS, ns, run.job)
            if obj is None:
                self._create(TRAINJOBS, ns, trainjob_body(spec, run, self._owner_ref()))
                return job_state({"status": {}}, spec.training.nodes)
            return job_state(obj, spec.training.nodes)
        try:
            self.core.read_namespaced_service(run.service, ns)
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                self.core.create_namespaced_service(ns, service_body(run, self._owner_ref()))
            except ApiException as exc2:
                if exc2.status != 409:
                    raise
        obj = self._get(JOBS, ns, run.job)
        if obj is None:
            self._create(JOBS, ns, job_body(spec, run, self._owner_ref()))
            return job_state({"status": {}}, spec.training.nodes)
        return job_state(obj, int((obj.get("spec") or {}).get("completions") or spec.training.nodes))

    def delete_training(self, run) -> bool:
        if run.backend == "TrainJob":
            return self._delete(TRAINJOBS, run.namespace, run.job)
        gone = self._delete(JOBS, run.namespace, run.job)
        try:
            self.core.delete_namespaced_service(run.service, run.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
        return gone

    # -- configuration the rollout reads
    def read_config_map(self, name: str, key: str) -> str:
        cm = self.core.read_namespaced_config_map(name, self.owner["metadata"]["namespace"])
        data = cm.data or {}
        if key not in data:
            raise LookupError(f"ConfigMap {name} has no key {key!r} (keys: {sorted(data)})")
        return data[key]

    def milvus_token(self, spec: IndexSpec) -> str:
        if not spec.token_secret:
            return ""
        sec = self.core.read_namespaced_secret(spec.token_secret[0], self.owner["metadata"]["namespace"])
        raw = (sec.data or {}).get(spec.token_secret[1])
        if raw is None:
            raise LookupError(f"Secret {spec.token_secret[0]} has no key {spec.token_secret[1]!r}")
        return base64.b64decode(raw).decode()


def _placed(w, container: dict, pod: dict) -> dict:
    """``pod`` with the hardened pod security settings and the workload's resources (on
    ``container``), node selector, tolerations, affinity, service account, pull secrets and
    runtime class."""
    if w.resources:
        container["resources"] = w.resources
    container["volumeMounts"] = copy.deepcopy(SCRATCH_MOUNTS)
    pod.update(securityContext=copy.deepcopy(POD_SECURITY), automountServiceAccountToken=False,
               volumes=copy.deepcopy(SCRATCH_VOLUMES))
    placement = {"nodeSelector": w.node_selector, "tolerations": w.tolerations, "affinity": w.affinity,
                 "serviceAccountName": w.service_account, "imagePullSecrets": w.image_pull_secrets,
                 "runtimeClassName": w.runtime_class}
    pod.update({field: value for field, value in placement.items() if value})
    return pod
