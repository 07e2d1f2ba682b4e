"""The runtime embedder: images -> float32, L2-normalised embeddings, in process. Used by
``vsearch serve embedder``, ``vsearch embed``, the consumer and the search service (when they
embed in process) and the evaluation; what it runs is the trained network of :mod:`.zoo`.

    >>> emb = Embedder(default_model_dir())
    >>> vectors = emb.embed_bytes([open("cat.jpg", "rb").read()])   # float32 [1, D], L2-normalised
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .embedding import embed_isolated
from .model_dir import ModelMeta
from .preprocess import Box, InvalidImage, Limits, bytes_to_array, stack
from .runtimes import DEFAULT_RUNTIME, EXPORTED, exported_forward
from .runtimes import runtime as runtime_name
from .zoo import EmbeddingNet, EmbedModule, load_model_dir


def optimise_for_inference(net: EmbeddingNet, meta: ModelMeta):
    """A faster forward for serving, same results: convolutional nets run in channels-last
    memory format, traced, frozen (batch norm folded into the convolutions) and optimised by
    TorchScript. Checked against the eager network at other batch sizes than the trace's;
    any failure or mismatch falls back to the eager network. Transformers stay eager."""
    if meta.family != "resnet":
        return net.embed
    log = logging.getLogger(__name__)
    device = next(net.parameters()).device
    net.to(memory_format=torch.channels_last)
    size = meta.image_size
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            example = torch.randn(4, 3, size, size, device=device).contiguous(
                memory_format=torch.channels_last)
            traced = torch.jit.trace(EmbedModule(net).eval(), example, check_trace=False)
            fast = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            for n in (1, 3):
                x = torch.randn(n, 3, size, size, device=device)
                if not torch.allclose(fast(x.contiguous(memory_format=torch.channels_last)),
                                      net.embed(x), atol=1e-4):
                    raise ValueError(f"optimised network differs from eager at batch {n}")
    except Exception as exc:  # noqa: BLE001  (any tracing problem: serve the eager network)
        log.warning("serving the eager network (%s could not be optimised: %s)", meta.name, exc)
        return net.embed

    def forward(x: torch.Tensor) -> torch.Tensor:
        return fast(x.contiguous(memory_format=torch.channels_last))

    return forward


def set_torch_threads(n: int | None) -> None:
    """torch's CPU threads, a process-wide setting: for the entry point that owns the process
    (None: torch's own choice)."""
    if n:
        torch.set_num_threads(int(n))


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Embedder:
    """Images -> float32, L2-normalised embeddings, one row per image: the in-process
    :class:`~vsearch.predictor.embedding.ImageEmbedder`.

    Decoding and resizing run on a small thread pool (PIL releases the GIL), the forward pass
    in batches of at most ``batch_size`` on ``runtime`` (:mod:`.runtimes`): ``eager``,
    ``torchscript`` (the default; ``optimize=False`` means ``eager``), ``onnxruntime`` or
    ``openvino``, the last two on the CPU with ``threads`` intra-op threads (default: torch's)."""

    endpoint = None                          # the model runs in this process

    def __init__(self, model_dir: str | os.PathLike, *, device: str | None = None,
                 batch_size: int = 32, limits: Limits = Limits(), decode_workers: int | None = None,
                 optimize: bool = True, runtime: str | None = None, threads: int | None = None):
        self.model_dir = Path(model_dir)
        self.runtime = runtime_name(runtime) if runtime else (DEFAULT_RUNTIME if optimize else "eager")
        if self.runtime in EXPORTED:
            if device and torch.device(device).type != "cpu":
                raise ValueError(f"the {self.runtime} runtime runs on the CPU, not on {device}: "
                                 f"give --device cpu, or --runtime torchscript for {device}")
            device = "cpu"
        self.device = pick_device(device)
        self.threads = int(threads or torch.get_num_threads())
        self.net, self.meta = load_model_dir(self.model_dir)
        self.net.eval().to(self.device)
        self._exported = None
        if self.runtime in EXPORTED:
            self.net.requires_grad_(False)
            self._exported = exported_forward(self.net, self.meta, self.runtime, self.threads,
                                              model_dir=self.model_dir)
            self._forward = None
        elif self.runtime == "torchscript":
            self._forward = optimise_for_inference(self.net, self.meta)
        else:
            self._forward = self.net.embed
        self.cfg = self.meta.preprocess
        self.dim = self.meta.embedding_dim
        self.batch_size = max(1, int(batch_size))
        self.limits = limits
        workers = decode_workers or min(4, (os.cpu_count() or 2))
        self._pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self._prefetch = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")

    # -- forward
    def embed_arrays(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Preprocessed float32 [N, 3, H, W] -> [N, D] normalised float32."""
        n = len(x)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        out = []
        if self._exported is not None:
            if isinstance(x, torch.Tensor):
                x = x.detach().cpu().numpy()
            for i in range(0, n, self.batch_size):
                out.append(self._exported(np.ascontiguousarray(x[i:i + self.batch_size], dtype=np.float32)))
            return np.concatenate(out).astype(np.float32, copy=False)
        with torch.inference_mode():
            for i in range(0, n, self.batch_size):
                chunk = torch.as_tensor(x[i:i + self.batch_size]).to(self.device, non_blocking=True)
                out.append(self._forward(chunk).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)

    # -- preprocessing on the pool
    def preprocess_bytes(self, blobs: Sequence[bytes], crops: Sequence[Box | None] | None = None
                         ) -> np.ndarray:
        """Decode and preprocess in parallel. An :class:`InvalidImage` names the bad item."""
        crops = list(crops) if crops is not None else [None] * len(blobs)
        if len(crops) != len(blobs):
            raise InvalidImage(f"got {len(blobs)} images but {len(crops)} crop boxes")

        def one(i):
            try:
                return bytes_to_array(blobs[i], self.cfg, crops[i], self.limits)
            except InvalidImage as exc:
                raise InvalidImage(f"image {i}: {exc}" if len(blobs) > 1 else str(exc)) from exc
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001  (a decoder surprise is the image's fault: a 400)
                raise InvalidImage(f"image {i}: could not be preprocessed ({type(exc).__name__})") from exc

        return stack(list(self._pool.map(one, range(len(blobs)))))

    def try_preprocess(self, blobs: Sequence[bytes], crops: Sequence[Box | None] | None = None
                       ) -> list[np.ndarray | InvalidImage]:
        """Like :meth:`preprocess_bytes` but one bad image does not fail the others: each item
        is its array or the :class:`InvalidImage` that says what is wrong with it."""
        crops = list(crops) if crops is not None else [None] * len(blobs)

        def one(i):
            try:
                return bytes_to_array(blobs[i], self.cfg, crops[i], self.limits)
            except InvalidImage as exc:
                return exc
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001  (one image's surprise must not fail the others)
                return InvalidImage(f"image could not be preprocessed: {type(exc).__name__}: {str(exc)[:200]}")

        return list(self._pool.map(one, range(len(blobs))))

    def embed_bytes(self, blobs: Sequence[bytes], crops: Sequence[Box | None] | None = None
                    ) -> np.ndarray:
        return self.embed_arrays(self.preprocess_bytes(blobs, crops))

    def embed_each(self, blobs: Sequence[bytes]) -> list[np.ndarray | InvalidImage]:
        """Each image's vector, or the :class:`InvalidImage` saying why it has none."""
        arrays = self.try_preprocess(blobs)
        ok = [i for i, a in enumerate(arrays) if not isinstance(a, InvalidImage)]
        out: list = list(arrays)
        if ok:
            vectors = embed_isolated(lambda idx: self.embed_arrays(np.stack([arrays[i] for i in idx])), ok)
            for i, v in zip(ok, vectors):
                out[i] = v
        return out

    @property
    def model_name(self) -> str:
        return self.meta.name

    @property
    def version(self) -> str:
        return self.meta.version

    @property
    def model_id(self) -> str:
        return self.meta.model_id

    def embed_stream(self, items: Iterable[bytes]) -> Iterator[np.ndarray]:
        """Embed an iterable of image bytes in batches, preprocessing the next batch while the
        current one runs through the network. Yields one [b, D] array per batch."""
        def batches():
            batch = []
            for item in items:
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

        pending = None
        for batch in batches():
            nxt = self._prefetch.submit(self.preprocess_bytes, batch)
            if pending is not None:
                yield self.embed_arrays(pending.result())
            pending = nxt
        if pending is not None:
            yield self.embed_arrays(pending.result())

    def close(self):
        self._pool.shutdown(wait=False)
        self._prefetch.shutdown(wait=False)

