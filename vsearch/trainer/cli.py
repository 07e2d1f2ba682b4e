"""``vsearch train``, ``vsearch evaluate`` and ``vsearch quantize`` (:mod:`.quantize`)."""

from __future__ import annotations

import json
import os
import sys

from ..core.config import Flags
from ..core.naming import DEFAULT_ALIAS
from ..predictor.model_dir import ARCHS
from . import quantize


def _ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError as exc:
        raise SystemExit(f"--k must be comma-separated integers like 1,5,10,100, got {text!r}") from exc
    if not ks or min(ks) < 1:
        raise SystemExit(f"--k must be positive integers, got {text!r}")
    return ks


_PARSERS: dict = {}         # (the train parser: its flags are handed to the workers torchrun starts)


def register(sub) -> None:
    p = sub.add_parser("train", help="train an embedding model (SimCLR on a folder, InfoNCE on click pairs)",
                       description="Train an embedding model and export it as a model directory. "
                                   "--data is a folder of images (self-supervised SimCLR), a CSV of "
                                   "(query, clicked) pairs or kafka://HOST:PORT[/TOPIC] (clicks on "
                                   "search.events).")
    pf = Flags(p, "TRAIN")
    pf.add("--data", default=None, help="folder of images, pairs CSV or kafka://HOST:PORT[/TOPIC]")
    pf.add("--out", default=None,
             help="output model directory (also holds train_log.jsonl and checkpoints/)")
    pf.add("--init", default=None, help="model directory to fine-tune (default: random init of --arch)")
    pf.add("--arch", default="resnet-tiny", choices=ARCHS, metavar="ARCH",
           help=f"architecture for random init: {', '.join(ARCHS)}")
    pf.add("--image-size", default=None, type=int,
             help="input size of a new model (arch default otherwise)")
    pf.add("--name", default=None, help="model name in the metadata")
    pf.add("--version", default=None, help="model version (default: UTC time stamp)")
    pf.add("--epochs", default=None, type=float,
           help="passes over the data (default 20 from scratch, 10 when fine-tuning with --init)")
    pf.add("--max-steps", default=None, type=int, help="optimiser steps (overrides --epochs)")
    pf.add("--batch-size", default=128, type=int, help="images (or pairs) per micro-batch")
    pf.add("--accum-steps", default=1, type=int, help="micro-batches per optimiser step")
    pf.add("--lr", default=1e-3, type=float, help="peak learning rate (AdamW)")
    pf.add("--weight-decay", default=1e-4, type=float, help="AdamW weight decay")
    pf.add("--warmup-steps", default=None, type=int, help="linear warm-up steps (default 5% of steps)")
    pf.add("--temperature", default=None, type=float,
             help="softmax temperature (default 0.2 for SimCLR, 0.07 for pairs)")
    pf.add("--holdout", default=0.0, type=float,
           help="fraction of each class held out of training; on click pairs, the fraction of queries "
                "(the offline verdict's; 0.2 with --judge-against when not given)")
    pf.add("--split-seed", default=0, type=int, help="seed of the held-out split")
    pf.add("--seed", default=0, type=int, help="seed of weights, order and augmentation")
    pf.add("--workers", default=1, type=int, help="data-loader processes (0 = in the training process)")
    pf.add("--threads", default=None, type=int, help="torch CPU threads")
    pf.add("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    pf.add("--no-amp", default=False, type=bool, help="no mixed precision on CUDA")
    pf.add("--checkpoint-every", default=200, type=int, help="optimiser steps between checkpoints")
    pf.add("--log-every", default=10, type=int, help="optimiser steps between run-log lines")
    pf.add("--resume", default=False, type=bool, help="continue from --out/checkpoints/last.pt")
    pf.add("--stop-after", default=None, type=int,
             help="stop after this many steps, keeping the checkpoint")
    pf.add("--hard-negatives-from", default=None,
             help="pairs only: Milvus URI of the current index to mine hard negatives from (needs --init)")
    pf.add("--hard-negatives-collection", default=DEFAULT_ALIAS, help="collection or alias to search")
    pf.add("--hard-negatives-k", default=10, type=int, help="neighbours searched per query")
    pf.add("--no-whiten", default=False, type=bool,
           help="export without the PCA-whitening fitted on the training images")
    pf.add("--whiten-shrinkage", default=3.0, type=float,
           help="whitening shrinkage: this multiple of the mean eigenvalue is added to each")
    pf.add("--no-select", default=False, type=bool,
           help="export the last step (whitening --whiten-shrinkage) instead of choosing the checkpoint and "
                "the whitening on the held-out validation signal (keeping the starting model when nothing beats it)")
    pf.add("--val-fraction", default=0.1, type=float,
           help="fraction of the training images (or click pairs) held out for the label-free validation signal")
    pf.add("--val-min-images", default=40, type=int,
           help="no validation (the last step is exported) when fewer images (or pairs) would be held out")
    pf.add("--val-every", default=None, type=int,
           help="optimiser steps between validations (default: an eighth of the run)")
    pf.add("--min-gain", default=0.01, type=float,
           help="how much a checkpoint must beat the starting model on the validation signal to replace it")
    pf.add("--val-views", default=3, type=int,
           help="views of each held-out image the validation signal compares (at least 2)")
    pf.add("--val-gallery", default=0, type=int,
           help="the neighbours of the held-out views among this many training images instead of among the "
                "held-out ones (0: off; see trainer/EXPERIMENTS.md)")
    pf.add("--val-confidence", default=0.95, type=float,
           help="... and how sure: the lower end of the one-sided paired interval of its gain at this level "
                "(corrected for the number of candidates) must be above zero")
    pf.add("--no-auto-augment", default=False, type=bool,
           help="SimCLR's augmentation as it is, not fitted to the catalog (grey, small, low-detail images)")
    pf.add("--no-eval", default=False, type=bool,
             help="skip evaluating the exported model on the held-out split")
    pf.add("--catalog", default=None,
           help="pairs/clicks only: folder of the catalog's images whose SimCLR batches are mixed in "
                "(a small click log cannot collapse the model)")
    pf.add("--simclr-ratio", default=0.5, type=float,
           help="with --catalog: the catalog's share of the loss (NT-Xent), the rest InfoNCE on the pairs")
    pf.add("--no-ips", default=False, type=bool,
           help="clicks: do not weight the pairs by inverse examination propensity (PBM fitted by EM)")
    pf.add("--propensity-clip", default=10.0, type=float, help="clicks: the largest inverse-propensity weight")
    pf.add("--clicks-since-ms", default=None, type=int,
           help="clicks: only those logged after this time (ms since the epoch) make pairs; the propensities "
                "are fitted on the whole log (the learning loop passes the serving version's training time)")
    pf.add("--judge-against", default=None,
           help="after export (rank 0): the offline verdict of the new model against raw pixels, random "
                "init and this SERVING model directory on the held-out click pairs (or held-out split), "
                "written to the new model's vsearch_model.json (evaluation.verdict; see vsearch judge)")
    pf.add("--nproc-per-node", default=1, type=int,
           help="training processes on this machine: >1 launches torchrun (DDP; gloo on CPU, nccl on GPU); "
                "--batch-size stays the global batch")
    pf.add("--max-restarts", default=0, type=int,
           help="with --nproc-per-node: restarts of the whole group when a process fails (each resumes "
                "from the last checkpoint)")
    pf.add("--no-progress", default=False, type=bool, help="no progress bar")
    p.set_defaults(handler=_train)
    _PARSERS["train"] = p

    j = sub.add_parser("judge", help="offline verdict of a new model against raw pixels, random init and "
                                     "the serving model, written into its vsearch_model.json",
                       description="Search the catalog with the held-out queries of a click log (pairs CSV "
                                   "or kafka://HOST:PORT/TOPIC; split by query, as training held them out) "
                                   "and score the clicked items (MRR, recall@10) with the new model, the "
                                   "serving one, raw pixels and random init; or a labelled folder's "
                                   "held-out split. The verdict goes to the new model's vsearch_model.json "
                                   "(evaluation.verdict). Exit 0: it beats all three; 4: it does not; "
                                   "2: error.")
    jf = Flags(j, "JUDGE")
    jf.add("--model-dir", default=None, help="the new model directory (its metadata gets the verdict)")
    jf.add("--against", default=None, help="the serving model directory")
    jf.add("--data", default=None, help="pairs CSV, kafka://HOST:PORT[/TOPIC] or a labelled folder")
    jf.add("--catalog", default=None, help="folder of the catalog's images: the pool the queries search")
    jf.add("--holdout", default=None, type=float,
           help="held-out fraction of queries (default: the model's training record, else 0.2)")
    jf.add("--split-seed", default=None, type=int, help="seed of the split (default: the training record's)")
    jf.add("--threads", default=None, type=int, help="torch CPU threads")
    j.set_defaults(handler=_judge)

    e = sub.add_parser("evaluate", help="offline retrieval metrics of models and baselines",
                       description="Compare models (and baselines) on a labelled folder or a "
                                   "judgments CSV (query,candidate,grade 0-5): table on stdout, "
                                   "report.json and report.png in --out.")
    ef = Flags(e, "EVALUATE")
    e.add_argument("--model-dir", action="append", default=[], help="model directory (repeatable)")
    ef.add("--data", default=None,
             help="labelled folder (class sub-folders or labels.csv) or judgments CSV")
    ef.add("--k", default="1,5,10,100", help="cut-offs for recall/precision/nDCG")
    ef.add("--baselines", default="", help="comma-separated: raw-pixels, random-init")
    ef.add("--split", default="all",
             help="all, train or held-out (with --holdout/--split-seed of training)")
    ef.add("--holdout", default=0.3, type=float, help="held-out fraction used at training")
    ef.add("--split-seed", default=0, type=int, help="seed of the held-out split used at training")
    ef.add("--out", default="evaluation", help="folder for report.json and report.png")
    ef.add("--threads", default=None, type=int, help="torch CPU threads")
    ef.add("--write-meta", default=False, type=bool,
             help="store each model's result in its vsearch_model.json")
    e.set_defaults(handler=_evaluate)
    quantize.register(sub)


def _train(args) -> int:
    from ..predictor.inference import set_torch_threads
    from .data import DataError
    from .distributed import launch, launched, shutdown
    from .train import TrainConfig, data_kind, train
    if not args.data or not args.out:
        print("vsearch train: --data and --out are required", file=sys.stderr)
        return 2
    if args.init and args.image_size:
        print("vsearch train: --image-size applies to a new model, not to --init", file=sys.stderr)
        return 2
    if args.nproc_per_node > 1 and not launched():
        return launch(args.nproc_per_node, ["train", *_worker_argv(args)], args.max_restarts)
    set_torch_threads(args.threads)
    try:
        kind = data_kind(args.data)
        if args.judge_against:
            from ..predictor.model_dir import read_meta
            from .judge import DEFAULT_HOLDOUT
            read_meta(args.judge_against)            # before training: a wrong folder fails now
            args.holdout = args.holdout or DEFAULT_HOLDOUT
        temperature = args.temperature or (0.2 if kind == "simclr" else 0.07)
        cfg = TrainConfig(
            data=args.data, out=args.out, init=args.init, arch=args.arch, image_size=args.image_size,
            name=args.name, version=args.version, epochs=args.epochs, max_steps=args.max_steps,
            batch_size=args.batch_size, accum_steps=args.accum_steps, lr=args.lr,
            weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, temperature=temperature,
            holdout=args.holdout, split_seed=args.split_seed, seed=args.seed, workers=args.workers,
            device=args.device, amp=not args.no_amp,
            checkpoint_every=args.checkpoint_every, log_every=args.log_every, resume=args.resume,
            stop_after=args.stop_after,
            evaluate=kind == "simclr" and not args.no_eval and not args.judge_against,
            whiten=not args.no_whiten, whiten_shrinkage=args.whiten_shrinkage,
            progress=not args.no_progress, hard_negatives_from=args.hard_negatives_from,
            hard_negatives_collection=args.hard_negatives_collection,
            hard_negatives_k=args.hard_negatives_k, catalog=args.catalog, simclr_ratio=args.simclr_ratio,
            ips=not args.no_ips, propensity_clip=args.propensity_clip,
            clicks_since_ms=args.clicks_since_ms, select=not args.no_select,
            val_fraction=args.val_fraction, val_min_images=args.val_min_images, val_every=args.val_every, min_gain=args.min_gain,
            val_confidence=args.val_confidence, val_views=args.val_views,
            val_gallery=args.val_gallery,
            auto_augment=not args.no_auto_augment)
        try:
            out = train(cfg)
        finally:
            shutdown()
        if os.environ.get("RANK", "0") != "0":        # under torchrun rank 0 reports
            return 0
        if args.stop_after and not (out / "config.json").exists():
            print(f"stopped after {args.stop_after} steps; continue with --resume")
            return 0
        print(f"exported {out}")
        selection = (json.loads((out / "vsearch_model.json").read_text()).get("training") or {}).get("selection")
        if selection:
            print(f"selection: {selection['reason']}")
        report = out / "evaluation" / "report.json"
        if cfg.evaluate and report.exists():
            from .evaluate import format_table
            print(format_table(json.loads(report.read_text())))
        if args.judge_against:
            from .judge import format_report, judge
            print(format_report(judge(str(out), args.judge_against, args.data, catalog=args.catalog,
                                      holdout=args.holdout, split_seed=args.split_seed)), flush=True)
    except (DataError, ValueError, OSError) as exc:
        print(f"vsearch train: {exc}", file=sys.stderr)
        return 2
    return 0


def _worker_argv(args) -> list[str]:
    """The flags of ``vsearch train`` as given (those not at their default), for the workers
    torchrun starts; the launcher's own flags left out."""
    argv = []
    for action in _PARSERS["train"]._actions:
        if not action.option_strings or action.dest in ("help", "nproc_per_node", "max_restarts"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[0]
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _judge(args) -> int:
    from ..predictor.inference import set_torch_threads
    from .data import DataError
    from .judge import LOST, format_report, judge
    if not args.model_dir or not args.data:
        print("vsearch judge: --model-dir and --data are required", file=sys.stderr)
        return 2
    set_torch_threads(args.threads)
    try:
        report = judge(args.model_dir, args.against, args.data, catalog=args.catalog, holdout=args.holdout,
                       split_seed=args.split_seed)
    except (DataError, ValueError, OSError) as exc:
        print(f"vsearch judge: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"verdict written to {args.model_dir}/vsearch_model.json (evaluation.verdict)")
    return 0 if report["verdict"]["beats_all"] else LOST


def _evaluate(args) -> int:
    from ..predictor.inference import set_torch_threads
    from .data import DataError
    from .evaluate import evaluate_models, format_table, store_in_meta, write_outputs
    if not args.data:
        print("vsearch evaluate: --data is required", file=sys.stderr)
        return 2
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    if not args.model_dir and not baselines:
        print("vsearch evaluate: give at least one --model-dir or --baselines", file=sys.stderr)
        return 2
    set_torch_threads(args.threads)
    try:
        report = evaluate_models(args.model_dir, args.data, ks=_ks(args.k), baselines=baselines,
                                 split=args.split, holdout=args.holdout, split_seed=args.split_seed)
        js, png = write_outputs(report, args.out)
        if args.write_meta:
            for d in args.model_dir:
                store_in_meta(d, report)
    except (DataError, ValueError, OSError) as exc:
        print(f"vsearch evaluate: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"report: {js}\nplot:   {png}")
    return 0
