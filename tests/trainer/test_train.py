"""The training loop on real photos: the loss goes down, the export serves, resume resumes."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from vsearch.cli import main
from vsearch.local.services import start_embedder, vsearch_argv
from vsearch.predictor.client import EmbedderClient
from vsearch.predictor.inference import Embedder
from vsearch.predictor.model_dir import read_meta
from vsearch.predictor.zoo import load_model_dir
from vsearch.trainer.train import TrainConfig, lr_lambda, train


def steps_of(out):
    return [json.loads(line) for line in open(out / "train_log.jsonl")
            if json.loads(line)["event"] == "step"]


def config(data, out, tiny_model_dir, **kw):
    base = dict(data=str(data), out=str(out), init=str(tiny_model_dir), batch_size=16, lr=3e-3,
                warmup_steps=2, workers=0, log_every=1, progress=False, version="t1")
    return TrainConfig(**{**base, **kw})


def test_simclr_loss_goes_down_and_the_export_is_a_model_directory(photo_folder, tiny_model_dir, tmp_path):
    # every step sees all 32 photos (two views each), so the loss trend is not batch noise
    out = train(config(photo_folder, tmp_path / "m", tiny_model_dir, max_steps=30, batch_size=32))
    losses = [s["loss"] for s in steps_of(out)]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.15, losses
    assert all(s["images_per_s"] > 0 for s in steps_of(out))

    net, meta = load_model_dir(out)                     # the serving loader, projection head gone
    assert not any("head" in k for k in net.state_dict())
    assert meta.version == "t1" and meta.training["method"] == "simclr-nt-xent"
    assert meta.training["steps"] == 30 and meta.training["data"]["train_images"] == 32
    before, _ = load_model_dir(tiny_model_dir)
    changed = [not torch.equal(a, b) for a, b in zip(net.state_dict().values(), before.state_dict().values())]
    assert any(changed)


def test_resume_continues_from_the_checkpoint_to_the_same_weights(photo_folder, tiny_model_dir, tmp_path):
    kw = dict(max_steps=8, checkpoint_every=3, seed=5)
    whole = train(config(photo_folder, tmp_path / "whole", tiny_model_dir, **kw))

    part = tmp_path / "part"
    out = train(config(photo_folder, part, tiny_model_dir, stop_after=5, **kw))
    assert not (out / "config.json").exists()           # stopped: nothing exported yet
    assert (part / "checkpoints" / "last.pt").exists()
    train(config(photo_folder, part, tiny_model_dir, resume=True, **kw))

    events = [json.loads(line)["event"] for line in open(part / "train_log.jsonl")]
    assert events.count("resume") == 1 and events[-1] == "exported"
    assert [s["step"] for s in steps_of(part)] == list(range(1, 9))
    a, _ = load_model_dir(whole)
    b, _ = load_model_dir(part)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-5), name
    losses_whole = [s["loss"] for s in steps_of(whole)]
    losses_part = [s["loss"] for s in steps_of(part)]
    assert np.allclose(losses_whole, losses_part, atol=1e-4)


def test_gradient_accumulation_and_loader_processes_see_the_same_views(photo_folder, tiny_model_dir, tmp_path):
    kw = dict(max_steps=2, batch_size=8, accum_steps=2, warmup_steps=0)
    inline = train(config(photo_folder, tmp_path / "w0", tiny_model_dir, workers=0, **kw))
    forked = train(config(photo_folder, tmp_path / "w1", tiny_model_dir, workers=1, **kw))
    a, b = steps_of(inline), steps_of(forked)
    assert [s["step"] for s in a] == [1, 2]
    assert [s["epoch"] for s in a] == [0.5, 1.0]          # 2 micro-batches of 8 per step, 32 photos
    assert np.allclose([s["loss"] for s in a], [s["loss"] for s in b], atol=1e-4)
    assert read_meta(inline).training["accum_steps"] == 2


@pytest.mark.parametrize("arch", ["vit-small", "dinov2-small", "clip-vit-b32"])
def test_every_family_fine_tunes_and_exports(photo_folder, model_dirs, tmp_path, arch):
    out = train(config(photo_folder, tmp_path / arch, model_dirs[arch], max_steps=1, batch_size=8))
    net, meta = load_model_dir(out)
    before, _ = load_model_dir(model_dirs[arch])
    assert meta.family == read_meta(model_dirs[arch]).family
    assert any(not torch.equal(a, b) for a, b in zip(net.state_dict().values(), before.state_dict().values()))


def test_resume_without_a_checkpoint_says_so(photo_folder, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        train(config(photo_folder, tmp_path / "x", tiny_model_dir, max_steps=2, resume=True))


def test_a_finished_model_is_never_overwritten_by_a_new_run(photo_folder, tiny_model_dir):
    with pytest.raises(ValueError, match="already holds a model"):
        train(config(photo_folder, tiny_model_dir, tiny_model_dir, max_steps=1))


@pytest.mark.slow
def test_cli_trains_from_scratch_evaluates_the_held_out_split_and_the_export_serves_over_http(
        photo_folder, tmp_path, photo_bytes):
    out = tmp_path / "cli-model"
    proc = subprocess.run(
        vsearch_argv("train", "--data", str(photo_folder), "--out", str(out), "--arch", "resnet-tiny",
                     "--image-size", "32", "--max-steps", "3", "--batch-size", "8", "--holdout", "0.25",
                     "--workers", "0", "--threads", "2", "--version", "7", "--no-progress"),
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "map@r" in proc.stdout and "raw-pixels" in proc.stdout and "random-init" in proc.stdout

    meta = read_meta(out)
    assert (meta.arch, meta.image_size, meta.version) == ("resnet-tiny", 32, "7")
    assert meta.training["data"]["held_out_images"] == 8        # 2 of each class's 8
    assert meta.evaluation["data"]["split"] == "held-out"
    assert meta.evaluation["queries_evaluated"] == 8
    assert set(meta.evaluation["baselines"]) == {"raw-pixels", "random-init"}
    assert (out / "evaluation" / "report.json").exists() and (out / "evaluation" / "report.png").exists()
    # the verdict against both baselines: printed, in the metadata for the gate, in the run log
    verdict = meta.evaluation["verdict"]
    assert isinstance(verdict["beats_baselines"], bool)
    assert verdict["text"] in proc.stdout
    logged = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert logged[-1]["event"] == "evaluation" and logged[-1]["verdict"]["text"] == verdict["text"]
    # the whitening fitted on the 24 training images is part of the served model
    assert meta.whitening["fitted_on"].startswith("24 training images")
    assert (out / "whitening.safetensors").exists()

    local = Embedder(out)
    expected = local.embed_bytes(photo_bytes[:3])
    svc = start_embedder(out, extra=("--threads", "1"))
    try:
        got = EmbedderClient(svc.url).embed_bytes(photo_bytes[:3])
    finally:
        svc.stop()
    assert got.shape == (3, meta.embedding_dim)
    assert np.allclose(got, expected, atol=1e-4)


def test_cli_rejects_unusable_data_with_a_reason(tmp_path, capsys):
    bad = tmp_path / "labels.csv"
    bad.write_text("path,label\na.jpg,x\n")
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "labels CSV" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "neither a folder" in capsys.readouterr().err


def test_warmup_then_cosine_schedule():
    f = lr_lambda(warmup=4, total=14)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.5)
    assert f(14) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(4, 14))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch should-never-exist",))


def test_resume_loads_tensors_only_never_code(photo_folder, tiny_model_dir, tmp_path, monkeypatch):
    """A checkpoint that would run code when unpickled is refused (``weights_only=True``)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"modules": {}, "payload": _RunsCode()}, out / "checkpoints" / "last.pt")
    with pytest.raises(ValueError, match="more than tensors"):
        train(config(photo_folder, out, tiny_model_dir, max_steps=2, resume=True))
    assert not (tmp_path / "should-never-exist").exists()


def test_fine_tuning_is_compared_with_the_model_it_started_from_and_can_skip_whitening(
        photo_folder, tiny_model_dir, tmp_path):
    out = train(config(photo_folder, tmp_path / "ft", tiny_model_dir, max_steps=2, batch_size=8,
                       holdout=0.25, whiten=False))
    meta = read_meta(out)
    assert meta.whitening is None and not (out / "whitening.safetensors").exists()
    assert list(meta.evaluation["other_models"]) == ["tiny-resnet18:1"]
    against = meta.evaluation["verdict"]["against"]
    assert set(against) == {"tiny-resnet18:1", "raw-pixels 32x32", "random-init resnet18"}
    assert against["tiny-resnet18:1"]["kind"] == "model"
