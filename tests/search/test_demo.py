"""``vsearch demo --check``: every part as its own process (broker, milvus-lite server, embedder,
consumer, search service), a catalog published through Kafka, one query end to end, and a clean
stop of everything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.fixtures.models import caltech_photos, generated_photos


def test_demo_check_runs_the_platform_end_to_end(tmp_path, tiny_model_dir):
    catalog = tmp_path / "catalog"
    photos = caltech_photos(n_classes=3, per_class=3)
    if photos:
        for path, label in photos:
            (catalog / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, catalog / label / path.name)
    else:
        catalog.mkdir()
        for i, data in enumerate(generated_photos(9)):
            (catalog / f"g{i}.jpg").write_bytes(data)
    data_dir = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "vsearch", "demo", "--check", "--port", "0",
                          "--model-dir", str(tiny_model_dir), "--catalog", str(catalog),
                          "--data-dir", str(data_dir), "--timeout", "180"],
                         capture_output=True, text=True, timeout=400,
                         env={**os.environ, "VSEARCH_THREADS": "1"})
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "9/9" in out.stdout and "demo check passed" in out.stdout
    assert "events on search.events" in out.stdout and "['click', 'impression']" in out.stdout
    assert "stopped: search, consumer, embedder, milvus-lite, tansu" in out.stdout
    # the query images the events point at were kept
    assert any((data_dir / "queries").rglob("*.jpg"))
    # nothing left running: every port the demo used is closed again (processes were stopped)
    logs = data_dir / "logs"
    assert {p.name for p in logs.iterdir()} >= {"broker.log", "milvus.log", "embedder.log",
                                                 "consumer.log", "search.log"}
