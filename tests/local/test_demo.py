"""``vsearch demo --check``: every part as its own process (broker, milvus-lite server, embedder,
consumer, search service), a catalog published through Kafka, one query end to end, and a clean
stop of everything."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from tests.fixtures.demo import leftover_processes, small_catalog, stop_demo
from tests.fixtures.waiting import wait_until


@pytest.mark.slow
def test_demo_check_runs_the_platform_end_to_end(tmp_path, tiny_model_dir):
    catalog = small_catalog(tmp_path)
    data_dir = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "vsearch", "demo", "--check", "--http-port", "0",
                          "--model-dir", str(tiny_model_dir), "--catalog", str(catalog),
                          "--data-dir", str(data_dir), "--ready-timeout", "180"],
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "9/9" in out.stdout and "demo check passed" in out.stdout
    assert "events on search.events" in out.stdout and "['click', 'impression']" in out.stdout
    assert "stopped: search, consumer, embedder, milvus-lite, tansu" in out.stdout
    # the query images the events point at were kept
    assert any((data_dir / "queries").rglob("*.jpg"))
    logs = data_dir / "logs"
    assert {p.name for p in logs.iterdir()} >= {"broker.log", "milvus.log", "embedder.log",
                                                 "consumer.log", "search.log"}
    # nothing left running: no process still has the demo's data folder on its command line
    assert not leftover_processes(str(data_dir))


@pytest.mark.slow
def test_demo_serves_until_ctrl_c_then_stops_everything(tmp_path, tiny_model_dir):
    catalog = small_catalog(tmp_path)
    data_dir = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "vsearch", "demo", "--http-port", "0",
                             "--model-dir", str(tiny_model_dir), "--catalog", str(catalog),
                             "--data-dir", str(data_dir), "--ready-timeout", "180"],
                            stdout=subprocess.PIPE, stderr=(tmp_path / "demo.err").open("w"), text=True)
    lines = []
    try:
        url = None

        def ready() -> bool:        # the demo announces its URL, then how to stop it (or exits)
            nonlocal url
            line = proc.stdout.readline()
            lines.append(line)
            if "Visual search is up:" in line:
                url = line.split("up:", 1)[1].strip().rstrip("/")
            return not line or "Press Ctrl-C" in line

        wait_until(ready, 300, 0, message=None)
        assert url, "".join(lines)
        photo = next(catalog.rglob("*.jpg"))
        resp = requests.post(f"{url}/search", files={"image": ("q.jpg", photo.read_bytes())},
                             data={"k": "3"}, timeout=60)
        assert resp.status_code == 200 and resp.json()["results"][0]["score"] > 0.999
        assert requests.get(f"{url}/", timeout=10).status_code == 200
        rest = stop_demo(proc, tmp_path / "demo.err", str(data_dir))
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "stopping" in out and "stopped: search, consumer, embedder, milvus-lite, tansu" in out
    assert not leftover_processes(str(data_dir))
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/", timeout=5)
