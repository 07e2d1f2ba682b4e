"""A small stand-in cluster for the operator tests: kmock's in-memory Kubernetes API over HTTP
(its own process), a test kubelet that turns the InferenceServices and Deployments the operator
creates into real local processes (``vsearch serve embedder``, ``vsearch ingest``) and reports
their readiness and URLs back into their status, and the operator itself (``vsearch operator``)
as a process that tests may SIGKILL and restart."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from pathlib import Path

import requests

from vsearch.local import services

log = logging.getLogger(__name__)

PATHS = {
    "searchindexes": "/apis/vsearch.io/v1alpha1/namespaces/{ns}/searchindexes",
    "inferenceservices": "/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices",
    "deployments": "/apis/apps/v1/namespaces/{ns}/deployments",
    "configmaps": "/api/v1/namespaces/{ns}/configmaps",
    "secrets": "/api/v1/namespaces/{ns}/secrets",
    "events": "/api/v1/namespaces/{ns}/events",
}


class KubeAPI:
    """Plain HTTP calls to the (kmock) API server."""

    def __init__(self, url: str, namespace: str):
        self.url, self.ns = url.rstrip("/"), namespace
        self.http = requests.Session()

    def _path(self, plural: str, name: str | None = None, sub: str | None = None) -> str:
        p = self.url + PATHS[plural].format(ns=self.ns)
        if name:
            p += f"/{name}"
        if sub:
            p += f"/{sub}"
        return p

    def list(self, plural: str) -> list[dict]:
        r = self.http.get(self._path(plural), timeout=10)
        if r.status_code == 404:
            return []
        r.raise_for_status()
        return r.json().get("items") or []

    def get(self, plural: str, name: str) -> dict | None:
        r = self.http.get(self._path(plural, name), timeout=10)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.json()

    def create(self, plural: str, body: dict) -> dict:
        body = {**body, "metadata": {**body["metadata"], "namespace": self.ns}}
        r = self.http.post(self._path(plural), json=body, timeout=10)
        r.raise_for_status()
        return r.json()

    def patch(self, plural: str, name: str, body: dict, sub: str | None = None) -> dict:
        r = self.http.patch(self._path(plural, name, sub), json=body, timeout=10,
                            headers={"content-type": "application/merge-patch+json"})
        r.raise_for_status()
        return r.json()

    def delete(self, plural: str, name: str) -> None:
        r = self.http.delete(self._path(plural, name), timeout=10)
        if r.status_code not in (200, 202, 404):
            r.raise_for_status()


@dataclasses.dataclass
class Pod:
    kind: str
    name: str
    uid: str
    service: services.Service
    port: int
    ready_path: str
    reported: bool = False


def image_paths() -> dict[str, str]:
    """Paths inside the vsearch image (the Dockerfile) -> where the same files are here."""
    from vsearch.predictor.model import default_model_dir
    return {"/opt/vsearch/models/default": str(default_model_dir())}


class TestKubelet(threading.Thread):
    """Watches (by polling) the InferenceServices and Deployments of one namespace and runs each
    as a local process, like a kubelet with KServe's storage initializer: the model URI
    (``STORAGE_URI``, a file:// URI or a path) becomes the ``--model-dir``, and a path inside the
    image (``image_paths``) the same files here; ports are free local ones; readiness and URLs go
    into the objects' status. A process that dies is restarted."""

    def __init__(self, api: KubeAPI, log_dir: Path, *, poll_s: float = 0.3):
        super().__init__(name="test-kubelet", daemon=True)
        self.api, self.log_dir, self.poll_s = api, log_dir, poll_s
        self.pods: dict[tuple[str, str], Pod] = {}
        self._stop_evt = threading.Event()
        self.starts: dict[str, int] = {}           # object name -> processes started for it

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(10)
        for pod in list(self.pods.values()):
            pod.service.stop(10)
        self.pods.clear()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001  (keep going, like a kubelet)
                log.warning("test kubelet: %s", exc)
            self._stop_evt.wait(self.poll_s)

    def sync(self) -> None:
        seen = set()
        for kind in ("inferenceservices", "deployments"):
            for obj in self.api.list(kind):
                meta = obj["metadata"]
                key = (kind, meta["name"])
                seen.add(key)
                pod = self.pods.get(key)
                if pod is not None and pod.uid != meta.get("uid"):
                    pod.service.stop(10)                    # deleted and re-created: a new pod
                    self.pods.pop(key)
                    pod = None
                if pod is None:
                    self.pods[key] = self.run_pod(kind, obj)
                    continue
                if not pod.service.alive():
                    log.warning("test kubelet: %s %s exited (%s); restarting", kind, meta["name"],
                                pod.service.proc.returncode)
                    self.report(kind, meta["name"], pod, ready=False)
                    self.pods[key] = self.run_pod(kind, obj)
                    continue
                if not pod.reported and services.http_ok(f"http://127.0.0.1:{pod.port}{pod.ready_path}"):
                    self.report(kind, meta["name"], pod, ready=True)
        for key in [k for k in self.pods if k not in seen]:
            self.pods.pop(key).service.stop(15)

    def run_pod(self, kind: str, obj: dict) -> Pod:
        meta = obj["metadata"]
        if kind == "inferenceservices":
            c = obj["spec"]["predictor"]["containers"][0]
        else:
            c = obj["spec"]["template"]["spec"]["containers"][0]
        args = list(c.get("args") or [])
        env = {e["name"]: e.get("value", "") for e in c.get("env") or [] if "value" in e}
        port = services.free_port()
        storage = env.pop("STORAGE_URI", None)
        out = []
        i = 0
        while i < len(args):
            a = args[i]
            if a in ("--http-port", "--metrics-port"):
                out += [a, str(port)]
                i += 2
                continue
            if a == "--model-dir" and storage:
                path = storage[len("file://"):] if storage.startswith("file://") else storage
                out += [a, path]
                i += 2
                continue
            if a == "--model-dir" and i + 1 < len(args) and args[i + 1] in image_paths():
                out += [a, image_paths()[args[i + 1]]]
                i += 2
                continue
            out.append(a)
            i += 1
        if kind == "inferenceservices":
            out += ["--threads", "1"]
            ready = "/v2/models/embedder/ready"
        else:
            out += ["--threads", "1"] if "--model-dir" in out else []
            out += ["--retry-max-s", "1", "--batch-ms", "200"]
            ready = "/metrics"
        argv = services.vsearch_argv(*out)
        self.starts[meta["name"]] = self.starts.get(meta["name"], 0) + 1
        svc = services.Service(f"{kind}/{meta['name']}", argv, port=port, env=env,
                               log_path=self.log_dir / f"{meta['name']}.log")
        return Pod(kind, meta["name"], meta.get("uid", ""), svc, port, ready)

    def report(self, kind: str, name: str, pod: Pod, *, ready: bool) -> None:
        url = f"http://127.0.0.1:{pod.port}"
        if kind == "inferenceservices":
            status = {"url": url if ready else None, "address": {"url": url} if ready else None,
                      "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                      "reason": "Running" if ready else "Starting"}]}
        else:
            status = {"replicas": 1, "readyReplicas": 1 if ready else 0, "availableReplicas": 1 if ready else 0}
        try:
            self.api.patch(kind, name, {"status": status}, sub="status")
            pod.reported = ready
        except requests.HTTPError as exc:
            if exc.response is None or exc.response.status_code != 404:
                raise


class Cluster:
    """kmock + the test kubelet + (re)startable operator processes, in one namespace. With
    ``searchindex_crd=False`` the API serves SearchIndexes only once their CRD is created."""

    def __init__(self, root: Path, namespace: str = "vs", *, searchindex_crd: bool = True):
        self.root, self.namespace = root, namespace
        root.mkdir(parents=True, exist_ok=True)
        port = services.free_port()
        self.kmock = services.Service("kmock", [services.sys.executable, "-m", "tests.operator.kmock_server",
                                                "--port", str(port)]
                                      + ([] if searchindex_crd else ["--without-searchindex"]), port=port,
                                      log_path=root / "kmock.log").wait_ready(30)
        self.url = f"http://127.0.0.1:{port}"
        self.api = KubeAPI(self.url, namespace)
        self.kubeconfig = root / "kubeconfig.yaml"
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: kmock, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: tester, user: {token: test-token}}]\n"
            f"contexts: [{{name: test, context: {{cluster: kmock, user: tester, namespace: {namespace}}}}}]\n"
            "current-context: test\n")
        self.kubelet = TestKubelet(self.api, root)
        self.kubelet.start()
        self.operator: services.Service | None = None
        self.operator_runs = 0

    def start_operator(self, *, failpoints: str = "", interval: float = 1.0) -> services.Service:
        self.operator_runs += 1
        metrics = services.free_port()
        env = {"VSEARCH_OPERATOR_FAILPOINTS": failpoints, "VSEARCH_OPERATOR_FAILPOINTS_DIR": str(self.root)}
        self.operator = services.Service(
            "operator", services.vsearch_argv("operator", "--kubeconfig", str(self.kubeconfig),
                                              "--namespace", self.namespace, "--interval", str(interval),
                                              "--metrics-port", str(metrics)),
            port=metrics, env=env, log_path=self.root / f"operator-{self.operator_runs}.log",
            ready=lambda: services.http_ok(f"http://127.0.0.1:{metrics}/metrics")).wait_ready(60)
        return self.operator

    def kill_operator(self) -> None:
        if self.operator is not None and self.operator.alive():
            self.operator.signal(signal.SIGKILL)
            self.operator.proc.wait(10)

    def index(self, name: str) -> dict:
        return self.api.get("searchindexes", name) or {}

    def wait_for(self, name: str, predicate, timeout: float, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        obj: dict = {}
        while time.monotonic() < deadline:
            obj = self.index(name)
            if predicate(obj.get("status") or {}):
                return obj
            if self.operator is not None and not self.operator.alive():
                break
            time.sleep(0.2)
        tail = self.operator.log_tail(60) if self.operator else ""
        raise AssertionError(f"{name}: {what} not reached within {timeout:.0f}s; status "
                             f"{(obj.get('status') or {})}\noperator log:\n{tail}")

    def wait_phase(self, name: str, phase: str, timeout: float = 120, version: str | None = None) -> dict:
        def ok(st):
            return st.get("phase") == phase and (version is None or (st.get("serving") or {}).get("version") == version
                                                 or (st.get("candidate") or {}).get("version") == version)
        return self.wait_for(name, ok, timeout, f"phase {phase}" + (f" ({version})" if version else ""))

    def events(self, name: str) -> list[dict]:
        return [e for e in self.api.list("events") if (e.get("involvedObject") or {}).get("name") == name]

    def close(self) -> None:
        if self.operator is not None:
            self.operator.stop(10)
        self.kubelet.stop()
        self.kmock.stop(5)


def searchindex(name: str, *, bootstrap: str, topic: str, milvus_uri: str, alias: str, model: str,
                version: str, uri: str, **rollout) -> dict:
    return {"apiVersion": "vsearch.io/v1alpha1", "kind": "SearchIndex",
            "metadata": {"name": name},
            "spec": {"catalog": {"bootstrap": bootstrap, "topic": topic},
                     "milvus": {"uri": milvus_uri, "alias": alias, "index": {"type": "HNSW"}},
                     "model": {"name": model, "version": version, "uri": uri},
                     "embedder": {"image": "vsearch:test"},
                     # the catalogs of the tests are local files (real photos, temporary folders)
                     "ingest": {"image": "vsearch:test", "batchSize": 64, "args": ["--file-roots", "/"]},
                     "rollout": {"retentionSeconds": 3600, "backfill": {"idleSeconds": 3},
                                 "gate": {"sampleSize": 20}, **rollout}}}
