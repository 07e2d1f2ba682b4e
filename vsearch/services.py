"""Start and stop the local processes the platform runs on one machine (tests, demo,
benchmarks): each one on a free 127.0.0.1 port, ready-checked, stopped cleanly.

The one place for process start-up: tests, ``vsearch demo`` and ``bench/`` all use it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Sequence


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
    except Exception:
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
