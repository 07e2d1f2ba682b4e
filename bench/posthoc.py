"""Test-time variants of a trained model on a labelled folder's held-out split, without
retraining: which layer to pool, GeM pooling, PCA-whitening (fitted on the training split) at
several shrinkages, other serving resolutions; and raw pixels with the same whitening. The
rows marked post-hoc in ``trainer/EXPERIMENTS.md`` come from here.

    python -m bench.posthoc --data ../shared/data/caltech101 --model-dir models/default \\
        [--checkpoint runs/x/checkpoints/last.pt --arch resnet-small --image-size 64] \\
        [--shrinkage 0,0.1,0.3,1,3] [--sizes 64,80,96] [--layers] [--raw]

The model's own whitening, if it has one, is left out: every variant starts from the pooled
features. Same metrics and split as ``vsearch evaluate --split held-out``.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from vsearch.predictor.preprocess import image_to_array, stack
from vsearch.predictor.zoo import build_model, fit_whitening, load_model_dir
from vsearch.trainer import metrics
from vsearch.trainer.data import list_images, split_holdout
from vsearch.trainer.evaluate import decode_all, raw_pixel_embed
from vsearch.trainer.train import load_checkpoint


def stage_features(net, cfg, images, batch: int = 128) -> list[torch.Tensor]:
    """The feature maps of every ResNet stage, [N, C, H, W] each."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(stack([image_to_array(im, cfg) for im in images[i:i + batch]]))
            out.append(net.backbone(pixel_values=x, output_hidden_states=True).hidden_states[1:])
    return [torch.cat(s) for s in zip(*out)]


def gem(h: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    return h.clamp(min=1e-6).pow(p).mean((2, 3)).pow(1 / p)


def whiten(train: np.ndarray, held: np.ndarray, shrinkage: float) -> np.ndarray:
    with torch.no_grad():
        return F.normalize(fit_whitening(train, shrinkage)(torch.as_tensor(held)), dim=-1).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--checkpoint", default=None, help="a trainer checkpoint instead of a model dir")
    p.add_argument("--arch", default="resnet-small")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--shrinkage", default="0,0.1,0.3,1,3")
    p.add_argument("--sizes", default="", help="other serving resolutions to try")
    p.add_argument("--layers", action="store_true", help="also stage 2/3 pooling and GeM")
    p.add_argument("--raw", action="store_true", help="raw pixels, plain and whitened")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shrinks = [float(s) for s in args.shrinkage.split(",") if s]
    train, held = split_holdout(list_images(args.data), 0.3, 0)
    images, _ = decode_all([r.source for r in train + held])
    tr, ho = [images[r.source] for r in train], [images[r.source] for r in held]
    labels = [r.label for r in held]

    def row(name, feats):
        m = metrics.evaluate_embeddings(np.asarray(feats, np.float32), labels, (1, 10))["metrics"]
        print(f"{name:<60} mAP@R {m['map@r']:.4f}  R@1 {m['recall@1']:.4f}  "
              f"P@1 {m['precision@1']:.4f}  nDCG@10 {m['ndcg@10']:.4f}", flush=True)

    def rows(name, a, b):
        row(f"{name}, plain", b)
        for s in shrinks:
            row(f"{name}, whitened (shrinkage {s:g})", whiten(a, b, s))

    if args.raw:
        rows("raw pixels 32x32", raw_pixel_embed(tr), raw_pixel_embed(ho))
    if not (args.model_dir or args.checkpoint):
        return 0
    if args.checkpoint:
        net, meta = build_model(args.arch, image_size=args.image_size)
        ck = load_checkpoint(args.checkpoint)
        net.load_state_dict({k[4:]: v for k, v in ck["modules"].items() if k.startswith("net.")})
        name = f"{args.checkpoint} (step {ck['step']})"
    else:
        net, meta = load_model_dir(args.model_dir)
        name = args.model_dir
    net.whitening = None
    net.eval()
    sizes = [meta.image_size] + [int(s) for s in args.sizes.split(",") if s]
    for size in sizes:
        cfg = dataclasses.replace(meta.preprocess, image_size=size,
                                  resize_size=round(size * meta.resize_size / meta.image_size))
        fa, fb = stage_features(net, cfg, tr), stage_features(net, cfg, ho)
        rows(f"{name} @{size}px, last stage avg", fa[-1].mean((2, 3)), fb[-1].mean((2, 3)))
        if args.layers and size == meta.image_size:
            rows(f"{name} @{size}px, last stage GeM", gem(fa[-1]), gem(fb[-1]))
            for i in (-2, -3)[:len(fa) - 1]:                 # stages 3 and 2 of a 4-stage net
                rows(f"{name} @{size}px, stage {len(fa) + i + 1} avg", fa[i].mean((2, 3)), fb[i].mean((2, 3)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
