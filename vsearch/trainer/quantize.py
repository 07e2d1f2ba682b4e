"""``vsearch quantize``: a model directory's int8 graph for the ``onnxruntime-int8`` runtime.

The network is exported to ONNX as the float32 runtimes export it (whitening and L2 inside the
graph), then statically quantized by ONNX Runtime: QDQ format, int8 weights per output channel,
uint8 activations whose ranges are calibrated (min/max) on catalog images run through the
model's own preprocessing. The cost is measured before anything is written: mAP@R of the
float32 network and of the int8 graph on the held-out split of a labelled folder (the
trainer's split: ``--holdout``/``--split-seed``); over ``--max-loss`` (relative, default 1 %)
nothing is written and the command exits 3. Within it, ``int8/model.onnx`` and
``int8/quantization.json`` (the weights' digest, the calibration, the measured quality) go into
the model directory, and ``--runtime onnxruntime-int8`` serves them
(:func:`vsearch.predictor.runtimes.int8_forward` re-checks digest, budget and agreement at
every load).

When the calibration folder is the labelled evaluation folder, only its training split is used
for calibration, so the quality is measured on images the ranges never saw.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..core.config import Flags

log = logging.getLogger(__name__)


class QuantizeRefused(RuntimeError):
    """The int8 graph loses more quality than the budget allows (nothing was written)."""


def register(sub) -> None:
    p = sub.add_parser("quantize", help="make a model directory's int8 graph (--runtime onnxruntime-int8)",
                       description="Quantize a model directory's network to int8 (static, calibrated "
                                   "on catalog images), measure the mAP@R it costs on a labelled "
                                   "held-out split, and write it into the model directory when the "
                                   "loss is within --max-loss.")
    f = Flags(p, "QUANTIZE")
    f.add("--model-dir", default=None, help="the model directory (int8/ is written into it)")
    f.add("--calibration", default=None, help="folder of catalog images for the activation ranges")
    f.add("--evaluate", default=None, help="labelled folder (class sub-folders or labels.csv) to measure on")
    f.add("--images", default=256, type=int, help="calibration images")
    f.add("--holdout", default=0.3, type=float, help="held-out fraction of --evaluate measured on")
    f.add("--split-seed", default=0, type=int, help="seed of the held-out split")
    f.add("--max-loss", default=0.01, type=float, help="largest relative mAP@R loss written (0.01 = 1 %%)")
    f.add("--threads", default=None, type=int, help="CPU threads")
    p.set_defaults(handler=_quantize)


def _quantize(args) -> int:
    from .data import DataError
    missing = [flag for flag, v in (("--model-dir", args.model_dir), ("--calibration", args.calibration),
                                    ("--evaluate", args.evaluate)) if not v]
    if missing:
        print(f"vsearch quantize: {', '.join(missing)} required", file=sys.stderr)
        return 2
    if args.images < 1:
        print(f"vsearch quantize: --images {args.images}: at least 1", file=sys.stderr)
        return 2
    try:
        record = quantize_model(args.model_dir, args.calibration, args.evaluate, images=args.images,
                                holdout=args.holdout, split_seed=args.split_seed, max_loss=args.max_loss,
                                threads=args.threads)
    except QuantizeRefused as exc:
        print(f"vsearch quantize: {exc}", file=sys.stderr)
        return 3
    except (DataError, ValueError, OSError) as exc:
        print(f"vsearch quantize: {exc}", file=sys.stderr)
        return 2
    q = record["quality"]
    print(f"mAP@R on {q['images']} held-out images of {q['data']}: float32 {q['fp32']:.4f}, "
          f"int8 {q['int8']:.4f} ({100 * q['relative_loss']:.2f} % lost, budget {100 * q['max_loss']:.2f} %)")
    print(f"wrote {Path(args.model_dir) / 'int8'}: serve it with --runtime onnxruntime-int8")
    return 0


def _calibration_records(calibration: str, evaluate: str, n: int, holdout: float, split_seed: int) -> list:
    from .data import DataError, list_images, select_split
    records = list_images(calibration)
    if Path(calibration).resolve() == Path(evaluate).resolve():
        records = select_split(records, "train", holdout, split_seed)
    if not records:
        raise DataError(f"--calibration {calibration}: no images to calibrate on")
    random.Random(0).shuffle(records)
    return records[:n]


def _read(records) -> list[bytes]:
    return [Path(r.source).read_bytes() for r in records]


def quantize_model(model_dir, calibration, evaluate, *, images: int = 256, holdout: float = 0.3,
                   split_seed: int = 0, max_loss: float = 0.01, threads: int | None = None) -> dict:
    """Quantize, measure, and (within ``max_loss``) write ``int8/`` into ``model_dir``; the record
    written (:class:`QuantizeRefused` when over the budget, with nothing written)."""
    import numpy as np
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..predictor.inference import Embedder
    from ..predictor.runtimes import (
        INT8_DIR,
        INT8_GRAPH,
        INT8_RECORD,
        OnnxRuntimeForward,
        export_onnx,
        weights_digest,
    )
    from .data import DataError, list_images, select_split
    from .metrics import evaluate_embeddings

    model_dir = Path(model_dir)
    emb = Embedder(model_dir, runtime="eager", threads=threads)
    held = [r for r in select_split(list_images(evaluate), "held-out", holdout, split_seed) if r.label is not None]
    if len({r.label for r in held}) < 2:
        raise DataError(f"--evaluate {evaluate}: its held-out split needs labelled images of 2 classes or more")
    calib = _calibration_records(calibration, evaluate, images, holdout, split_seed)
    t0 = time.perf_counter()
    cal_arrays = emb.preprocess_bytes(_read(calib))
    with tempfile.TemporaryDirectory(prefix="vsearch-int8-") as tmp:
        graph = export_onnx(emb.net.requires_grad_(False), emb.meta, Path(tmp))
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / INT8_GRAPH
        quant_pre_process(str(graph), str(pre))

        class Batches(CalibrationDataReader):
            def __init__(self):
                self.it = iter(cal_arrays[i:i + 32] for i in range(0, len(cal_arrays), 32))

            def get_next(self):
                batch = next(self.it, None)
                return None if batch is None else {"pixel_values": np.ascontiguousarray(batch, np.float32)}

        quantize_static(str(pre), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        seconds = time.perf_counter() - t0
        x = emb.preprocess_bytes(_read(held))
        labels = [r.label for r in held]
        fp32 = evaluate_embeddings(emb.embed_arrays(x), labels)["metrics"]["map@r"]
        q = OnnxRuntimeForward(out, emb.threads)
        int8 = evaluate_embeddings(np.concatenate([q(np.ascontiguousarray(x[i:i + 32], np.float32))
                                                   for i in range(0, len(x), 32)]), labels)["metrics"]["map@r"]
        loss = max(0.0, (fp32 - int8) / fp32) if fp32 > 0 else 0.0
        quality = {"data": str(evaluate), "split": f"held-out {holdout} seed {split_seed}", "images": len(held),
                   "metric": "map@r", "fp32": round(float(fp32), 6), "int8": round(float(int8), 6),
                   "relative_loss": round(float(loss), 6), "max_loss": float(max_loss)}
        if not loss <= max_loss:
            raise QuantizeRefused(f"int8 loses {100 * loss:.2f} % of mAP@R ({fp32:.4f} -> {int8:.4f} on "
                                  f"{len(held)} held-out images of {evaluate}), over the budget of "
                                  f"{100 * max_loss:.2f} %: nothing written")
        record = {"weights_sha256": weights_digest(emb.net), "model": emb.meta.model_id,
                  "format": "QDQ, int8 weights per channel, uint8 activations, min/max calibration",
                  "onnxruntime": onnxruntime.__version__,
                  "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "calibration": {"data": str(calibration), "images": len(calib), "seconds": round(seconds, 1)},
                  "quality": quality}
        # written beside, then moved into place: a reader sees the old int8/ or the new one
        stage = Path(tempfile.mkdtemp(prefix=".int8-", dir=model_dir))
        stage.chmod(0o755)             # mkdtemp makes it 0700: the serving user must read it
        try:
            shutil.copyfile(out, stage / INT8_GRAPH)
            (stage / INT8_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            final = model_dir / INT8_DIR
            if final.exists():
                shutil.rmtree(final)
            os.replace(stage, final)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    log.info("int8 graph of %s: mAP@R %.4f -> %.4f", emb.meta.model_id, fp32, int8)
    return record
