"""``vsearch demo --loop --simulate-users N --check``: one turn of the learning loop on local
processes: a model serves real photos, simulated users search and click, torchrun (2
processes) fine-tunes it from ``search.events``, the job's verdict decides, and a winner is
rolled out. The serving model is the default one with its whitening cut to 2 dimensions (what a
retraining re-fits), so the trained model wins and the whole turn, rollout included, runs; the
losing side (exit 4, serving stays) is the operator's test of the same verdict
(tests/operators/test_training.py) and the README's run."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.fixtures.demo import leftover_processes
from tests.fixtures.operators import model_copy, wrecked_whitening
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
    serving_dir = model_copy(default_model_dir(), tmp_path / "serving", "w1")
    wrecked_whitening(serving_dir)
    run = subprocess.run([sys.executable, "-m", "vsearch", "demo", "--loop", "--simulate-users", "30", "--check",
                          "--model-dir", str(serving_dir),
                          "--train-steps", "3", "--catalog", str(catalog), "--http-port", "0",
                          "--data-dir", str(data_dir), "--ready-timeout", "240"],
                         capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-5000:]
    for step in ("serve", "clicks", "train", "evaluate", "rollout"):
        assert f"== {step}: done" in out, out[-5000:]
    (model,) = (data_dir / "models").iterdir()
    meta = read_meta(model)
    trained, verdict = meta.training, meta.evaluation["verdict"]
    assert trained["processes"] == 2 and trained["steps"] == 3                 # torchrun, 2 processes
    assert trained["data"]["kind"] == "pairs" and trained["data"]["held_out_pairs"] > 0
    assert trained["data"]["catalog"]["images"] == 24
    serving = read_meta(serving_dir)
    assert verdict["serving"] == f"{serving.name}:{serving.version}"
    summary = out[out.index("the loop, step by step:"):]
    assert verdict["beats_all"] is True and verdict["beats_serving"] is True, verdict["text"]
    assert "[Switched]" in out and "gate: Passed" in out, out[-4000:]
    assert f"answered by {meta.name.replace('-', '_')}__{meta.version.replace('-', '_')}" in out, out[-3000:]
    assert "rollout   done" in summary, summary
    assert not leftover_processes(str(data_dir))


def test_the_loop_arguments_are_checked_before_anything_starts(tmp_path):
    from vsearch.core.config import UsageError
    from vsearch.local.demo import check_arguments
    common = dict(model_dir=None, catalog=None, data_dir=str(tmp_path), port=0, rollout=None, golden=None)
    with pytest.raises(UsageError, match="--loop trains from clicks: give --simulate-users N"):
        check_arguments(**common, loop=True)
    with pytest.raises(UsageError, match="--loop rolls out the model it trains"):
        check_arguments(**{**common, "rollout": str(default_model_dir())}, loop=True, simulate_users=5)
    with pytest.raises(UsageError, match="--train-steps 0"):
        check_arguments(**common, loop=True, simulate_users=5, train_steps=0)
    plan = check_arguments(**common, loop=True, simulate_users=5, experiment="ab", train_steps=7)
    assert plan.loop and plan.simulate_users == 5 and plan.train_steps == 7 and plan.experiment == "ab"
