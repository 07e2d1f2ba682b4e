"""Embedder throughput: images/s at batch sizes 1, 8 and 32 with a ResNet-18 (random init,
224 px), for

- eager forward: the network as loaded, on pre-made tensors,
- forward:  our optimised forward pass (channels-last, TorchScript-frozen for conv nets) on
            pre-made tensors: the ceiling of the pipeline,
- pipeline: our full in-process pipeline, JPEG bytes -> embedding (Embedder.embed_stream),
- http:     our KServe server over HTTP (V2, base64 JPEGs, one request per batch),
- naive:    a per-image loop: PIL open -> RGB -> resize -> tensor -> forward, one at a time.

    python -m bench.embedder [--images 96] [--batches 1,8,32] [--repeats 3] [--model-dir DIR]

Prints a table and the ratios pipeline/naive and pipeline/forward at each batch size.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import tempfile
import time

import numpy as np
import requests
import torch
from PIL import Image

from vsearch.local.samples import photos as sample_photos
from vsearch.local.services import start_embedder
from vsearch.predictor.inference import Embedder
from vsearch.predictor.zoo import init_model_dir, load_model_dir


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def best_of(repeats: int, fn, *args) -> float:
    """The best rate of ``repeats`` runs: the least disturbed by other work on the machine."""
    return max(fn(*args) for _ in range(repeats))


def bench_forward(embed, size: int, n: int, batch: int) -> float:
    """``embed`` on pre-made [batch, 3, size, size] arrays: the network alone."""
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    embed(x)                                                # warm-up
    t0 = time.perf_counter()
    for _ in range(max(1, n // batch)):
        embed(x)
    return rate(max(1, n // batch) * batch, time.perf_counter() - t0)


def eager_embed(net):
    def embed(x):
        with torch.inference_mode():
            return net.embed(torch.as_tensor(x)).numpy()
    return embed


def bench_pipeline(emb: Embedder, photos: list[bytes], batch: int) -> float:
    emb.batch_size = batch
    list(emb.embed_stream(iter(photos[:batch])))            # warm-up
    t0 = time.perf_counter()
    rows = sum(len(v) for v in emb.embed_stream(iter(photos)))
    return rate(rows, time.perf_counter() - t0)


def bench_http(url: str, photos: list[bytes], batch: int) -> float:
    session = requests.Session()
    payloads = [[base64.b64encode(p).decode() for p in photos[i:i + batch]]
                for i in range(0, len(photos), batch)]

    def call(data):
        r = session.post(f"{url}/v2/models/embedder/infer", timeout=300, json={"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [len(data)], "data": data}]})
        r.raise_for_status()
        return r.json()["outputs"][0]["shape"][0]

    call(payloads[0])                                       # warm-up
    t0 = time.perf_counter()
    rows = sum(call(d) for d in payloads)
    return rate(rows, time.perf_counter() - t0)


def bench_naive(net, meta, photos: list[bytes]) -> float:
    """What a first attempt looks like: the eager network loaded as it is, one image at a
    time (PIL -> RGB -> resize -> tensor -> normalise -> forward)."""
    size = meta.image_size
    mean = torch.tensor(meta.mean).view(3, 1, 1)
    std = torch.tensor(meta.std).view(3, 1, 1)

    def one(data):
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size))
        x = torch.tensor(np.array(img), dtype=torch.float32).permute(2, 0, 1) / 255.0
        with torch.no_grad():
            return net.embed(((x - mean) / std).unsqueeze(0))

    one(photos[0])
    t0 = time.perf_counter()
    for p in photos:
        one(p)
    return rate(len(photos), time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is reported")
    ap.add_argument("--model-dir", default=None, help="default: a random-init ResNet-18 (224 px)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model_dir or os.path.join(tmp.name, "resnet18")
    if not args.model_dir:
        init_model_dir("resnet18", model_dir, name="resnet18-bench")
    photos = sample_photos(args.images)
    emb = Embedder(model_dir)
    print(f"model {emb.meta.name} ({emb.meta.family}, {emb.meta.image_size}px, {emb.dim}-d); "
          f"{len(photos)} photos; torch threads {torch.get_num_threads()}; device {emb.device}")

    eager, meta = load_model_dir(model_dir)
    eager.eval()
    naive = best_of(args.repeats, bench_naive, eager, meta, photos)
    rows = []
    server = start_embedder(model_dir, log_path=os.path.join(tmp.name, "embedder.log"),
                            extra=("--max-batch", str(max(batches))))
    try:
        for b in batches:
            size = emb.meta.image_size
            r = args.repeats
            rows.append((b, best_of(r, bench_forward, eager_embed(eager), size, len(photos), b),
                         best_of(r, bench_forward, emb.embed_arrays, size, len(photos), b),
                         best_of(r, bench_pipeline, emb, photos, b),
                         best_of(r, bench_http, server.url, photos, b)))
    finally:
        server.stop()

    print()
    print(f"{'batch':>5} | {'eager forward':>13} | {'forward img/s':>13} | {'pipeline img/s':>14} | "
          f"{'http img/s':>10} | {'naive img/s':>11} | {'pipeline/naive':>14} | {'pipeline/forward':>16}")
    print("-" * 117)
    for b, eager_fwd, fwd, pipe, http in rows:
        print(f"{b:>5} | {eager_fwd:>13.1f} | {fwd:>13.1f} | {pipe:>14.1f} | {http:>10.1f} | "
              f"{naive:>11.1f} | {pipe / naive:>13.2f}x | {pipe / fwd:>15.0%}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
