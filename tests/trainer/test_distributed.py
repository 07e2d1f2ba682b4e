"""Training on two processes (torchrun, DDP over gloo) is training on one: the same gradients,
losses and weights on the same global batch; a killed worker is restarted from the checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vsearch.cli import main
from vsearch.predictor.inference import Embedder
from vsearch.predictor.zoo import load_model_dir
from vsearch.trainer import train as train_module
from vsearch.trainer.data import DataError
from vsearch.trainer.train import TrainConfig, train

HARNESS = Path(__file__).with_name("ddp_harness.py")


def run_log(out):
    return [json.loads(line) for line in open(out / "train_log.jsonl")]


def test_two_processes_equal_one_and_a_killed_rank_resumes_from_the_checkpoint(
        photo_folder, tiny_model_dir, tmp_path, monkeypatch, photo_bytes):
    flags = ["train", "--data", str(photo_folder), "--init", str(tiny_model_dir), "--batch-size", "16",
             "--lr", "3e-3", "--warmup-steps", "1", "--max-steps", "4", "--checkpoint-every", "1",
             "--log-every", "1", "--workers", "0", "--no-progress", "--no-eval", "--version", "t", "--seed", "3"]
    # one process, here: the gradients of the first step (what AdamW is handed) and the export
    grads_one = {}
    real_step = train_module.optimiser_step

    def keep_first_grads(run):
        if run.step == 0:
            grads_one.update({n: p.grad.clone() for n, p in run.modules.named_parameters() if p.grad is not None})
        return real_step(run)
    monkeypatch.setattr(train_module, "optimiser_step", keep_first_grads)
    assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    monkeypatch.undo()

    # two processes under torchrun with the same flags; rank 1 is SIGKILLed after step 2
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--max-restarts", "1", str(HARNESS), str(tmp_path / "grads.pt"), "2",
                           *flags, "--out", str(two)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "exitcode: -9" in proc.stderr                      # the kill happened; torchrun restarted

    # the gradients after one step: the global batch's, not W times it, nothing missing
    grads_two = torch.load(tmp_path / "grads.pt")
    assert grads_two.keys() == grads_one.keys()
    flat_one = torch.cat([g.flatten() for g in grads_one.values()])
    flat_two = torch.cat([grads_two[n].flatten() for n in grads_one])
    assert float((flat_two - flat_one).norm() / flat_one.norm()) < 1e-4
    for name, g in grads_one.items():
        if g.norm() > 1e-3:                                     # (not a bias that batch norm cancels)
            assert torch.allclose(grads_two[name], g, rtol=1e-3, atol=1e-5), name

    # the restarted workers continued from the last checkpoint, and ended where one process did
    log_two = run_log(two)
    resumes = [r for r in log_two if r["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["restart"] == 1 and resumes[0]["step"] in (1, 2)
    assert resumes[0]["world_size"] == 2 and not resumes[0]["requested"]
    steps_one = [r for r in run_log(tmp_path / "one") if r["event"] == "step"]
    steps_two = [r for r in log_two if r["event"] == "step"]
    by_step = {r["step"]: r for r in steps_two}                # steps redone after the restart: last
    assert sorted(by_step) == [1, 2, 3, 4]
    assert np.allclose([r["loss"] for r in steps_one], [by_step[s]["loss"] for s in range(1, 5)], atol=1e-5)
    assert np.allclose([r["grad_norm"] for r in steps_one], [by_step[s]["grad_norm"] for s in range(1, 5)],
                       rtol=1e-3)
    a, meta_a = load_model_dir(tmp_path / "one")
    b, meta_b = load_model_dir(two)
    assert meta_b.training["processes"] == 2 and meta_b.training["resumed_at_steps"] == [resumes[0]["step"]]
    for (name, x), y in zip(a.backbone.state_dict().items(), b.backbone.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-4), name
    ea, eb = Embedder(tmp_path / "one"), Embedder(two)
    assert np.allclose(ea.embed_bytes(photo_bytes[:4]), eb.embed_bytes(photo_bytes[:4]), atol=1e-3)
    ea.close()
    eb.close()


def test_a_fresh_job_on_the_same_output_continues_and_other_settings_are_refused(
        photo_folder, tiny_model_dir, tmp_path):
    cfg = dict(data=str(photo_folder), out=str(tmp_path / "m"), init=str(tiny_model_dir), batch_size=8,
               max_steps=3, warmup_steps=1, workers=0, log_every=1, progress=False, version="t", evaluate=False)
    train(TrainConfig(**cfg, stop_after=2))
    with pytest.raises(DataError, match="other settings: lr"):
        train(TrainConfig(**{**cfg, "lr": 0.1}))
    train(TrainConfig(**cfg))                                     # the same job again: no --resume
    log = run_log(tmp_path / "m")
    assert [r["step"] for r in log if r["event"] == "resume"] == [2]
    assert [r["step"] for r in log if r["event"] == "step"] == [1, 2, 3] and log[-1]["event"] == "exported"


def test_the_launcher_hands_torchrun_the_flags_as_given(tmp_path):
    from vsearch.cli import build_parser
    from vsearch.trainer.cli import _worker_argv
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--nproc-per-node", "2",
                                      "--max-restarts", "1", "--batch-size", "64", "--no-eval"])
    assert _worker_argv(args) == ["--data", "d", "--out", "o", "--batch-size", "64", "--no-eval"]


def test_the_weighted_pair_loss_with_uneven_hard_negatives_splits_over_ranks(tmp_path):
    from tests.trainer.ddp_losses import gradients
    from vsearch.trainer.distributed import Ranks
    out = tmp_path / "grads"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).with_name("ddp_losses.py")), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = [torch.load(f"{out}.{r}") for r in (0, 1)]
    for one, (a, b) in zip(gradients(Ranks()), zip(*parts)):
        # each rank's input gradient is W x the one-process gradient of its slice: DDP's averaging
        # of the parameter gradients then gives the one-process step
        assert torch.allclose(torch.cat([a, b]) / 2, one, atol=1e-6)
