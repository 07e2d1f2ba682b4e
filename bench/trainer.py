"""Trainer throughput, retrieval quality and query latency.

Throughput: SimCLR training images/s (2 views per photo count as 2 images) of the
default backbone, for

- bare:      forward + NT-Xent + backward + AdamW step on pre-made random tensors (the ceiling),
- augment:   the data pipeline alone: random views of cached photos (PIL), views/s,
- loop w=0:  the real training loop (trainer.train) with augmentation in the training process,
- loop w=1:  the same with one data-loader process preparing the next batches.

    python -m bench.trainer [--arch resnet-small] [--image-size 64] [--batch 64] [--steps 6]

Runs on the CPU, and on CUDA too when present. The ratio loop/bare shows what the data
pipeline and the loop cost on top of the network itself. Each figure is the best of
``--repeat`` rounds (the rounds interleave the variants, so a busy neighbour on a shared
machine hits them alike).

Scaling (``--part scaling``): the real loop (``vsearch train``, SimCLR) under torchrun with 1 and
2 processes on the CPU, one torch thread each, the same global batch (each of 2 processes
computes half of it: DDP over gloo, negatives gathered from both); images/s and the scaling
efficiency, images/s of N processes / (N x images/s of 1); and images per CPU-second of one
process (its share of the batch over its own CPU time) with its ratio to one process: the cost
of the distribution itself (gathers, global batch norm, gradient all-reduce), which a busy
shared machine does not distort as it does the wall-clock figures.

    python -m bench.trainer --part scaling [--procs 1,2] [--arch resnet-small] [--batch 64] [--steps 6]

Quality: for each collection of :mod:`bench.collections` (images unlike Caltech-101), the
documented fine-tuning recipe ``vsearch train --init MODEL --data <collection> --holdout 0.3``
(the code defaults, nothing else set) and, on the 30 % held out, mAP@R, recall@1 and nDCG@10
of raw pixels, the random-init network, the untouched MODEL and the fine-tuned one, with the
minutes the fine-tune took (its validation included, the labelled evaluation left out), and
what its label-free selection exported; plus MODEL on the Caltech-101 held-out split it was
trained for. ``--study`` keeps every validated step and prints, per collection, the Spearman
correlation of the validation signal with the labelled mAP@R over the candidates (steps x
whitening variants) and what the signal picks against the labelled best.

Latency: one query embed (JPEG bytes -> L2-normalised vector, ``Embedder.embed_bytes`` on one
photo, the optimised serving path) per model, median and 90th percentile over 3 x 200
photos, the models taking turns photo by photo.

    python -m bench.trainer --part quality,latency [--model-dir models/default]
        [--collections digits,shapes,textures,scenes] [--compare-dir OLD_MODEL_DIR] [--study]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import collections as coll
from vsearch.local.samples import CALTECH
from vsearch.local.samples import photos as sample_photos
from vsearch.predictor.inference import Embedder, set_torch_threads
from vsearch.predictor.model_dir import default_model_dir, read_meta
from vsearch.predictor.zoo import build_model
from vsearch.trainer.augment import SimCLRAugment, training_image
from vsearch.trainer.evaluate import evaluate_models
from vsearch.trainer.losses import nt_xent
from vsearch.trainer.train import ProjectionHead, TrainConfig, train


def photo_folder(tmp: Path, n: int) -> Path:
    """A folder of n real photos (Caltech-101 when present, generated ones otherwise)."""
    folder = tmp / "photos" / "all"
    folder.mkdir(parents=True)
    for i, data in enumerate(sample_photos(n, step=5)):
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
    rates = [json.loads(line) for line in open(out / "train_log.jsonl")]
    rates = [r["images_per_s"] for r in rates if r["event"] == "step"][1:]
    return sum(rates) / len(rates)


# --------------------------------------------------------------------------- scaling

def bench_processes(folder: Path, out: Path, nproc: int, arch: str, size: int, batch: int,
                    steps: int) -> tuple[float, float]:
    """Images/s of ``vsearch train`` on ``nproc`` CPU processes (torchrun, 1 thread each), and
    images per CPU-second of one process (rank 0's own images over its CPU time: what the
    processes cost, whatever else the machine runs), from rank 0's run log (the first logged
    interval left out: it includes start-up)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--module", "vsearch", "train", "--data", str(folder), "--out", str(out), "--arch", arch,
           "--image-size", str(size), "--batch-size", str(batch), "--max-steps", str(steps + 1),
           "--log-every", "1", "--workers", "0", "--threads", "1", "--device", "cpu", "--no-progress",
           "--no-eval", "--no-whiten", "--checkpoint-every", "100000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    steps_logged = [r for r in map(json.loads, open(out / "train_log.jsonl")) if r["event"] == "step"][1:]
    return (float(np.mean([r["images_per_s"] for r in steps_logged])),
            float(np.mean([r["images_per_cpu_s"] for r in steps_logged])))


def scaling(args) -> None:
    procs = [int(x) for x in args.procs.split(",")]
    print(f"arch {args.arch}, {args.image_size} px, global batch {args.batch} photos = {2 * args.batch} views, "
          f"{args.steps} steps, CPU, 1 torch thread per process, best of {args.repeat}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    best: dict[int, float] = {}
    per_cpu: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = photo_folder(tmp, max(2 * args.batch, 128))
        for rnd in range(args.repeat):
            for n in procs:
                r, c = bench_processes(folder, tmp / f"run-{n}-{rnd}", n, args.arch, args.image_size, args.batch,
                                       args.steps)
                best[n], per_cpu[n] = max(best.get(n, 0.0), r), max(per_cpu.get(n, 0.0), c)
    one = procs[0]
    print(f"{'processes':>9} {'images/s':>10} {'speed-up':>9} {'efficiency':>10} {'img/CPU-s':>10} {'CPU eff.':>9}")
    for n in procs:
        print(f"{n:>9} {best[n]:>10.1f} {best[n] / best[one]:>8.2f}x {best[n] / (n * best[one] / one):>10.2f} "
              f"{per_cpu[n]:>10.1f} {per_cpu[n] / per_cpu[one]:>9.2f}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


# --------------------------------------------------------------------------- quality

ROLES = {"raw-pixels": "raw pixels 32x32", "random-init": "random init"}


def _row(collection, role, result, minutes=None):
    m = result["metrics"]
    return {"collection": collection, "model": role, "name": result["name"], "map@r": m["map@r"],
            "recall@1": m["recall@1"], "ndcg@10": m["ndcg@10"], "minutes": minutes}


def quality_rows(model_dir: Path, collections: list[str], root: Path,
                 epochs: float | None = None, study: bool = False, **recipe_kw) -> list[dict]:
    """Caltech-101 held-out for ``model_dir``, then per collection: raw pixels, random init, the
    untouched model and the model fine-tuned with the default recipe (``epochs`` shortens it,
    for tests; ``recipe_kw`` are more TrainConfig fields). With ``study`` every validated step
    is kept and :func:`signal_study` correlates the validation signal with the labelled mAP@R
    (outside the minutes)."""
    rows = []
    if (CALTECH / "labels.csv").exists():
        rep = evaluate_models([str(model_dir)], str(CALTECH), split="held-out", holdout=0.3,
                              baselines=["raw-pixels", "random-init"])
        for r in rep["results"]:
            rows.append(_row("caltech101", ROLES.get(r["kind"], "default model"), r))
        rows[-3]["verdict"] = rep["verdicts"][0]["beats_baselines"]
    for name in collections:
        folder = coll.write(name, root / "collections" / name)
        out = root / "finetuned" / name
        t0 = time.time()
        recipe = {**({"epochs": epochs} if epochs else {}), **recipe_kw}
        cfg = TrainConfig(data=str(folder), out=str(out), init=str(model_dir), holdout=0.3,
                          workers=1, progress=False, keep_validated=study, **recipe)
        train(cfg)
        rep = json.loads((out / "evaluation" / "report.json").read_text())   # the trainer's own
        minutes = (time.time() - t0 - rep["wall_s"]) / 60                      # evaluation left out
        res = {r["kind"] if r["kind"] != "model" else ("fine-tuned" if r["model_dir"] == str(out)
                                                        else "default"): r for r in rep["results"]}
        v = rep["verdicts"][0]
        sel = (read_meta(out).training or {}).get("selection")
        rows += [_row(name, "raw pixels 32x32", res["raw-pixels"]),
                 _row(name, "random init", res["random-init"]),
                 _row(name, "default model", res["default"]),
                 {**_row(name, "fine-tuned (default recipe)", res["fine-tuned"], minutes),
                  "verdict": v["beats_all"], "chosen": sel["chosen"] if sel else "last step",
                  "kept_start": bool(sel and sel["kept_start"])}]
        if study:
            rows[-1]["study"] = signal_study(cfg, out)
    return rows


def signal_study(cfg: TrainConfig, out: Path) -> dict:
    """Does the validation signal order the candidates as the labelled held-out mAP@R does?
    Every validated step of the run (kept by ``keep_validated``) x the whitening variants the
    export chooses among (and the starting model's own): the signal on the run's validation
    images (the trainer's own code) and mAP@R on the labelled 30 % held out; Spearman's rho over
    all candidates and over the steps alone (no whitening), and the labelled mAP@R of what the
    signal picks against the best one."""
    from scipy.stats import spearmanr

    from vsearch.predictor.zoo import fit_whitening, load_model_dir
    from vsearch.trainer import validation
    from vsearch.trainer.data import list_images, split_holdout
    from vsearch.trainer.metrics import evaluate_embeddings
    from vsearch.trainer.train import RunLog, Validator, catalog_sources, load_data
    start, start_meta = load_model_dir(cfg.init)
    meta = load_model_dir(cfg.init)[1]
    data = load_data(cfg, meta, RunLog(None))             # the run's validation images, augmentation, size
    val = Validator(cfg, data, RunLog(None), out)
    held = [r for r in split_holdout(list_images(cfg.data), cfg.holdout, cfg.split_seed)[1] if r.label]
    held_images = [training_image(Path(r.source).read_bytes(), start_meta.preprocess) for r in held]
    labels = [r.label for r in held]
    train_images = [data.dataset.cache[s] for s in catalog_sources(cfg, data.dataset)]
    rows = []
    steps = sorted(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("step-*.pt"))
    for step in steps:
        net, pre = (start, start_meta.preprocess) if step == 0 else (load_model_dir(cfg.init)[0], meta.preprocess)
        own = net.whitening
        if step:
            net.load_state_dict(torch.load(out / "checkpoints" / f"step-{step}.pt", weights_only=True))
        net.whitening = None
        feats_held = validation.features(net, validation.serving_batch(held_images, pre))
        feats_train = validation.features(net, validation.serving_batch(train_images, pre))
        variants = {"none": None, **{f"shrinkage {s:g}": fit_whitening(feats_train.numpy(), s)
                                     for s in sorted({*cfg.whiten_choices, cfg.whiten_shrinkage})}}
        if step == 0 and own is not None:
            variants["start"] = own
        feats_val = val.features(net, pre)                  # the trainer's own measure (gallery too)
        for wname, w in variants.items():
            sig = val.measure(net, pre, w, feats_val)
            lab = evaluate_embeddings(validation.embed(feats_held, w).numpy(), labels)["metrics"]["map@r"]
            rows.append({"step": step, "whitening": wname, "signal": sig["score"], "view_map": sig["view_map"],
                         "map@r": lab})
    plain = [r for r in rows if r["whitening"] == "none"]

    def rho(rs, key="signal"):
        return float(spearmanr([r[key] for r in rs], [r["map@r"] for r in rs])[0]) if len(rs) > 2 else float("nan")
    picked = max(rows, key=lambda r: r["signal"])
    best = max(rows, key=lambda r: r["map@r"])
    return {"candidates": rows, "rho_all": rho(rows), "rho_steps": rho(plain),
            "rho_all_view_map": rho(rows, "view_map"), "rho_steps_view_map": rho(plain, "view_map"),
            "signal_pick": picked, "labelled_best": best}


def print_study(rows: list[dict]) -> None:
    for r in rows:
        st = r.get("study")
        if not st:
            continue
        print(f"\n{r['collection']}: signal vs labelled mAP@R over {len(st['candidates'])} candidates "
              f"(steps x whitening): Spearman {st['rho_all']:.2f} (steps alone, no whitening: {st['rho_steps']:.2f}); "
              f"the view-agreement mAP instead: {st['rho_all_view_map']:.2f} / {st['rho_steps_view_map']:.2f}")
        p, b = st["signal_pick"], st["labelled_best"]
        print(f"  signal picks step {p['step']} {p['whitening']} (mAP@R {p['map@r']:.4f}); labelled best: "
              f"step {b['step']} {b['whitening']} ({b['map@r']:.4f})")
        for c in st["candidates"]:
            print(f"  step {c['step']:>4} {c['whitening']:<14} signal {c['signal']:.4f} view-mAP {c['view_map']:.4f} "
                  f"mAP@R {c['map@r']:.4f}")


def print_quality(rows: list[dict]) -> None:
    print(f"\n{'collection':<11} {'model':<28} {'mAP@R':>7} {'R@1':>7} {'nDCG@10':>7} {'minutes':>7}  beats all?")
    for r in rows:
        mins = "" if r["minutes"] is None else f"{r['minutes']:.1f}"
        verdict = {True: "yes", False: "NO", None: ""}[r.get("verdict")]
        chosen = f"  (export: {r['chosen']}{', the starting model kept' if r.get('kept_start') else ''})" \
            if r.get("chosen") else ""
        print(f"{r['collection']:<11} {r['model']:<28} {r['map@r']:>7.4f} {r['recall@1']:>7.4f} "
              f"{r['ndcg@10']:>7.4f} {mins:>7}  {verdict}{chosen}")


# --------------------------------------------------------------------------- latency

def latency_rows(model_dirs: list[Path], threads: int = 1, n: int = 200, rounds: int = 3) -> list[tuple]:
    """(model_dir, median ms, p90 ms) of one query embed (bytes -> vector) on the serving path.
    The models take turns photo by photo, so a busy neighbour on a shared machine slows them
    alike; each model's figure is over ``rounds`` x ``n`` queries."""
    photos = sample_photos(n)
    set_torch_threads(threads)
    embedders = [Embedder(d, decode_workers=1) for d in model_dirs]
    ms: list[list[float]] = [[] for _ in model_dirs]
    try:
        for emb in embedders:
            for p in photos[:10]:
                emb.embed_bytes([p])                                   # warm-up
        for _ in range(rounds):
            for p in photos:
                for i, emb in enumerate(embedders):
                    t0 = time.perf_counter()
                    emb.embed_bytes([p])
                    ms[i].append(1000 * (time.perf_counter() - t0))
    finally:
        for emb in embedders:
            emb.close()
    return [(d, float(np.median(m)), float(np.percentile(m, 90))) for d, m in zip(model_dirs, ms)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="throughput,quality,latency")
    p.add_argument("--arch", default="resnet-small")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="photos per step (x2 views)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3, help="rounds; the best of each is kept")
    p.add_argument("--model-dir", default=str(default_model_dir()), help="model to evaluate and fine-tune")
    p.add_argument("--collections", default="digits,shapes,textures,scenes")
    p.add_argument("--compare-dir", action="append", default=[], help="more models for the latency table")
    p.add_argument("--keep", default=None, help="keep collections and fine-tuned models in this folder")
    p.add_argument("--procs", default="1,2", help="scaling: numbers of training processes")
    p.add_argument("--study", action="store_true",
                   help="quality: keep every validated step and correlate the validation signal with mAP@R")
    args = p.parse_args(argv)
    parts = {x.strip() for x in args.part.split(",")}
    if args.threads:
        torch.set_num_threads(args.threads)
    if "throughput" in parts:
        throughput(args)
    if "scaling" in parts:
        scaling(args)
    if "quality" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            print(f"load average {os.getloadavg()[0]:.1f} at the start ({os.cpu_count()} cores)")
            rows = quality_rows(Path(args.model_dir), [c for c in args.collections.split(",") if c],
                                Path(args.keep or tmp), study=args.study)
            print_quality(rows)
            print_study(rows)
            print(f"load average {os.getloadavg()[0]:.1f} at the end")
            print(f"quality: {(time.time() - t0) / 60:.1f} minutes in all")
    if "latency" in parts:
        print(f"\n{'model':<40} {'median ms':>10} {'p90 ms':>8}   (one query embed, 1 torch thread)")
        for d, med, p90 in latency_rows([Path(args.model_dir)] + [Path(d) for d in args.compare_dir]):
            print(f"{str(d):<40} {med:>10.2f} {p90:>8.2f}")
    return 0


def throughput(args) -> None:
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


if __name__ == "__main__":
    raise SystemExit(main())
