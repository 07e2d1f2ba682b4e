"""The training loop: SimCLR on a folder of images, or InfoNCE on (query, clicked) pairs.

    # self-supervised, from scratch, on a folder (30 % of every class held out for evaluation)
    vsearch train --data ../shared/data/caltech101 --arch resnet-tiny --out runs/tiny --holdout 0.3
    # fine-tune an existing model on click pairs (CSV or the search.events topic)
    vsearch train --data pairs.csv --init models/default --out runs/clicks --epochs 5
    vsearch train --data kafka://127.0.0.1:9092 --init models/default --out runs/clicks
    # ... with the catalog's SimCLR batches mixed in (half the loss each, by default)
    vsearch train --data kafka://127.0.0.1:9092 --catalog <folder> --init models/default --out runs/clicks
    # on 2 processes (DDP: gloo on CPU, nccl on GPU); the same flags, the same result
    torchrun --nproc-per-node 2 .venv/bin/vsearch train --data ... --out runs/ddp
    # carry on after an interruption (a run on an --out that holds the same run's checkpoint
    # continues from it by itself; --resume also takes changed flags)
    vsearch train ... --out runs/tiny --resume

The network is the predictor's :class:`~vsearch.predictor.zoo.EmbeddingNet` (the serving network);
SimCLR adds a projection head that is dropped at export. ``--out`` becomes a model directory
that ``vsearch serve embedder --model-dir`` loads as it is, with ``train_log.jsonl`` (one JSON
line per logged step) and ``checkpoints/last.pt`` beside the weights.

A seeded ``val_fraction`` of the training images (or click pairs) is held out for the label-free
signal of :mod:`.validation` (:class:`Validator`, rank 0): the starting model and every
``val_every`` steps are scored, and the export is the best candidate of (starting model, best
step) x (its own whitening, none, catalog whitenings), the starting model unchanged unless
beaten by more than ``min_gain`` with the paired interval of the gain above zero at
``val_confidence`` (``--no-select``: the last step, with a PCA-whitening of
shrinkage ``--whiten-shrinkage`` fitted on the training images, ``--no-whiten`` to leave it
out). The augmentation (and, fine-tuning, the input size) fit the catalog (:func:`.augment.
catalog_profile`). With ``--holdout`` the export is scored on the held-out
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
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..core import jsonsafe
from ..core.naming import DEFAULT_ALIAS
from ..predictor.model_dir import ModelMeta
from ..predictor.zoo import EmbeddingNet, build_model, fit_whitening, load_model_dir, save_model_dir
from . import distributed, validation
from .augment import AugmentConfig, PairAugment, SimCLRAugment, augment_for, catalog_profile
from .clicks import click_pairs
from .data import (
    DataError,
    ImageCache,
    PairDataset,
    SimCLRDataset,
    click_log_stats,
    epoch_order,
    list_images,
    read_click_log,
    read_csv_header,
    read_pairs_csv,
    split_holdout,
)
from .evaluate import evaluate_models, net_embedder, store_in_meta, write_outputs
from .judge import training_pairs
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
    epochs: float | None = None        # default: 20 from scratch, 10 when fine-tuning (--init)
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
    catalog: str | None = None         # pairs only: a folder whose SimCLR batches are mixed in
    simclr_ratio: float = 0.5          # ... the share of the loss that is theirs
    simclr_temperature: float = 0.2    # ... their NT-Xent temperature
    ips: bool = True                   # clicks: weight pairs by inverse examination propensity
    clicks_since_ms: int | None = None  # clicks: only those logged after this (ms) make pairs
    propensity_clip: float = 10.0      # ... at most this weight
    # the label-free validation (vsearch/trainer/validation.py): checkpoint and whitening chosen
    # on a held-out part of the training images, the starting model kept when nothing beats it
    select: bool = True                # off: export the last step with whiten_shrinkage (as before)
    val_fraction: float = 0.1          # of the training images (seeded, labels unused), or of the pairs
    val_min_images: int = 40           # fewer held out: no validation (logged)
    val_max_images: int = 600
    val_views: int = 3                 # views of each held-out image the signal compares
    val_gallery: int = 0               # > 0: neighbours among this many training images (serving views)
    val_every: int | None = None       # optimiser steps between validations (default: 1/8 of the run)
    min_gain: float = 0.01             # a candidate must beat the starting model by more than this
    val_confidence: float = 0.95       # ... and the paired interval of its gain at this level be above zero
    whiten_choices: tuple[float, ...] = (1.0, 3.0)   # catalog shrinkages tried beside none (and whiten_shrinkage)
    auto_augment: bool = True          # fit the augmentation to the catalog (grey, small, low-detail)
    auto_size: bool = True             # ... and the input size to its detail (fine-tuning only)
    keep_validated: bool = False       # also save the weights of every validated step (for studies)


SCRATCH_EPOCHS, FINE_TUNE_EPOCHS = 20, 10   # the default length of a run (see trainer/EXPERIMENTS.md)

# How a run is carried out, not what it computes: a run on an --out that holds a checkpoint of
# the same run (every other field equal) continues from it.
RUN_KNOBS = {"resume", "stop_after", "progress", "workers", "device", "log_every", "checkpoint_every",
             "version", "name", "evaluate", "whiten", "whiten_shrinkage", "whiten_max_images", "out",
             "whiten_choices", "min_gain", "keep_validated"}


class ProjectionHead(nn.Module):
    """SimCLR's MLP head: trained with the loss, dropped at export."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out))

    def forward(self, x):
        return self.net(x)


class Towers(nn.ModuleDict):
    """The network (and SimCLR's head) as one module whose one forward call embeds everything
    a micro-batch holds, which is what DDP needs (one forward per backward):
    ``pairs`` = (queries, clicked, hard negatives or None) -> their features; ``views`` = (a, b)
    -> the projections of both views. The state dict is the ModuleDict's ("net.", "head.")."""

    def forward(self, pairs=None, views=None) -> dict:
        net, out = self["net"], {}
        if pairs is not None:
            q, c, negs = pairs
            n = len(q)
            if negs is None:
                out["pairs"] = (net(q), net(c), None)
            else:                                  # one pass: batch norm sees them together
                z = net(torch.cat([q, c, negs]))
                out["pairs"] = (z[:n], z[n:2 * n], z[2 * n:])
        if views is not None:
            z = self["head"](net(torch.cat(views)))
            out["views"] = z.chunk(2)
        return out


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


@dataclass
class Pairs:
    pairs: list[tuple[str, str]]
    stats: dict
    weights: list[float] | None = None           # clicks: inverse propensities
    negatives: dict[str, list[str]] | None = None  # clicks: items skipped above the click


def load_pairs(cfg: TrainConfig) -> Pairs:
    """A pairs CSV, or the click log of ``search.events``: pairs weighted by inverse propensity
    (``cfg.ips``) with the items skipped above each click as hard negatives."""
    if cfg.data.startswith("kafka://"):
        rest = cfg.data[len("kafka://"):]
        bootstrap, _, topic = rest.partition("/")
        clicks, events = read_click_log(bootstrap, topic or cfg.kafka_topic)
        got = click_pairs(clicks, ips=cfg.ips, clip=cfg.propensity_clip, since_ms=cfg.clicks_since_ms)
        stats = {**click_log_stats(clicks, events), **got.stats}
        if not got.pairs:
            since = (f" after {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(cfg.clicks_since_ms / 1000))}"
                     if cfg.clicks_since_ms else "")
            raise DataError(f"no usable click pairs{since} on {cfg.data}: {stats}")
        pairs = Pairs(got.pairs, stats, got.weights, got.negatives)
    else:
        csv_pairs = read_pairs_csv(cfg.data)
        pairs = Pairs(csv_pairs, {"pairs": len(csv_pairs)})
    # the held-out queries are the offline verdict's (vsearch.trainer.judge), never trained on
    return training_pairs(pairs, cfg.holdout, cfg.split_seed)


class RunLog:
    """Append-only JSONL run log (written by rank 0 alone; ``path=None``: writes nothing)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields) -> None:
        if self.path is None:
            return
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


def on_main(fn):
    """``fn()`` on rank 0, its result (or its DataError/ValueError/OSError) handed to every rank:
    what is read once and must be the same everywhere (a Kafka topic, a start-or-resume decision,
    a checkpoint on rank 0's disk)."""
    result, error = None, None
    if distributed.ranks().main:
        try:
            result = fn()
        except (DataError, ValueError, OSError) as exc:
            error = exc
    if distributed.active():
        box = [(result, error)]
        torch.distributed.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def _run_key(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RUN_KNOBS}


def start_kind(cfg: TrainConfig, out: Path) -> str:
    """new, resume or restart (a run killed before its first checkpoint: start over).

    ``--resume`` resumes; an --out with a finished model is refused; an --out that holds a run
    of the same configuration (everything but :data:`RUN_KNOBS`) continues it, so a restarted
    job (torchrun's ``--max-restarts``, a Kubernetes Job's retry) carries on where it stopped;
    a different run on it is refused."""
    ckpt, logged = out / "checkpoints" / "last.pt", out / "train_log.jsonl"
    if cfg.resume:
        if not ckpt.exists():
            raise DataError(f"--resume: no checkpoint at {ckpt}")
        return "resume"
    if (out / "config.json").exists():
        raise DataError(f"{out} already holds a model or a run: pick a new --out, or --resume it")
    if not logged.exists():
        return "new"
    starts = [r for r in map(json.loads, open(logged)) if r.get("event") == "start"]
    if ckpt.exists():
        saved = load_checkpoint(ckpt).get("config") or {}
    else:
        saved = starts[-1].get("config", {}) if starts else {}
    if _run_key(saved) != _run_key(_jsonable(cfg)):
        differ = sorted(k for k in set(_run_key(saved)) | set(_run_key(_jsonable(cfg)))
                        if _run_key(saved).get(k) != _run_key(_jsonable(cfg)).get(k))
        raise DataError(f"{out} already holds a model or a run (of other settings: {', '.join(differ)}): "
                        f"pick a new --out, or --resume it")
    return "resume" if ckpt.exists() else "restart"


def train(cfg: TrainConfig) -> Path:
    """Train, export to ``cfg.out`` and return it (or return early after ``stop_after`` steps,
    leaving the checkpoint for ``resume``). Under torchrun every rank calls this; rank 0 writes."""
    t_start = time.time()
    out = Path(cfg.out)
    ranks, device = distributed.init(cfg.device)
    kind = on_main(lambda: start_kind(cfg, out))
    runlog = RunLog(out / "train_log.jsonl" if ranks.main else None)
    seed_everything(cfg.seed)
    net, meta = _model_for(cfg)
    data = load_data(cfg, meta, runlog)
    run = set_up(cfg, net, meta, data, out / "checkpoints" / "last.pt", ranks, device)
    if data.val is not None and ranks.main:
        run.validator = Validator(cfg, data, runlog, out)
    start_or_resume(cfg, run, runlog, data, meta, kind)

    stop_at = min(run.total_steps, cfg.stop_after) if cfg.stop_after else run.total_steps
    last_loss = train_steps(cfg, run, data, runlog, stop_at, meta.preprocess)
    distributed.unsync_batchnorm(run.modules)
    if run.step < run.total_steps:
        runlog.write("stopped", step=run.step, checkpoint=str(run.ckpt_path))
        distributed.barrier()
        return out
    if ranks.main:
        export(cfg, run, data, meta, runlog, out, last_loss, t_start)
        if data.kind == "simclr" and cfg.holdout > 0 and cfg.evaluate:
            evaluate_export(cfg, out, runlog)
    distributed.barrier()                          # the others wait for rank 0's export
    return out


@dataclass
class TrainData:
    """What the loop trains on: SimCLR views of images, or (query, clicked) pairs (with the
    catalog's SimCLR views mixed in when ``views`` is set)."""
    kind: str                       # simclr | pairs
    dataset: SimCLRDataset | PairDataset
    cache: ImageCache
    info: dict                      # what goes into the run log and the metadata
    views: SimCLRDataset | None = None
    val: dict | None = None         # the held-out validation data (rank 0 only): see Validator
    augment: AugmentConfig | None = None   # the augmentation used (fitted to the catalog)


def validation_split(items: list, cfg: TrainConfig) -> tuple[list, list]:
    """(train, validation): a seeded draw of ``val_fraction`` of the items (labels unused: the
    catalog is unlabelled as far as training knows), at most ``val_max_images``; no validation
    (everything trains) when selection is off or fewer than ``val_min_images`` would be drawn."""
    k = min(int(round(len(items) * cfg.val_fraction)), cfg.val_max_images)
    if not cfg.select or cfg.val_fraction <= 0 or k < cfg.val_min_images:
        return list(items), []
    held = set(random.Random(f"val-{cfg.split_seed}").sample(range(len(items)), k))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def fitted_size(profile: dict, meta: ModelMeta) -> int | None:
    """The input size for a catalog of low detail (upscaled small pictures): its detail size,
    at least 32 px, when that is below the model's (fewer pixels, same information: a faster
    fine-tune); None to keep the model's."""
    detail = profile.get("detail")
    if not detail or max(32, detail) >= meta.image_size:
        return None
    return max(32, detail)


def _simclr_data(cfg: TrainConfig, folder: str, pre, with_val: bool = False, meta: ModelMeta | None = None
                 ) -> tuple[SimCLRDataset, ImageCache, dict, dict | None, AugmentConfig]:
    records = on_main(lambda: list_images(folder))
    train_recs, held = split_holdout(records, cfg.holdout, cfg.split_seed)
    train_recs, val_recs = validation_split(train_recs, cfg) if with_val else (train_recs, [])
    cache = ImageCache([r.source for r in train_recs], pre, workers=max(2, cfg.workers))
    augment, why = cfg.augment, []
    profile = None
    if cfg.auto_augment:
        profile = catalog_profile([cache[r.source] for r in train_recs if r.source in cache], pre, seed=cfg.seed)
        augment, why = augment_for(profile, cfg.augment)
        size = fitted_size(profile, meta) if (meta is not None and cfg.auto_size and cfg.init) else None
        if size:
            why.append(f"input size {size} px instead of {meta.image_size} (the catalog's detail)")
            meta.resize_size = max(size, round(meta.resize_size * size / meta.image_size))
            meta.image_size = size
            pre = meta.preprocess
    dataset = SimCLRDataset(cache, [r.source for r in train_recs], SimCLRAugment(pre, augment), seed=cfg.seed)
    info = dict(images=len(records), train_images=len(dataset), held_out_images=len(held),
                holdout=cfg.holdout, split_seed=cfg.split_seed)
    if profile is not None:
        info["catalog_profile"] = {**profile, "augment_changes": why}
    val = None
    if val_recs:
        info["validation_images"] = len(val_recs)
    if val_recs and distributed.ranks().main:
        vcache = ImageCache([r.source for r in val_recs], pre, workers=max(2, cfg.workers))
        images = [vcache[r.source] for r in val_recs if r.source in vcache]
        val = {"kind": "views", "images": images, "augment": _val_augment(augment)}
        if cfg.val_gallery > 0:
            held_in = [r.source for r in train_recs if r.source in cache]
            pick = sorted(random.Random(f"gallery-{cfg.split_seed}").sample(range(len(held_in)),
                                                                             min(cfg.val_gallery, len(held_in))))
            val["gallery"] = [cache[held_in[i]] for i in pick]
    elif with_val:
        info["validation"] = (f"off: {int(round(len(train_recs) * cfg.val_fraction))} images would be held out, "
                              f"fewer than {cfg.val_min_images}" if cfg.select and cfg.val_fraction > 0 else "off")
    return dataset, cache, info, val, augment


def _val_augment(train_augment: AugmentConfig) -> AugmentConfig:
    """The validation views: :data:`validation.VALIDATION_AUGMENT`, minus what the catalog's
    training augmentation leaves out (flips of glyphs, colour of a grey catalog)."""
    a = validation.VALIDATION_AUGMENT
    return replace(a, flip_p=min(a.flip_p, train_augment.flip_p),
                   saturation=min(a.saturation, train_augment.saturation), hue=min(a.hue, train_augment.hue),
                   crop_scale=(max(a.crop_scale[0], train_augment.crop_scale[0]), 1.0))


def load_data(cfg: TrainConfig, meta: ModelMeta, runlog: RunLog) -> TrainData:
    kind = data_kind(cfg.data)
    pre = meta.preprocess
    info: dict = {"kind": kind, "source": portable_path(cfg.data)}
    views, val, augment = None, None, None
    if kind == "simclr":
        if cfg.catalog:
            raise DataError("--catalog mixes SimCLR batches into pair training; --data is already a folder")
        dataset, cache, more, val, augment = _simclr_data(cfg, cfg.data, pre, with_val=True, meta=meta)
        info.update(more)
    else:
        got = on_main(lambda: load_pairs(cfg))
        negatives, stats = got.negatives, got.stats
        if cfg.hard_negatives_from:
            mined, neg_stats = on_main(lambda: _mine(cfg, got.pairs))
            stats = {**stats, "hard_negatives": neg_stats}
            negatives = {q: list(dict.fromkeys((negatives or {}).get(q, []) + mined.get(q, [])))
                         for q in set(negatives or {}) | set(mined)}
        train_idx, val_idx = validation_split(list(range(len(got.pairs))), cfg)
        pairs = [got.pairs[i] for i in train_idx]
        weights = None if got.weights is None else [got.weights[i] for i in train_idx]
        sources = [s for p in pairs for s in p] + [n for v in (negatives or {}).values() for n in v]
        cache = ImageCache(sources, pre, workers=max(2, cfg.workers))
        dataset = PairDataset(cache, pairs, PairAugment(pre), seed=cfg.seed, negatives=negatives,
                              weights=weights)
        info.update({**stats, "pairs": len(got.pairs), "usable_pairs": len(dataset)})
        if val_idx:
            info["validation_pairs"] = len(val_idx)
            if distributed.ranks().main:
                held = [got.pairs[i] for i in val_idx]
                vcache = ImageCache([x for p in held for x in p], pre, workers=max(2, cfg.workers))
                held = [(q, c) for q, c in held if q in vcache and c in vcache]
                if len(held) >= 2:
                    val = {"kind": "pairs", "queries": [vcache[q] for q, _ in held],
                           "clicked": [vcache[c] for _, c in held]}
        elif cfg.select:
            info["validation"] = "off: too few pairs to hold some out"
        if cfg.catalog:
            if not 0 < cfg.simclr_ratio < 1:
                raise DataError(f"--simclr-ratio must be in (0, 1), got {cfg.simclr_ratio}")
            views, vcache, more, _, augment = _simclr_data(cfg, cfg.catalog, pre)
            info["catalog"] = {"source": portable_path(cfg.catalog), "simclr_ratio": cfg.simclr_ratio, **more,
                               "unreadable": len(vcache.failed)}
            if vcache.failed:
                runlog.write("unreadable", items=vcache.failed)
    info["unreadable"] = len(cache.failed)
    if cache.failed:
        runlog.write("unreadable", items=cache.failed)
    return TrainData(kind, dataset, cache, info, views, val, augment)


@dataclass
class Run:
    """The optimisation state the loop advances (and the checkpoint saves)."""
    net: EmbeddingNet
    head: ProjectionHead | None     # SimCLR's projection head, dropped at export
    modules: Towers
    model: nn.Module                # modules, or DDP(modules) on several processes
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    use_amp: bool
    amp_dtype: torch.dtype
    bs: int                         # global micro-batch size (each rank takes bs / world)
    micro_per_epoch: int
    total_steps: int
    warmup: int
    ckpt_path: Path
    ranks: distributed.Ranks = field(default_factory=distributed.Ranks)
    views_bs: int = 0               # SimCLR batch mixed into pair training
    step: int = 0                   # optimiser steps done
    micro: int = 0                  # micro-batches done
    validator: Validator | None = None   # rank 0, with validation data

    def save_checkpoint(self, cfg: TrainConfig) -> None:
        if not self.ranks.main:
            return
        _atomic_save({"modules": self.modules.state_dict(), "opt": self.opt.state_dict(),
                      "sched": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                      "step": self.step, "micro": self.micro, "world": self.ranks.world,
                      "config": _jsonable(cfg),
                      **({"validation": self.validator.state()} if self.validator else {})}, self.ckpt_path)


class Validator:
    """The label-free signal of :mod:`validation` on rank 0: the held-out views (or click pairs)
    made once, the network scored at step 0 and every ``val_every`` steps, the best step's
    weights kept (in memory and in the checkpoint), and at export the choice among checkpoints x
    whitening variants (:meth:`choose`). The other ranks never wait for it but at the next
    collective, so nothing else needs synchronising."""

    def __init__(self, cfg: TrainConfig, data: TrainData, runlog: RunLog, out: Path):
        self.cfg, self.runlog, self.out = cfg, runlog, out
        self.kind = data.val["kind"]
        self.pre = None
        self.data = data.val
        self.history: list[dict] = []
        self.best_step, self.best_score, self.best_state = -1, -math.inf, None

    def _inputs(self, pre):
        if self.pre is not pre:
            self.pre = pre
            if self.kind == "views":
                self.vset = validation.view_set(self.data["images"], pre, seed=self.cfg.split_seed,
                                                n_views=self.cfg.val_views, augment=self.data["augment"])
                self.gx = validation.serving_batch(self.data["gallery"], pre) if self.data.get("gallery") else None
            else:
                self.q = validation.serving_batch(self.data["queries"], pre)
                self.c = validation.serving_batch(self.data["clicked"], pre)
        return self

    def features(self, net: EmbeddingNet, pre) -> tuple:
        """The network's features of what it is measured on: (views, gallery or None) or
        (queries, clicked items); computed once per network, shared by its whitening variants."""
        self._inputs(pre)
        if self.kind == "views":
            return (validation.features(net, self.vset.x),
                    None if self.gx is None else validation.features(net, self.gx))
        return validation.features(net, self.q), validation.features(net, self.c)

    def measure(self, net: EmbeddingNet, pre, whitening=None, feats=None) -> dict:
        f = feats if feats is not None else self.features(net, pre)
        if self.kind == "views":
            return validation.score(f[0], self.vset, whitening, gallery=f[1])
        return validation.pair_agreement(validation.embed(f[0], whitening), validation.embed(f[1], whitening))

    def check(self, run: Run, pre) -> None:
        """Score the network now; keep its weights when its gain over step 0 is the surest so
        far (the lower end of the paired interval, :func:`validation.paired_gain`)."""
        t0 = time.perf_counter()
        m = self.measure(run.net, pre)
        per = {k: [float(x) for x in v] for k, v in (m.get("_per_image") or {}).items()}
        self.history.append({"step": run.step, **validation.public(m), "_per_image": per})
        pg = validation.paired_gain(self.history[-1], self.history[0], 1.0 - self.cfg.val_confidence)
        better = pg["lower"] > self.best_score
        if better:
            self.best_step, self.best_score = run.step, pg["lower"]
            self.best_state = None if run.step == 0 else {
                k: v.detach().cpu().clone() for k, v in run.net.state_dict().items()}
        if self.cfg.keep_validated:
            _atomic_save({k: v.detach().cpu() for k, v in run.net.state_dict().items()},
                         self.out / "checkpoints" / f"step-{run.step}.pt")
        self.runlog.write("validation", step=run.step, signal=self.signal_name(), best=better, gain=pg["mean"],
                          gain_lower=pg["lower"], seconds=round(time.perf_counter() - t0, 2), **validation.public(m))

    def signal_name(self) -> str:
        return ("held-out click recall (MRR of the clicked item)" if self.kind == "pairs"
                else "held-out neighbour agreement (k-NN of the held-out images, shared between views) "
                     "and view agreement (mAP of an image's other views), both")

    def state(self) -> dict:
        return {"history": self.history, "best_step": self.best_step, "best_score": self.best_score,
                "best_state": self.best_state or {}}

    def load(self, st: dict) -> None:
        self.history = list(st.get("history") or [])
        self.best_step, self.best_score = int(st.get("best_step", -1)), float(st.get("best_score", -math.inf))
        self.best_state = st.get("best_state") or None

    def choose(self, run: Run, data: TrainData, meta: ModelMeta):
        """Export candidates: the starting model as it is (the reference) and with each
        whitening variant, and the best checkpoint with each; returns (net, meta, chosen
        candidate, reason, all candidates) with the chosen weights and whitening in place."""
        cfg = self.cfg
        start_net, start_meta = _model_for(cfg)
        start_net.eval()
        images = data.views if data.views is not None else data.dataset
        train_images = [images.cache[s] for s in catalog_sources(cfg, images)]
        shrinkages = sorted({*cfg.whiten_choices, cfg.whiten_shrinkage}) if cfg.whiten else []
        cands, nets = [], {}

        def variants(step, net, pre, own=None):
            net.eval().cpu()
            feats = self.features(net, pre)
            out = []
            if own is not None:
                out.append(validation.Candidate(step, "start", self.measure(net, pre, own, feats)))
            out.append(validation.Candidate(step, "none", self.measure(net, pre, None, feats)))
            if shrinkages and len(train_images) >= 2:
                tf = validation.features(net, validation.serving_batch(train_images, pre))
                for sh in shrinkages:
                    w = fit_whitening(tf.numpy(), sh)
                    c = validation.Candidate(step, f"shrinkage {sh:g}", self.measure(net, pre, w, feats))
                    c.details["whitening"] = w
                    out.append(c)
            return out

        start_cands = variants(0, start_net, start_meta.preprocess, own=start_net.whitening)
        reference = start_cands[0]
        cands += start_cands
        nets[0] = (start_net, start_meta)
        best_step = self.best_step
        if best_step > 0:
            net = run.net
            if best_step != run.step and self.best_state:
                net.load_state_dict(self.best_state)
            net.whitening = None
            cands += variants(best_step, net, meta.preprocess)
            nets[best_step] = (net, meta)
        chosen, reason = validation.select(cands, reference, cfg.min_gain, cfg.val_confidence)
        net, chosen_meta = nets[chosen.step]
        if chosen.whitening == "none":
            net.whitening, chosen_meta.whitening = None, None
        elif chosen.whitening != "start":
            net.whitening = chosen.details["whitening"]
            chosen_meta.whitening = {"fitted_on": f"{len(train_images)} training images ({portable_path(cfg.data)})",
                                     "shrinkage": float(chosen.whitening.split()[1])}
        return net, chosen_meta, chosen, reason, cands


def _global_batch(requested: int, available: int, world: int, what: str) -> int:
    bs = min(requested, available)
    bs -= bs % world
    if bs < max(2, world):
        raise DataError(f"need at least {max(2, world)} usable {what} for in-batch negatives "
                        f"on {world} process(es), have {available}")
    return bs


def set_up(cfg: TrainConfig, net: EmbeddingNet, meta: ModelMeta, data: TrainData, ckpt_path: Path,
           ranks: distributed.Ranks | None = None, device: torch.device | None = None) -> Run:
    """Batch size and schedule from the data (the global batch: the same on any number of
    processes); AdamW (no decay on norms and biases), warm-up + cosine, mixed precision on CUDA;
    on several processes global batch norm and DDP."""
    ranks = ranks or distributed.Ranks()
    device = device or torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_amp = cfg.amp and device.type == "cuda"
    what = "training items" + (f" (unreadable: {len(data.cache.failed)})" if data.cache.failed else "")
    bs = _global_batch(cfg.batch_size, len(data.dataset), ranks.world, what)
    views_bs = _global_batch(cfg.batch_size, len(data.views), ranks.world, "catalog images") if data.views else 0
    micro_per_epoch = len(data.dataset) // bs
    steps_per_epoch = max(1, micro_per_epoch // cfg.accum_steps)
    epochs = cfg.epochs if cfg.epochs is not None else (FINE_TUNE_EPOCHS if cfg.init else SCRATCH_EPOCHS)
    total_steps = cfg.max_steps or max(1, int(round(epochs * steps_per_epoch)))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, int(0.05 * total_steps))

    head = (ProjectionHead(meta.embedding_dim, cfg.proj_hidden, cfg.proj_dim)
            if data.kind == "simclr" or data.views is not None else None)
    modules = Towers({"net": net, **({"head": head} if head is not None else {})}).to(device)
    for name, p in modules.named_parameters():
        if name.endswith("mask_token"):        # DINOv2's: used only for masked-image training
            p.requires_grad_(False)
    model: nn.Module = modules
    if ranks.world > 1:
        distributed.sync_batchnorm(modules)
        model = torch.nn.parallel.DistributedDataParallel(
            modules, device_ids=[device.index] if device.type == "cuda" else None)
    decay = [p for p in modules.parameters() if p.ndim > 1 and p.requires_grad]
    no_decay = [p for p in modules.parameters() if p.ndim <= 1 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total_steps, cfg.min_lr_ratio))
    amp_dtype = torch.bfloat16 if (use_amp and torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    return Run(net=net, head=head, modules=modules, model=model, opt=opt, sched=sched, scaler=scaler,
               device=device, use_amp=use_amp, amp_dtype=amp_dtype, bs=bs, micro_per_epoch=micro_per_epoch,
               total_steps=total_steps, warmup=warmup, ckpt_path=ckpt_path, ranks=ranks, views_bs=views_bs)


def start_or_resume(cfg: TrainConfig, run: Run, runlog: RunLog, data: TrainData, meta: ModelMeta,
                    kind: str = "new") -> None:
    if kind in ("new", "restart"):
        runlog.write("start", config=_jsonable(cfg), data=data.info, total_steps=run.total_steps,
                     model=meta.to_json(), device=str(run.device), world_size=run.ranks.world,
                     **({"restarted": True} if kind == "restart" else {}))
        if run.validator is not None:
            run.validator.check(run, meta.preprocess)        # step 0: the starting model
        return
    ck = on_main(lambda: load_checkpoint(run.ckpt_path))
    run.modules.load_state_dict(ck["modules"])
    run.opt.load_state_dict(ck["opt"])
    run.sched.load_state_dict(ck["sched"])
    run.scaler.load_state_dict(ck["scaler"])
    run.step, run.micro = ck["step"], ck["micro"]
    if run.validator is not None:
        if ck.get("validation"):
            run.validator.load(ck["validation"])
        else:                                              # a checkpoint of a run without it
            run.validator = None
    runlog.write("resume", step=run.step, micro=run.micro, world_size=run.ranks.world,
                 restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), requested=cfg.resume)
    log.info("resumed from %s at step %d", run.ckpt_path, run.step)


def loss_of(cfg: TrainConfig, run: Run, batch, views=None) -> torch.Tensor:
    """NT-Xent through the projection head (SimCLR), else InfoNCE on the pairs (+ hard
    negatives, weights) plus, with the catalog mixed in, ``simclr_ratio`` x NT-Xent of its views."""
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.use_amp):
        if run.head is not None and views is None:
            z = run.model(views=batch)["views"]
            return nt_xent(*z, temperature=cfg.temperature)
        negs = batch["neg"][batch["has_neg"]] if "neg" in batch else None
        out = run.model(pairs=(batch["q"], batch["c"], negs), views=views)
        zq, zc, zn = out["pairs"]
        loss = info_nce(zq, zc, temperature=cfg.temperature, hard_negatives=zn, weights=batch.get("w"))
        if views is not None:
            loss = (1 - cfg.simclr_ratio) * loss + cfg.simclr_ratio * nt_xent(
                *out["views"], temperature=cfg.simclr_temperature)
        return loss


def micro_batches(dataset, bs: int, seed: int, start: int, ranks: distributed.Ranks, workers: int = 0,
                  pin_memory: bool = False):
    """Micro-batches from micro-batch ``start`` on, epoch after epoch: micro-batch m is items
    ``order[j*bs:(j+1)*bs]`` of epoch e (e, j = divmod(m, len // bs); the order a function of
    (seed, epoch)), of which this rank takes its contiguous slice of bs / world. A resumed run
    sees the same batches as an uninterrupted one, and W ranks together the batches of one."""
    per_epoch = len(dataset) // bs
    local = bs // ranks.world
    epoch, j = divmod(start, per_epoch)
    while True:
        order = epoch_order(len(dataset), seed, epoch)
        lo = ranks.rank * local
        mine = [int(i) for m in range(j, per_epoch) for i in order[m * bs + lo: m * bs + lo + local]]
        dataset.epoch = epoch
        yield from torch.utils.data.DataLoader(dataset, batch_size=local, sampler=mine, drop_last=True,
                                               num_workers=workers, pin_memory=pin_memory)
        epoch, j = epoch + 1, 0


def optimiser_step(run: Run) -> float:
    """One AdamW step on the accumulated (and, under DDP, averaged) gradients; returns their
    norm (of the unscaled gradients)."""
    run.scaler.unscale_(run.opt)
    grads = [p.grad for p in run.modules.parameters() if p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) \
        if grads else 0.0
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    run.sched.step()
    run.step += 1
    return norm


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return tuple(t.to(device, non_blocking=True) for t in batch)


def validate_every(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.val_every or max(1, total_steps // 8)


def train_steps(cfg: TrainConfig, run: Run, data: TrainData, runlog: RunLog, stop_at: int,
                pre=None) -> float:
    """The loop: micro-batches accumulated into optimiser steps until ``stop_at``; logs and
    checkpoints on their cadence. Returns the last step's mean loss (over the global batch)."""
    run.model.train()
    bar = _progress(run.total_steps, run.step, cfg.progress and run.ranks.main)
    seen, t_rate, last_loss, loss_sum, loss_n = 0, time.perf_counter(), float("nan"), 0.0, 0
    cpu_rate = time.process_time()
    pin = run.device.type == "cuda"
    stream = micro_batches(data.dataset, run.bs, cfg.seed, run.micro, run.ranks, cfg.workers, pin)
    vstream = (micro_batches(data.views, run.views_bs, cfg.seed + 1, run.micro, run.ranks, cfg.workers, pin)
               if data.views is not None else None)
    while run.step < stop_at:
        batch = _to(next(stream), run.device)
        views = _to(next(vstream), run.device) if vstream is not None else None
        accumulating = (run.micro + 1) % cfg.accum_steps != 0
        sync = run.model.no_sync() if accumulating and run.model is not run.modules else nullcontext()
        with sync:
            loss = loss_of(cfg, run, batch, views)
            run.scaler.scale(loss / cfg.accum_steps).backward()
        run.micro += 1
        first = batch["q"] if isinstance(batch, dict) else batch[0]
        seen += 2 * len(first) + (2 * len(views[0]) if views is not None else 0)
        loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
        if accumulating:
            continue
        grad_norm = optimiser_step(run)
        last_loss, loss_sum, loss_n = distributed.mean_over_ranks(loss_sum / loss_n), 0.0, 0
        if bar is not None:
            bar.update(1)
        if run.step % cfg.log_every == 0 or run.step == stop_at:
            dt = time.perf_counter() - t_rate
            rate = seen * run.ranks.world / dt if dt > 0 else 0.0
            cpu = time.process_time() - cpu_rate           # this process's CPU time (all its threads)
            runlog.write("step", step=run.step, epoch=round(run.micro / run.micro_per_epoch, 3),
                         loss=last_loss, grad_norm=grad_norm, lr=run.sched.get_last_lr()[0], images_per_s=rate,
                         images_per_cpu_s=seen / cpu if cpu > 0 else 0.0)
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.3f}", img_s=f"{rate:.0f}")
            seen, t_rate, cpu_rate = 0, time.perf_counter(), time.process_time()
        if run.validator is not None and (run.step % validate_every(cfg, run.total_steps) == 0
                                          or run.step == run.total_steps):
            run.validator.check(run, pre)
        if run.step % cfg.checkpoint_every == 0 or run.step == stop_at:
            run.save_checkpoint(cfg)
    if bar is not None:
        bar.close()
    return last_loss


def export(cfg: TrainConfig, run: Run, data: TrainData, meta: ModelMeta, runlog: RunLog, out: Path,
           last_loss: float, t_start: float) -> None:
    """The network as a model directory: version, the training record, the catalog whitening."""
    net = run.net
    net.eval().cpu()
    selection = None
    if run.validator is not None:
        net, chosen_meta, chosen, reason, cands = run.validator.choose(run, data, meta)
        kept = chosen.step == 0
        selection = {"signal": run.validator.signal_name(), "chosen": chosen.label(), "step": chosen.step,
                     "whitening": chosen.whitening, "score": chosen.score, "kept_start": kept, "reason": reason,
                     "min_gain": cfg.min_gain, "confidence": cfg.val_confidence,
                     "validation": data.info.get("validation_images", data.info.get("validation_pairs")),
                     "candidates": [{"step": c.step, "whitening": c.whitening, "score": c.score,
                                     "view_map": c.measures.get("view_map"),
                                     "gain": (c.details.get("paired_gain") or {}).get("mean", 0.0),
                                     "gain_lower": (c.details.get("paired_gain") or {}).get("lower")}
                                    for c in cands],
                     "history": [validation.public(h) for h in run.validator.history]}
        runlog.write("selection", **selection)
        (log.warning if kept else log.info)("%s", reason)
        meta = chosen_meta
    meta.version = cfg.version or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    meta.evaluation = None
    logged = [json.loads(line) for line in open(runlog.path)]
    steps_logged = [r for r in logged if r.get("event") == "step"]
    rates = [r["images_per_s"] for r in steps_logged[1:] or steps_logged]
    starts = [r["time"] for r in logged if r.get("event") == "start"]
    resumes = [r["step"] for r in logged if r.get("event") == "resume"]
    meta.training = {
        "method": ("simclr-nt-xent" if data.kind == "simclr" else "click-pairs-infonce"
                   + (" + catalog simclr-nt-xent" if data.views is not None else "")),
        "init": cfg.init or f"random ({cfg.arch}, seed {cfg.seed})",
        "data": data.info, "steps": run.total_steps, "batch_size": run.bs, "accum_steps": cfg.accum_steps,
        "epochs": round(run.total_steps * cfg.accum_steps / run.micro_per_epoch, 2),
        "lr": cfg.lr, "weight_decay": cfg.weight_decay, "warmup_steps": run.warmup,
        "temperature": cfg.temperature, "seed": cfg.seed,
        "augment": ((data.augment or cfg.augment).to_json() if data.kind == "simclr"
                    else "pair crop (0.6-1.0) + flip"),
        "final_loss": last_loss, "images_per_s": float(np.median(rates)) if rates else None,
        "device": str(run.device), "threads": torch.get_num_threads(), "processes": run.ranks.world,
        "wall_s": round(time.time() - (starts[-1] if starts else t_start), 1),
        "resumed_at_steps": resumes,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **({"selection": selection} if selection else {}),
    }
    if selection is None:
        images = data.views if data.views is not None else data.dataset
        fit_catalog_whitening(cfg, net, meta, [images.cache[s] for s in catalog_sources(cfg, images)])
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
    from ..core.store import MilvusStore  # (pymilvus: only for mining)
    from ..predictor.inference import Embedder
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
