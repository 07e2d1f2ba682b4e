"""The runtimes that run the embedding network, chosen with ``--runtime``:

- ``eager``: the PyTorch network as loaded (:class:`~vsearch.predictor.zoo.EmbeddingNet`),
- ``torchscript``: the same network traced, frozen and optimised by TorchScript (conv nets;
  transformers stay eager) - the default,
- ``onnxruntime``: the network exported to ONNX and run by ONNX Runtime's CPU provider,
- ``openvino``: the same ONNX graph compiled by OpenVINO for the CPU (float32 precision),
- ``onnxruntime-int8``: the graph statically quantized to int8 (QDQ, per-channel int8 weights,
  uint8 activations calibrated on catalog images) on ONNX Runtime. It is not made at load time:
  ``vsearch quantize`` makes it once, offline, into the model directory (``int8/``), measures
  what it costs in retrieval quality on a labelled held-out split and refuses to write it over
  the budget (1 % relative mAP@R by default); the runtime serves it only for the weights it was
  made from (:func:`weights_digest`), within that budget, and when it agrees with the eager
  network (cosine >= :data:`INT8_MIN_COSINE` on random inputs at every load).

What is trained is what is served: the exported graph is traced from the network the model
directory loads into (:func:`~vsearch.predictor.zoo.load_model_dir`), whitening and L2
normalisation included, at load time; the preprocessing stays the shared one of
:mod:`.preprocess`. Every load checks the runtime against the eager network on random inputs at
two batch sizes (:data:`TOLERANCE`) and refuses to serve a graph that differs.

The export runs when a model is loaded, not when it is trained: any model directory serves on
any runtime (trained, ``model init``-ed, a Hugging Face ``save_pretrained`` folder), nothing in
the directory can go stale against its weights, and the graph is made by the torch of the image
that runs it. It is cached (:func:`cache_dir`) under the digest of the network's tensors and the
exporter's version, so a restart reuses it; the check runs on every load.

ONNX Runtime and OpenVINO come with the ``runtimes`` extra (``pip install 'vsearch[runtimes]'``;
the image has it). No torch at import time: the command line reads :data:`RUNTIMES` from here.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

INT8 = "onnxruntime-int8"
RUNTIMES = ("eager", "torchscript", "onnxruntime", "openvino", INT8)
DEFAULT_RUNTIME = "torchscript"
EXPORTED = ("onnxruntime", "openvino", INT8)    # the runtimes that run an ONNX graph
# The int8 graph, written by ``vsearch quantize`` into the model directory.
INT8_DIR, INT8_GRAPH, INT8_RECORD = "int8", "model.onnx", "quantization.json"
INT8_MAX_LOSS = 0.01             # the default budget: relative mAP@R lost to int8
INT8_MIN_COSINE = 0.97           # the int8 graph vs the eager network on random inputs (ranges
#                                  calibrated on 256 photos: 0.998; on 32: 0.987)
# Largest difference allowed between a runtime's embedding and the eager network's, per
# component of the L2-normalised vector (float32 throughout; what the runtimes reach is ~1e-6).
TOLERANCE = 1e-4
OPSET = 17
EXPORT_VERSION = "1"             # bump when the export below changes: old cache entries are not reused
CACHE_ENV = "VSEARCH_RUNTIME_CACHE"

log = logging.getLogger(__name__)


class UnknownRuntime(argparse.ArgumentTypeError, ValueError):
    """A runtime name that is not one of :data:`RUNTIMES` (argparse shows this message)."""


class RuntimeUnavailable(RuntimeError):
    """The runtime's package is not installed, or the network cannot be exported to it."""


class RuntimeMismatch(RuntimeError):
    """The runtime's embeddings differ from the eager network's by more than :data:`TOLERANCE`."""


def runtime(text: str) -> str:
    """A runtime name (the type of the ``--runtime`` flags): one of :data:`RUNTIMES`."""
    name = str(text).strip().lower()
    if name not in RUNTIMES:
        raise UnknownRuntime(f"unknown runtime {text!r}: expected one of {', '.join(RUNTIMES)}")
    return name


RUNTIME_HELP = ("what runs the network: eager (PyTorch as loaded), torchscript (traced and frozen "
                "PyTorch), onnxruntime or openvino (the same network exported to ONNX at load time; "
                "CPU only; pip install 'vsearch[runtimes]'). --threads sets each one's intra-op threads")


def add_runtime_flag(flags, **kwargs) -> None:
    """``--runtime`` on a :class:`~vsearch.core.config.Flags` (env ``VSEARCH_<COMPONENT>_RUNTIME``)."""
    flags.add("--runtime", default=DEFAULT_RUNTIME, type=runtime, metavar="{" + ",".join(RUNTIMES) + "}",
              help=RUNTIME_HELP, **kwargs)


# --------------------------------------------------------------------------- the exported graph

def cache_dir() -> Path:
    """Where exported graphs are kept: ``$VSEARCH_RUNTIME_CACHE``, else
    ``$XDG_CACHE_HOME/vsearch/runtimes`` (the image: /tmp/cache, an emptyDir in the chart), else
    ``~/.cache/vsearch/runtimes``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vsearch" / "runtimes"


def network_digest(net) -> str:
    """sha256 of what the exported graph depends on: every tensor of the network (weights,
    buffers, the whitening), its pooling, and the exporter (torch version, opset)."""
    import torch
    h = hashlib.sha256(f"{EXPORT_VERSION}|{torch.__version__}|{OPSET}|{net.pooling}".encode())
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_digest(net) -> str:
    """sha256 of the network's tensors and pooling only (not of the exporter): what an int8
    graph made offline was made from."""
    import torch
    h = hashlib.sha256(f"{net.pooling}".encode())
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError:
        return False


def export_onnx(net, meta, folder: Path | None = None) -> Path:
    """The ONNX graph of ``net.embed`` (pixels [N, 3, S, S] -> L2-normalised embeddings [N, D],
    whitening included; N dynamic), from the cache when it is there. A cache folder that cannot
    be written falls back to a temporary one (the export then runs on every load)."""
    import torch

    from .zoo import EmbedModule

    folder = Path(folder) if folder else cache_dir()
    if not _writable(folder):
        fallback = Path(tempfile.gettempdir()) / "vsearch-runtimes"
        log.warning("runtime cache %s is not writable: exporting into %s", folder, fallback)
        folder = fallback
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{meta.model_id}-{network_digest(net)[:24]}.onnx"
    if path.is_file():
        log.info("exported graph of %s from the cache: %s", meta.model_id, path)
        return path
    size = meta.image_size
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    module = EmbedModule(net).eval()      # eval: the exporter traces the wrapper's own mode (batch norm!)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            example = torch.randn(2, 3, size, size, device=next(net.parameters()).device)
            # The TorchScript-based exporter (the tracer the torchscript runtime uses too): the
            # torch.export-based one needs onnxscript, and these networks trace cleanly.
            torch.onnx.export(module, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=["pixel_values"], output_names=["embedding"],
                              dynamic_axes={"pixel_values": {0: "batch"}, "embedding": {0: "batch"}})
        tmp.replace(path)
    except Exception as exc:  # noqa: BLE001  (any exporter failure: say which model and why)
        tmp.unlink(missing_ok=True)
        raise RuntimeUnavailable(f"{meta.name} could not be exported to ONNX: {type(exc).__name__}: "
                                 f"{str(exc)[:300]}") from exc
    log.info("exported %s to %s", meta.model_id, path)
    return path


# --------------------------------------------------------------------------- the runtimes

Forward = Callable[[np.ndarray], np.ndarray]      # float32 [N, 3, S, S] -> float32 [N, D]


def _missing(package: str, exc: ImportError) -> RuntimeUnavailable:
    return RuntimeUnavailable(f"the {package} runtime is not installed ({exc}): "
                              f"pip install 'vsearch[runtimes]'")


class OnnxRuntimeForward:
    """An ONNX graph on ONNX Runtime's CPU provider, ``threads`` intra-op threads (one
    inter-op thread, sequential execution, every graph optimisation)."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise _missing("onnxruntime", exc) from exc
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.threads = int(threads)
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: x})[0]


class OpenVinoForward:
    """An ONNX graph compiled by OpenVINO for the CPU: float32 inference precision (no bf16
    even where the CPU has it), ``threads`` inference threads, one stream (latency hint); one
    infer request per calling thread."""

    name = "openvino"

    def __init__(self, path: Path, threads: int):
        try:
            import openvino as ov
        except ImportError as exc:
            raise _missing("openvino", exc) from exc
        core = ov.Core()
        self.threads = int(threads)
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"})
        self._local = threading.local()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        req.infer({0: x})
        return req.get_output_tensor(0).data.copy()


def _side_by_side(forward: Forward, net, size: int, name: str):
    """(runtime's, eager network's) embeddings of the same random inputs at batch 1 and 3 (the
    graph was traced at 2); :class:`RuntimeMismatch` when the shapes differ."""
    import torch
    gen = torch.Generator().manual_seed(0)
    for n in (1, 3):
        x = torch.randn(n, 3, size, size, generator=gen)
        with torch.inference_mode():
            want = net.embed(x.to(next(net.parameters()).device)).float().cpu().numpy()
        got = forward(x.numpy())
        if got.shape != want.shape:
            raise RuntimeMismatch(f"{name} answers shape {got.shape} where the network gives {want.shape}")
        yield got, want


def check_against_eager(forward: Forward, net, size: int, name: str, tolerance: float = TOLERANCE) -> float:
    """The largest difference between ``forward`` and the eager network on random inputs at
    batch 1 and 3 (the graph was traced at 2); :class:`RuntimeMismatch` over ``tolerance``."""
    worst = 0.0
    for got, want in _side_by_side(forward, net, size, name):
        worst = max(worst, float(np.abs(got - want).max()))
    if not worst <= tolerance:
        raise RuntimeMismatch(f"{name} differs from the PyTorch network by {worst:.2e} "
                              f"(more than {tolerance:.0e}): not serving it")
    return worst


def check_cosine(forward: Forward, net, size: int, name: str, minimum: float = INT8_MIN_COSINE) -> float:
    """The smallest cosine between ``forward``'s embeddings and the eager network's on random
    inputs at batch 1 and 3; :class:`RuntimeMismatch` under ``minimum`` (a quantized graph is
    not equal to the network, only close)."""
    worst = 1.0
    for got, want in _side_by_side(forward, net, size, name):
        cos = (got * want).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-12)
        worst = min(worst, float(cos.min()))
    if not worst >= minimum:
        raise RuntimeMismatch(f"{name} agrees with the PyTorch network only to cosine {worst:.4f} "
                              f"(less than {minimum}): not serving it")
    return worst


def read_int8_record(model_dir: Path) -> dict | None:
    """``int8/quantization.json`` of a model directory, or None when it has none."""
    import json
    path = Path(model_dir) / INT8_DIR / INT8_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeUnavailable(f"{path}: unreadable ({exc}): run `vsearch quantize` again") from exc


def int8_forward(net, meta, model_dir: Path, threads: int) -> Forward:
    """The int8 graph ``vsearch quantize`` wrote into ``model_dir`` on ONNX Runtime, after three
    checks: it was made from these weights, its measured quality loss is within its budget, and
    it agrees with the eager network now."""
    model_dir = Path(model_dir)
    record = read_int8_record(model_dir)
    graph = model_dir / INT8_DIR / INT8_GRAPH
    if record is None or not graph.is_file():
        raise RuntimeUnavailable(f"{model_dir} has no int8 graph: make it with `vsearch quantize "
                                 f"--model-dir {model_dir} --calibration CATALOG_DIR --evaluate LABELLED_DIR`")
    if record.get("weights_sha256") != weights_digest(net):
        raise RuntimeUnavailable(f"{graph} was made from other weights than {meta.model_id}'s: "
                                 f"run `vsearch quantize` again")
    quality = record.get("quality") or {}
    loss, budget = quality.get("relative_loss"), quality.get("max_loss", INT8_MAX_LOSS)
    if loss is None or not loss <= budget:
        raise RuntimeUnavailable(f"{graph}: its measured quality loss ({loss}) is not within its budget "
                                 f"({budget}): not serving it")
    forward = OnnxRuntimeForward(graph, threads)
    forward.name = INT8
    cos = check_cosine(forward, net, meta.image_size, INT8)
    log.info("%s runs %s with %d intra-op threads (mAP@R %.4f -> %.4f, %.2f %% lost on %s; cosine to "
             "PyTorch >= %.4f)", INT8, meta.model_id, threads, quality.get("fp32", float("nan")),
             quality.get("int8", float("nan")), 100 * loss, quality.get("data", "?"), cos)
    return forward


def exported_forward(net, meta, name: str, threads: int, folder: Path | None = None,
                     model_dir: Path | None = None) -> Forward:
    """``net`` exported and loaded on runtime ``name`` (``onnxruntime`` or ``openvino``),
    checked against the eager network; ``onnxruntime-int8``: the int8 graph of ``model_dir``."""
    if name not in EXPORTED:
        raise UnknownRuntime(f"{name!r} is not an exported runtime: expected one of {', '.join(EXPORTED)}")
    package = "onnxruntime" if name == INT8 else name
    # import first: a missing package is named before the export's seconds are spent
    try:
        __import__(package)
    except ImportError as exc:
        raise _missing(package, exc) from exc
    if name == INT8:
        if model_dir is None:
            raise RuntimeUnavailable(f"{INT8} needs the model directory that holds the int8 graph")
        return int8_forward(net, meta, model_dir, threads)
    cls = OnnxRuntimeForward if name == "onnxruntime" else OpenVinoForward
    forward = cls(export_onnx(net, meta, folder), threads)
    worst = check_against_eager(forward, net, meta.image_size, name)
    log.info("%s runs %s with %d intra-op threads (largest difference to PyTorch %.1e)",
             name, meta.model_id, threads, worst)
    return forward
