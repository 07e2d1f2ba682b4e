"""``vsearch demo --rollout MODEL_DIR --check``: the demo on local processes, then a blue-green
rollout of another model (another embedding size) through the operator's own rollout logic on
local processes (:class:`vsearch.local.workloads.LocalWorkloads`)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.fixtures.demo import leftover_processes, small_catalog
from tests.fixtures.operators import golden_csv, model_copy
from vsearch.local.samples import caltech_photos
from vsearch.predictor.model_dir import default_model_dir
from vsearch.predictor.zoo import init_model_dir


def test_demo_rollout_switches_to_the_new_model(tmp_path, tiny_model_dir):
    """The candidate passes the default gate: a copy of the trained default model (another
    architecture and embedding size than the tiny serving one) carrying its offline verdict."""
    catalog = small_catalog(tmp_path)
    candidate = model_copy(default_model_dir(), tmp_path / "candidate", "9")
    data_dir = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "vsearch", "demo", "--catalog", str(catalog), "--model-dir",
                          str(tiny_model_dir), "--rollout", str(candidate), "--check",
                          "--http-port", "0", "--data-dir", str(data_dir), "--ready-timeout", "240"],
                         capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    for phase in ("Deploying", "Backfilling", "Verifying", "Switching", "Switched"):
        assert f"[{phase}]" in out, out[-3000:]
        # said once: not again by the operator's log line or the progress line
        assert out.count(f" {phase}: ") == 0, out[-3000:]
    backfill = out[out.index("[Backfilling]"):].splitlines()
    assert backfill[0].split("] ", 1)[1] not in "\n".join(backfill[1:]), out[-3000:]
    # a clean stop: no refused reconnects of the rollout's Kafka clients, no gRPC GOAWAY
    assert "ECONNREFUSED" not in out and "ERROR kafka" not in out and "GOAWAY" not in out, out[-3000:]
    assert "gate: Passed" in out and "offline verdict of vsearch-default:9: beats baselines" in out, out[-3000:]
    assert "answered by vsearch_default__9 (images__vsearch_default__9__" in out, out[-2000:]
    assert not leftover_processes(str(data_dir))

    # the next plain demo in the same folder serves its own model again, not the rolled-out alias
    again = subprocess.run([sys.executable, "-m", "vsearch", "demo", "--catalog", str(catalog), "--model-dir",
                            str(tiny_model_dir), "--check", "--http-port", "0", "--data-dir", str(data_dir),
                            "--ready-timeout", "120"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert not leftover_processes(str(data_dir))


def test_demo_rollout_exits_3_when_the_gate_refuses_and_blue_keeps_serving(tmp_path):
    """A random-initialised candidate against a golden set built from the catalog's classes,
    served blue by the trained default model."""
    photos = caltech_photos(n_classes=5, per_class=6)
    if not photos:
        pytest.skip("needs the Caltech-101 subset in ../shared/data for classes to judge by")
    catalog = tmp_path / "catalog"
    ids = []
    for path, label in photos:
        (catalog / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, catalog / label / path.name)
        ids.append((f"{label}/{path.stem}", label))
    golden = tmp_path / "golden.csv"
    golden.write_text(golden_csv(ids, every=3))
    random_dir = tmp_path / "random"
    init_model_dir("resnet-tiny", random_dir, name="vsearch-default", version="random", seed=7)
    data_dir = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "vsearch", "demo", "--catalog", str(catalog), "--model-dir",
                          str(default_model_dir()), "--rollout", str(random_dir), "--golden", str(golden),
                          "--check", "--http-port", "0", "--data-dir", str(data_dir), "--ready-timeout", "240"],
                         capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 3, out[-4000:]
    assert "gate: Failed" in out and "rollout refused" in out and "still serves" in out, out[-3000:]
    assert not leftover_processes(str(data_dir))
