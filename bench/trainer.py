"""Trainer throughput: SimCLR training images/s (2 views per photo count as 2 images) of the
default backbone, for

- bare:      forward + NT-Xent + backward + AdamW step on pre-made random tensors (the ceiling),
- augment:   the data pipeline alone: random views of cached photos (PIL), views/s,
- loop w=0:  the real training loop (trainer.train) with augmentation in the training process,
- loop w=1:  the same with one data-loader process preparing the next batches.

    python -m bench.trainer [--arch resnet-tiny] [--image-size 96] [--batch 64] [--steps 6]

Runs on the CPU, and on CUDA too when present. The ratio loop/bare shows what the data
pipeline and the loop cost on top of the network itself. Each figure is the best of
``--repeat`` rounds (the rounds interleave the variants, so a busy neighbour on a shared
machine hits them alike).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from vsearch.predictor.model import build_model
from vsearch.samples import photos
from vsearch.trainer.augment import SimCLRAugment, training_image
from vsearch.trainer.losses import nt_xent
from vsearch.trainer.train import ProjectionHead, TrainConfig, train


def photo_folder(tmp: Path, n: int) -> Path:
    """A folder of n real photos (Caltech-101 when present, generated ones otherwise)."""
    folder = tmp / "photos" / "all"
    folder.mkdir(parents=True)
    for i, data in enumerate(photos(n, step=5)):
        (folder / f"{i:04d}.jpg").write_bytes(data)
    return folder.parent


def bench_bare(arch: str, size: int, batch: int, steps: int, device: str) -> float:
    net, meta = build_model(arch, image_size=size)
    head = ProjectionHead(meta.embedding_dim, 512, 128)
    mods = torch.nn.ModuleList([net, head]).to(device).train()
    opt = torch.optim.AdamW(mods.parameters(), lr=1e-3)
    x = torch.randn(2 * batch, 3, size, size, device=device)

    def step():
        z = head(net(x))
        loss = nt_xent(*z.chunk(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    step()                                                    # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * batch * steps / (time.perf_counter() - t0)


def bench_augment(folder: Path, arch: str, size: int, n_views: int) -> float:
    _, meta = build_model(arch, image_size=size)
    images = [training_image(p.read_bytes(), meta.preprocess) for p in sorted(folder.rglob("*.jpg"))]
    aug, rng = SimCLRAugment(meta.preprocess), random.Random(0)
    t0 = time.perf_counter()
    for i in range(n_views):
        aug(images[i % len(images)], rng)
    return n_views / (time.perf_counter() - t0)


def bench_loop(folder: Path, out: Path, arch: str, size: int, batch: int, steps: int,
               workers: int, device: str) -> float:
    """Images/s of the real loop, from its run log (the first logged interval is left out: it
    includes start-up)."""
    cfg = TrainConfig(data=str(folder), out=str(out), arch=arch, image_size=size, batch_size=batch,
                      max_steps=steps + 1, workers=workers, device=device, log_every=1,
                      progress=False, checkpoint_every=10_000)
    train(cfg)
    import json
    rates = [json.loads(line) for line in open(out / "train_log.jsonl")]
    rates = [r["images_per_s"] for r in rates if r["event"] == "step"][1:]
    return sum(rates) / len(rates)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet-tiny")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch", type=int, default=64, help="photos per step (x2 views)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3, help="rounds; the best of each is kept")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"arch {args.arch}, {args.image_size} px, batch {args.batch} photos = {2 * args.batch} views, "
          f"{args.steps} steps, torch threads {torch.get_num_threads()}, best of {args.repeat}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = photo_folder(tmp, max(2 * args.batch, 128))
        best: dict[tuple[str, str], float] = {}

        def keep(key, value):
            best[key] = max(best.get(key, 0.0), value)
        for rnd in range(args.repeat):
            keep(("cpu", "augment (views/s, 1 core)"),
                 bench_augment(folder, args.arch, args.image_size, 4 * args.batch))
            for dev in devices:
                keep((dev, "bare fwd+bwd on tensors"),
                     bench_bare(args.arch, args.image_size, args.batch, args.steps, dev))
                for w in (0, 1):
                    keep((dev, f"training loop, workers={w}"),
                         bench_loop(folder, tmp / f"run-{dev}-{w}-{rnd}", args.arch, args.image_size,
                                    args.batch, args.steps, w, dev))
        for (dev, what), r in best.items():
            bare = best.get((dev, "bare fwd+bwd on tensors"))
            rows.append((dev, what, r, None if what.startswith("augment") else r / bare))
    print(f"{'device':<7} {'what':<28} {'images/s':>10} {'vs bare':>8}")
    for dev, what, r, ratio in rows:
        print(f"{dev:<7} {what:<28} {r:>10.1f} {'' if ratio is None else f'{ratio:.2f}x':>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
