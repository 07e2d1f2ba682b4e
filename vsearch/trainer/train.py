"""The training loop: SimCLR on a folder of images, or InfoNCE on (query, clicked) pairs.

    # self-supervised, from scratch, on a folder (30 % of every class held out for evaluation)
    vsearch train --data ../shared/data/caltech101 --arch resnet-tiny --out runs/tiny --holdout 0.3
    # fine-tune an existing model on click pairs (CSV or the search.events topic)
    vsearch train --data pairs.csv --init models/default --out runs/clicks --epochs 5
    vsearch train --data kafka://127.0.0.1:9092 --init models/default --out runs/clicks
    # carry on after an interruption
    vsearch train ... --out runs/tiny --resume

The network is the predictor's :class:`~vsearch.predictor.zoo.EmbeddingNet` (the serving network);
SimCLR adds a projection head that is dropped at export. ``--out`` becomes a model directory
that ``vsearch serve embedder --model-dir`` loads as it is, with ``train_log.jsonl`` (one JSON
line per logged step) and ``checkpoints/last.pt`` beside the weights. At export a PCA-whitening
of the pooled features is fitted on the training images and served as part of the model
(``--no-whiten`` to leave it out); with ``--holdout`` the export is scored on the held-out
split against raw pixels, random init and the ``--init`` model, and the verdict ("beats" /
"DOES NOT BEAT") goes to the run log, the metadata and stdout.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..core import jsonsafe
from ..core.naming import DEFAULT_ALIAS
from ..core.store import MilvusStore
from ..predictor.inference import Embedder
from ..predictor.model_dir import ModelMeta
from ..predictor.zoo import EmbeddingNet, build_model, fit_whitening, load_model_dir, save_model_dir
from .augment import AugmentConfig, PairAugment, SimCLRAugment
from .data import (
    DataError,
    ImageCache,
    PairDataset,
    SimCLRDataset,
    click_pairs_from_kafka,
    epoch_order,
    list_images,
    read_csv_header,
    read_pairs_csv,
    split_holdout,
)
from .evaluate import evaluate_models, net_embedder, store_in_meta, write_outputs
from .losses import info_nce, nt_xent
from .negatives import mine_hard_negatives

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    out: str
    init: str | None = None            # model directory to fine-tune
    arch: str = "resnet-tiny"          # used when init is None (random init)
    image_size: int | None = None      # input size for a new model (arch default otherwise)
    name: str | None = None
    version: str | None = None         # default: UTC time stamp
    epochs: float = 20
    max_steps: int | None = None       # optimiser steps; overrides epochs
    batch_size: int = 128              # images per micro-batch (SimCLR: 2 views each)
    accum_steps: int = 1               # micro-batches per optimiser step
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int | None = None    # default: 5 % of the steps
    min_lr_ratio: float = 0.0
    temperature: float = 0.2
    proj_dim: int = 128
    proj_hidden: int = 512
    holdout: float = 0.0               # fraction of each class kept out of training
    split_seed: int = 0
    seed: int = 0
    workers: int = 0                   # data-loader processes
    device: str | None = None
    amp: bool = True                   # mixed precision on CUDA
    checkpoint_every: int = 200        # optimiser steps
    resume: bool = False
    stop_after: int | None = None      # stop (keeping the checkpoint) after this many steps
    log_every: int = 10
    kafka_topic: str | None = None
    hard_negatives_from: str | None = None   # Milvus URI of the current index (pairs only)
    hard_negatives_collection: str = DEFAULT_ALIAS
    hard_negatives_k: int = 10               # neighbours searched per query
    progress: bool = True
    whiten: bool = True                # fit the served PCA-whitening on the training images
    whiten_shrinkage: float = 3.0      # x the mean eigenvalue, added to each (0 = full whitening)
    whiten_max_images: int = 20_000
    evaluate: bool = True              # with holdout > 0: held-out figures vs the baselines
    augment: AugmentConfig = field(default_factory=AugmentConfig)


class ProjectionHead(nn.Module):
    """SimCLR's MLP head: trained with the loss, dropped at export."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out))

    def forward(self, x):
        return self.net(x)


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.0):
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_kind(data: str) -> str:
    """simclr (a folder) or pairs (a pairs CSV or kafka://)."""
    if data.startswith("kafka://"):
        return "pairs"
    p = Path(data)
    if p.is_dir():
        return "simclr"
    if p.is_file() and p.suffix.lower() == ".csv":
        header = read_csv_header(p)
        if {"path", "label"} <= set(header):
            raise DataError(f"{p} is a labels CSV: pass its folder to train on its images")
        return "pairs"
    raise DataError(f"--data {data!r} is neither a folder of images, a pairs CSV nor kafka://HOST:PORT")


def load_pairs(cfg: TrainConfig) -> tuple[list[tuple[str, str]], dict]:
    if cfg.data.startswith("kafka://"):
        rest = cfg.data[len("kafka://"):]
        bootstrap, _, topic = rest.partition("/")
        pairs, stats = click_pairs_from_kafka(bootstrap, topic or cfg.kafka_topic)
        if not pairs:
            raise DataError(f"no usable click pairs on {cfg.data}: {stats}")
        return pairs, stats
    pairs = read_pairs_csv(cfg.data)
    return pairs, {"pairs": len(pairs)}


class RunLog:
    """Append-only JSONL run log."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields) -> None:
        rec = {"event": event, "time": time.time(), **fields}
        with open(self.path, "a") as f:
            f.write(jsonsafe.dumps(rec) + "\n")


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _model_for(cfg: TrainConfig) -> tuple[EmbeddingNet, ModelMeta]:
    if cfg.init:
        net, meta = load_model_dir(cfg.init)
        if cfg.name:
            meta.name = cfg.name
        return net, meta
    return build_model(cfg.arch, name=cfg.name or cfg.arch, image_size=cfg.image_size, seed=cfg.seed)


def train(cfg: TrainConfig) -> Path:
    """Train, export to ``cfg.out`` and return it (or return early after ``stop_after`` steps,
    leaving the checkpoint for ``resume``)."""
    t_start = time.time()
    out = Path(cfg.out)
    if not cfg.resume and ((out / "train_log.jsonl").exists() or (out / "config.json").exists()):
        raise DataError(f"{out} already holds a model or a run: pick a new --out, or --resume it")
    runlog = RunLog(out / "train_log.jsonl")
    seed_everything(cfg.seed)
    net, meta = _model_for(cfg)
    data = load_data(cfg, meta, runlog)
    run = set_up(cfg, net, meta, data, out / "checkpoints" / "last.pt")
    start_or_resume(cfg, run, runlog, data, meta)

    stop_at = min(run.total_steps, cfg.stop_after) if cfg.stop_after else run.total_steps
    last_loss = train_steps(cfg, run, data, runlog, stop_at)
    if run.step < run.total_steps:
        runlog.write("stopped", step=run.step, checkpoint=str(run.ckpt_path))
        return out

    export(cfg, run, data, meta, runlog, out, last_loss, t_start)
    if data.kind == "simclr" and cfg.holdout > 0 and cfg.evaluate:
        evaluate_export(cfg, out, runlog)
    return out


@dataclass
class TrainData:
    """What the loop trains on: SimCLR views of images, or (query, clicked) pairs."""
    kind: str                       # simclr | pairs
    dataset: SimCLRDataset | PairDataset
    cache: ImageCache
    info: dict                      # what goes into the run log and the metadata


def load_data(cfg: TrainConfig, meta: ModelMeta, runlog: RunLog) -> TrainData:
    kind = data_kind(cfg.data)
    pre = meta.preprocess
    info: dict = {"kind": kind, "source": portable_path(cfg.data)}
    if kind == "simclr":
        records = list_images(cfg.data)
        train_recs, held = split_holdout(records, cfg.holdout, cfg.split_seed)
        cache = ImageCache([r.source for r in train_recs], pre, workers=max(2, cfg.workers))
        dataset = SimCLRDataset(cache, [r.source for r in train_recs],
                                SimCLRAugment(pre, cfg.augment), seed=cfg.seed)
        info.update(images=len(records), train_images=len(dataset), held_out_images=len(held),
                    holdout=cfg.holdout, split_seed=cfg.split_seed)
    else:
        pairs, stats = load_pairs(cfg)
        negatives = None
        if cfg.hard_negatives_from:
            negatives, neg_stats = _mine(cfg, pairs)
            stats = {**stats, "hard_negatives": neg_stats}
        sources = [s for p in pairs for s in p] + [n for v in (negatives or {}).values() for n in v]
        cache = ImageCache(sources, pre, workers=max(2, cfg.workers))
        dataset = PairDataset(cache, pairs, PairAugment(pre), seed=cfg.seed, negatives=negatives)
        info.update({**stats, "pairs": len(pairs), "usable_pairs": len(dataset)})
    info["unreadable"] = len(cache.failed)
    if cache.failed:
        runlog.write("unreadable", items=cache.failed)
    return TrainData(kind, dataset, cache, info)


@dataclass
class Run:
    """The optimisation state the loop advances (and the checkpoint saves)."""
    net: EmbeddingNet
    head: ProjectionHead | None     # SimCLR's projection head, dropped at export
    modules: nn.ModuleDict
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    use_amp: bool
    amp_dtype: torch.dtype
    bs: int                         # micro-batch size
    micro_per_epoch: int
    total_steps: int
    warmup: int
    ckpt_path: Path
    step: int = 0                   # optimiser steps done
    micro: int = 0                  # micro-batches done

    def save_checkpoint(self, cfg: TrainConfig) -> None:
        _atomic_save({"modules": self.modules.state_dict(), "opt": self.opt.state_dict(),
                      "sched": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                      "step": self.step, "micro": self.micro, "config": _jsonable(cfg)}, self.ckpt_path)


def set_up(cfg: TrainConfig, net: EmbeddingNet, meta: ModelMeta, data: TrainData, ckpt_path: Path) -> Run:
    """Batch size and schedule from the data; AdamW (no decay on norms and biases), warm-up +
    cosine, mixed precision on CUDA."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_amp = cfg.amp and device.type == "cuda"
    bs = min(cfg.batch_size, len(data.dataset))
    if bs < 2:
        raise DataError(f"need at least 2 usable training items for in-batch negatives, have "
                        f"{len(data.dataset)} (unreadable: {len(data.cache.failed)})")
    micro_per_epoch = len(data.dataset) // bs
    steps_per_epoch = max(1, micro_per_epoch // cfg.accum_steps)
    total_steps = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, int(0.05 * total_steps))

    head = (ProjectionHead(meta.embedding_dim, cfg.proj_hidden, cfg.proj_dim)
            if data.kind == "simclr" else None)
    modules = nn.ModuleDict({"net": net, **({"head": head} if head is not None else {})}).to(device)
    decay = [p for n, p in modules.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in modules.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total_steps, cfg.min_lr_ratio))
    amp_dtype = torch.bfloat16 if (use_amp and torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    return Run(net=net, head=head, modules=modules, opt=opt, sched=sched, scaler=scaler, device=device,
               use_amp=use_amp, amp_dtype=amp_dtype, bs=bs, micro_per_epoch=micro_per_epoch,
               total_steps=total_steps, warmup=warmup, ckpt_path=ckpt_path)


def start_or_resume(cfg: TrainConfig, run: Run, runlog: RunLog, data: TrainData, meta: ModelMeta) -> None:
    if not cfg.resume:
        runlog.write("start", config=_jsonable(cfg), data=data.info, total_steps=run.total_steps,
                     model=meta.to_json(), device=str(run.device))
        return
    if not run.ckpt_path.exists():
        raise DataError(f"--resume: no checkpoint at {run.ckpt_path}")
    ck = load_checkpoint(run.ckpt_path, run.device)
    run.modules.load_state_dict(ck["modules"])
    run.opt.load_state_dict(ck["opt"])
    run.sched.load_state_dict(ck["sched"])
    run.scaler.load_state_dict(ck["scaler"])
    run.step, run.micro = ck["step"], ck["micro"]
    runlog.write("resume", step=run.step, micro=run.micro)
    log.info("resumed from %s at step %d", run.ckpt_path, run.step)


def loss_of(cfg: TrainConfig, run: Run, a, b, negs=None, has_neg=None) -> torch.Tensor:
    """NT-Xent through the projection head (SimCLR), else InfoNCE on the pairs (+ hard negatives)."""
    net = run.net
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.use_amp):
        if run.head is not None:
            z = run.head(net(torch.cat([a, b])))
            return nt_xent(*z.chunk(2), temperature=cfg.temperature)
        if negs is not None and bool(has_neg.any()):
            z = net(torch.cat([a, b, negs[has_neg]]))
            return info_nce(z[:len(a)], z[len(a):2 * len(a)], temperature=cfg.temperature,
                            hard_negatives=z[2 * len(a):])
        return info_nce(net(a), net(b), temperature=cfg.temperature)


def epoch_loader(cfg: TrainConfig, run: Run, dataset) -> torch.utils.data.DataLoader:
    """The rest of the current epoch, in the order fixed by (seed, epoch): a resumed run sees
    the same batches as an uninterrupted one."""
    epoch, start = divmod(run.micro, run.micro_per_epoch)
    dataset.epoch = epoch
    order = epoch_order(len(dataset), cfg.seed, epoch)[start * run.bs: run.micro_per_epoch * run.bs]
    return torch.utils.data.DataLoader(dataset, batch_size=run.bs, sampler=order.tolist(),
                                       drop_last=True, num_workers=cfg.workers,
                                       pin_memory=run.device.type == "cuda")


def optimiser_step(run: Run) -> None:
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    run.sched.step()
    run.step += 1


def train_steps(cfg: TrainConfig, run: Run, data: TrainData, runlog: RunLog, stop_at: int) -> float:
    """The loop: micro-batches accumulated into optimiser steps until ``stop_at``; logs and
    checkpoints on their cadence. Returns the last step's mean loss."""
    run.modules.train()
    bar = _progress(run.total_steps, run.step, cfg.progress)
    seen, t_rate, last_loss, loss_sum, loss_n = 0, time.perf_counter(), float("nan"), 0.0, 0
    images_per_item = 2
    while run.step < stop_at:
        for batch in epoch_loader(cfg, run, data.dataset):
            a, b, *negs = [t.to(run.device, non_blocking=True) for t in batch]
            loss = loss_of(cfg, run, a, b, *negs)
            run.scaler.scale(loss / cfg.accum_steps).backward()
            run.micro += 1
            seen += len(a) * images_per_item
            loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
            if run.micro % cfg.accum_steps:
                continue
            optimiser_step(run)
            last_loss, loss_sum, loss_n = loss_sum / loss_n, 0.0, 0
            if bar is not None:
                bar.update(1)
            if run.step % cfg.log_every == 0 or run.step == stop_at:
                dt = time.perf_counter() - t_rate
                rate = seen / dt if dt > 0 else 0.0
                runlog.write("step", step=run.step, epoch=round(run.micro / run.micro_per_epoch, 3),
                             loss=last_loss, lr=run.sched.get_last_lr()[0], images_per_s=rate)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.3f}", img_s=f"{rate:.0f}")
                seen, t_rate = 0, time.perf_counter()
            if run.step % cfg.checkpoint_every == 0 or run.step == stop_at:
                run.save_checkpoint(cfg)
            if run.step >= stop_at:
                break
    if bar is not None:
        bar.close()
    return last_loss


def export(cfg: TrainConfig, run: Run, data: TrainData, meta: ModelMeta, runlog: RunLog, out: Path,
           last_loss: float, t_start: float) -> None:
    """The network as a model directory: version, the training record, the catalog whitening."""
    net = run.net
    net.eval().cpu()
    meta.version = cfg.version or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    meta.evaluation = None
    logged = [json.loads(line) for line in open(runlog.path)]
    steps_logged = [r for r in logged if r.get("event") == "step"]
    rates = [r["images_per_s"] for r in steps_logged[1:] or steps_logged]
    starts = [r["time"] for r in logged if r.get("event") == "start"]
    resumes = [r["step"] for r in logged if r.get("event") == "resume"]
    meta.training = {
        "method": "simclr-nt-xent" if data.kind == "simclr" else "click-pairs-infonce",
        "init": cfg.init or f"random ({cfg.arch}, seed {cfg.seed})",
        "data": data.info, "steps": run.total_steps, "batch_size": run.bs, "accum_steps": cfg.accum_steps,
        "epochs": round(run.total_steps * cfg.accum_steps / run.micro_per_epoch, 2),
        "lr": cfg.lr, "weight_decay": cfg.weight_decay, "warmup_steps": run.warmup,
        "temperature": cfg.temperature, "seed": cfg.seed,
        "augment": cfg.augment.to_json() if data.kind == "simclr" else "pair crop (0.6-1.0) + flip",
        "final_loss": last_loss, "images_per_s": float(np.median(rates)) if rates else None,
        "device": str(run.device), "threads": torch.get_num_threads(),
        "wall_s": round(time.time() - (starts[-1] if starts else t_start), 1),
        "resumed_at_steps": resumes,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    fit_catalog_whitening(cfg, net, meta, [data.cache[s] for s in catalog_sources(cfg, data.dataset)])
    save_model_dir(net, meta, out)
    runlog.write("exported", out=portable_path(str(out)), version=meta.version, final_loss=last_loss)
    log.info("exported %s (version %s, final loss %.4f)", out, meta.version, last_loss)


def load_checkpoint(path: Path, device="cpu") -> dict:
    """A training checkpoint (``modules``, ``opt``, ``sched``, ``scaler``, ``step``, ...):
    tensors and plain data only, so loading runs no code; anything else is a DataError."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataError(f"--resume: {path} holds more than tensors and plain data; "
                        f"refusing to load it ({str(exc).splitlines()[0][:200]})") from exc


def catalog_sources(cfg: TrainConfig, dataset) -> list[str]:
    """The training images the whitening is fitted on (a seeded sample of a large catalog)."""
    sources = (list(dataset.sources) if hasattr(dataset, "sources")
               else list(dict.fromkeys(s for p in dataset.pairs for s in p)))
    if len(sources) > cfg.whiten_max_images:
        sources = random.Random(cfg.seed).sample(sources, cfg.whiten_max_images)
    return sources


def fit_catalog_whitening(cfg: TrainConfig, net: EmbeddingNet, meta: ModelMeta, images) -> None:
    """Fit the served whitening on the catalog's training images (serving view, no
    augmentation), or export without one with ``whiten=False``. An ``--init`` model's whitening
    was fitted to its old features, so it is never carried over."""
    net.whitening = None
    if not cfg.whiten or len(images) < 2:
        return
    features = net_embedder(net, meta.preprocess)(images)
    net.whitening = fit_whitening(features, cfg.whiten_shrinkage)
    meta.whitening = {"fitted_on": f"{len(images)} training images ({cfg.data})",
                      "shrinkage": cfg.whiten_shrinkage}


def evaluate_export(cfg: TrainConfig, out: Path, runlog: RunLog) -> dict | None:
    """Held-out figures of the export against raw pixels, random init and the ``--init``
    model, stored in its metadata and ``out/evaluation``; the verdict goes to the run log."""
    dirs = [str(out)] + ([str(cfg.init)] if cfg.init else [])
    try:
        report = evaluate_models(dirs, cfg.data, split="held-out", holdout=cfg.holdout,
                                 split_seed=cfg.split_seed, baselines=["raw-pixels", "random-init"],
                                 )
    except DataError as exc:
        runlog.write("evaluation", skipped=str(exc))
        log.warning("held-out evaluation skipped: %s", exc)
        return None
    store_in_meta(out, report)
    write_outputs(report, out / "evaluation")
    v = report["verdicts"][0]
    runlog.write("evaluation", metrics=report["results"][0]["metrics"], verdict=v)
    (log.info if v["beats_baselines"] else log.warning)("%s", v["text"])
    return report


def _mine(cfg: TrainConfig, pairs):
    """Hard negatives from the current index, found with the model being fine-tuned."""
    if not cfg.init:
        raise DataError("hard negatives need --init: the model that built the index")
    embedder = Embedder(cfg.init, device="cpu")
    try:
        with MilvusStore(cfg.hard_negatives_from) as store:
            negatives, stats = mine_hard_negatives(pairs, embedder, store, cfg.hard_negatives_collection,
                                                   k=cfg.hard_negatives_k)
    finally:
        embedder.close()
    log.info("hard negatives: %s", stats)
    return negatives, stats


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", mininterval=2.0,
                dynamic_ncols=True)


def portable_path(source: str) -> str:
    """A data path as the run log and the model's metadata record it: as given when relative
    (or a URI), relative to the working directory when absolute, so that no machine's layout
    ends up in a committed model directory."""
    if "://" in source or not os.path.isabs(source):
        return source
    return os.path.relpath(source)


def _jsonable(cfg: TrainConfig) -> dict:
    d = json.loads(json.dumps(asdict(cfg), default=str))
    for key in ("data", "out", "init"):
        if d.get(key):
            d[key] = portable_path(d[key])
    return d
