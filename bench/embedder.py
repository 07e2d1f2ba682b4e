"""Embedder throughput: images/s at batch sizes 1, 8 and 32 with a ResNet-18 (random init,
224 px), two tables.

Runtimes (``--runtime`` of the commands that embed: eager, torchscript, onnxruntime, openvino),
each with ``--threads`` intra-op threads (default: the CPUs):

- forward:  the runtime's forward pass on pre-made tensors (``Embedder.embed_arrays``), and its
            ratio to eager PyTorch at the same batch size,
- pipeline: the full in-process pipeline on the same runtime, JPEG bytes -> embedding
            (``Embedder.embed_stream``: decoding on a thread pool overlaps the forward pass),
            and its ratio to the runtime's own forward pass.

Serving, on ``--runtime`` (default onnxruntime, the chart's):

- eager forward: the network as loaded, on pre-made tensors,
- forward:  the runtime's forward pass on pre-made tensors: the ceiling of the pipeline,
- pipeline: the full in-process pipeline, JPEG bytes -> embedding,
- http:     our KServe server over HTTP (V2, base64 JPEGs, one request per batch),
- naive:    a per-image loop: PIL open -> RGB -> resize -> tensor -> eager forward, one at a time.

    python -m bench.embedder [--images 96] [--batches 1,8,32] [--repeats 3] [--model-dir DIR]
        [--runtimes eager,torchscript,onnxruntime,openvino] [--runtime onnxruntime] [--threads N]
        [--part runtimes,int8,serving]

int8 (``--part int8``): the ``onnxruntime-int8`` runtime on the graph ``vsearch quantize``
makes (static, QDQ, per-channel int8 weights, uint8 activations calibrated on 256 Caltech-101
images of the trainer's training split); a row of the first table, and the quality it costs:
mAP@R of models/default on the held-out split, float32 vs int8, against the 1 % budget.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shutil
import tempfile
import time

import numpy as np
import requests
import torch
from PIL import Image

from vsearch.local.samples import CALTECH
from vsearch.local.samples import photos as sample_photos
from vsearch.local.services import start_embedder
from vsearch.predictor.inference import Embedder, set_torch_threads
from vsearch.predictor.model_dir import default_model_dir, read_meta
from vsearch.predictor.runtimes import CACHE_ENV, INT8, RUNTIMES, runtime
from vsearch.predictor.zoo import init_model_dir, load_model_dir
from vsearch.trainer.quantize import QuantizeRefused, quantize_model


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


# --------------------------------------------------------------------------- int8

def int8_copy(model_dir: str, out: str, threads: int) -> str:
    """A copy of ``model_dir`` with its int8 graph made by ``vsearch quantize`` (calibrated on
    256 Caltech-101 images of the trainer's training split), whatever its quality: for the
    speed row of a model that is not the one whose quality is measured."""
    shutil.copytree(model_dir, out)
    quantize_model(out, CALTECH, CALTECH, max_loss=float("inf"), threads=threads)
    return out


def runtime_rows(model_dir: str, runtimes: list[str], photos: list[bytes], batches: list[int],
                 repeats: int, threads: int, int8_dir: str | None = None) -> dict:
    """{runtime: {batch: (forward img/s, pipeline img/s)}}, each the best of ``repeats`` rounds;
    a round measures every runtime at every batch size in turn, so that a busy neighbour on a
    shared machine slows them alike."""
    embedders = {r: Embedder(model_dir, runtime=r, threads=threads) for r in runtimes}
    if int8_dir:
        embedders[INT8] = Embedder(int8_dir, runtime=INT8, threads=threads)
    size = next(iter(embedders.values())).meta.image_size
    best = {r: {b: (0.0, 0.0) for b in batches} for r in embedders}
    try:
        for _ in range(repeats):
            for r, emb in embedders.items():
                for b in batches:
                    emb.batch_size = b
                    fwd = bench_forward(emb.embed_arrays, size, len(photos), b)
                    pipe = bench_pipeline(emb, photos, b)
                    best[r][b] = (max(best[r][b][0], fwd), max(best[r][b][1], pipe))
    finally:
        for emb in embedders.values():
            emb.close()
    return best


def print_runtimes(best: dict, batches: list[int]) -> None:
    """One row per runtime and batch size: the forward pass on pre-made tensors, its ratio to
    eager PyTorch at the same batch size, the full pipeline (JPEG bytes -> vector) and its
    ratio to the runtime's own forward pass."""
    print(f"\n{'runtime':<16} | {'batch':>5} | {'forward img/s':>13} | {'x eager':>7} | "
          f"{'pipeline img/s':>14} | {'pipeline/forward':>16}")
    print("-" * 90)
    for r, by_batch in best.items():
        for b in batches:
            fwd, pipe = by_batch[b]
            eager = best.get("eager", {}).get(b, (float("nan"),))[0]
            print(f"{r:<16} | {b:>5} | {fwd:>13.1f} | {fwd / eager:>6.2f}x | {pipe:>14.1f} | {pipe / fwd:>15.0%}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is reported")
    ap.add_argument("--model-dir", default=None, help="default: a random-init ResNet-18 (224 px)")
    ap.add_argument("--runtimes", default=",".join(r for r in RUNTIMES if r != INT8),
                    help="the runtimes of the first table (comma-separated; eager is the baseline)")
    ap.add_argument("--runtime", default="onnxruntime", type=runtime,
                    help="the runtime of the second table's pipeline and server (the chart's default)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="intra-op threads of every runtime (torch, ONNX Runtime, OpenVINO)")
    ap.add_argument("--part", default="runtimes,int8,serving",
                    help="runtimes, int8 (the onnxruntime-int8 row, and its quality) and/or serving")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    runtimes = [runtime(r) for r in args.runtimes.split(",") if r.strip()]
    parts = {p.strip() for p in args.part.split(",")}
    set_torch_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    os.environ.setdefault(CACHE_ENV, os.path.join(tmp.name, "runtime-cache"))
    model_dir = args.model_dir or os.path.join(tmp.name, "resnet18")
    if not args.model_dir:
        init_model_dir("resnet18", model_dir, name="resnet18-bench")
    photos = sample_photos(args.images)
    meta = read_meta(model_dir)
    print(f"model {meta.name} ({meta.family}, {meta.image_size}px, {meta.embedding_dim}-d); "
          f"{len(photos)} photos; {args.threads} intra-op threads (torch, ONNX Runtime, OpenVINO); "
          f"{os.cpu_count()} CPUs")

    int8_dir = None
    if "int8" in parts:
        int8_dir = int8_copy(model_dir, os.path.join(tmp.name, "int8-model"), args.threads)
    if "runtimes" in parts:
        print_runtimes(runtime_rows(model_dir, runtimes, photos, batches, args.repeats, args.threads,
                                    int8_dir), batches)
    if "int8" in parts:
        try:
            q = quantize_model(shutil.copytree(default_model_dir(), os.path.join(tmp.name, "default-int8")),
                               CALTECH, CALTECH, threads=args.threads)["quality"]
            verdict = "within the 1 % budget: `vsearch quantize` writes it"
        except QuantizeRefused as exc:
            q, verdict = None, str(exc)
        if q:
            print(f"\nint8 quality, models/default on the Caltech-101 held-out split ({q['images']} images, "
                  f"mAP@R): float32 {q['fp32']:.4f}, int8 {q['int8']:.4f}, relative loss "
                  f"{q['relative_loss']:.2%} (calibrated on 256 images of the training split): {verdict}")
        else:
            print(f"\nint8 quality, models/default: {verdict}")
    if "serving" not in parts:
        tmp.cleanup()
        return 0

    emb = Embedder(model_dir, runtime=args.runtime, threads=args.threads)
    eager, meta = load_model_dir(model_dir)
    eager.eval()
    naive = best_of(args.repeats, bench_naive, eager, meta, photos)
    rows = []
    server = start_embedder(model_dir, log_path=os.path.join(tmp.name, "embedder.log"),
                            extra=("--max-batch", str(max(batches)), "--runtime", args.runtime,
                                   "--threads", str(args.threads)))
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

    print(f"\nserving on {args.runtime}:")
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
