"""``vsearch demo --loop --simulate-users N --check``: one turn of the learning loop on local
processes: the default model serves real photos, simulated users search and click, torchrun
(2 processes) fine-tunes it from ``search.events``, the job's verdict decides, and a winner is
rolled out. Which way the verdict goes is the data's to say; each way must be carried through."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.fixtures.demo import leftover_processes
from vsearch.local.samples import caltech_photos
from vsearch.predictor.model_dir import default_model_dir, read_meta


def test_one_turn_of_the_loop_trains_on_the_clicks_and_rolls_out_only_a_winner(tmp_path):
    photos = caltech_photos(n_classes=4, per_class=6)
    if not photos:
        pytest.skip("needs the Caltech-101 subset in ../shared/data: the users click photos of the query's class")
    catalog = tmp_path / "catalog"
    for path, label in photos:
        (catalog / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, catalog / label / path.name)
    data_dir = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "vsearch", "demo", "--loop", "--simulate-users", "30", "--check",
                          "--train-steps", "3", "--catalog", str(catalog), "--http-port", "0",
                          "--data-dir", str(data_dir), "--ready-timeout", "240"],
                         capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode in (0, 4), out[-5000:]
    for step in ("serve", "clicks", "train", "evaluate"):
        assert f"== {step}: done" in out or f"== {step}: lost" in out, out[-5000:]
    (model,) = (data_dir / "models").iterdir()
    meta = read_meta(model)
    trained, verdict = meta.training, meta.evaluation["verdict"]
    assert trained["processes"] == 2 and trained["steps"] == 3                 # torchrun, 2 processes
    assert trained["data"]["kind"] == "pairs" and trained["data"]["held_out_pairs"] > 0
    assert trained["data"]["catalog"]["images"] == 24
    serving = read_meta(default_model_dir())
    assert verdict["serving"] == f"{serving.name}:{serving.version}"
    summary = out[out.index("the loop, step by step:"):]
    if run.returncode == 4:
        lost = [line for line in verdict["text"].splitlines() if "DOES NOT BEAT" in line]
        assert verdict["beats_all"] is False and lost and lost[0] in out, out[-4000:]
        assert f"{serving.name}:{serving.version} still serves" in summary, summary
    else:
        assert verdict["beats_all"] is True
        assert "[Switched]" in out and "gate: Passed" in out, out[-4000:]
        assert f"answered by {meta.name.replace('-', '_')}__{meta.version.replace('-', '_')}" in out, out[-3000:]
        assert "rollout   done" in summary, summary
    assert not leftover_processes(str(data_dir))
