"""The embedder as a KServe custom model: image (+ optional crop) -> L2-normalised embedding.

V2 / Open Inference Protocol::

    POST /v2/models/<name>/infer
    {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [N], "data": ["<base64>", ...]},
                {"name": "crop", "datatype": "FP32", "shape": [N, 4], "data": [x0, y0, x1, y1, ...]}]}
    -> {"outputs": [{"name": "embedding", "datatype": "FP32", "shape": [N, D], "data": [...]}]}

V1::

    POST /v1/models/<name>:predict
    {"instances": [{"image": {"b64": "<base64>"}, "crop": [x0, y0, x1, y1]}]}
    -> {"predictions": [[...D floats...]]}

Every client mistake is a 400 with a reason (KServe's ``InvalidInput``); a request before the
model is loaded is a 503 (``ModelNotReady``), and so is one that finds ``max_queue`` images
already waiting (``Busy``, with ``Retry-After``); the server keeps serving. Raw image bytes
through the binary tensor extension (tritonclient's and KServe's clients' default) work like
base64 in JSON (``serving.RequestGuard``). Readiness
``/v2/models/<name>/ready``, liveness ``/v2/health/live``, metrics ``/metrics``; the served model's
identity and offline evaluation ``GET /vsearch/v1/model``.
"""

from __future__ import annotations

import asyncio
import logging

import kserve
from kserve.errors import InvalidInput, ModelNotReady
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from prometheus_client import Counter, Histogram

from .batching import MicroBatcher
from .inference import Embedder
from .preprocess import InvalidImage, Limits
from .protocol import check_v2_inputs, decode_b64, parse_box, v1_instances, v2_crops, v2_images
from .serving import Busy

log = logging.getLogger(__name__)

IMAGES = Counter("vsearch_embedder_images_total", "Images embedded", ["model"])
REJECTED = Counter("vsearch_embedder_rejected_total", "Requests rejected with a 400", ["model"])
FORWARD_PASSES = Counter("vsearch_embedder_forward_passes_total",
                         "Forward passes (concurrent requests share one)", ["model"])
BATCH_ROWS = Histogram("vsearch_embedder_batch_rows", "Images per forward pass", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
BUSY = Counter("vsearch_embedder_busy_total", "Requests answered 503 because the queue was full", ["model"])
EMBED_SECONDS = Histogram("vsearch_embedder_embed_seconds", "Decode + forward time per request",
                          ["model"])

V1_EXAMPLE = '{"instances": [{"image": {"b64": ...}, "crop": [x0, y0, x1, y1]}]}'


class EmbedderModel(kserve.Model):
    """KServe model wrapping :class:`vsearch.predictor.inference.Embedder`."""

    def __init__(self, name: str, model_dir: str, *, max_batch: int = 64, device: str | None = None,
                 batch_size: int = 32, limits: Limits = Limits(), max_queue: int = 256,
                 runtime: str | None = None):
        super().__init__(name)
        self.model_dir = model_dir
        self.max_batch = max_batch
        self.max_queue = max(int(max_queue), max_batch)   # images being decoded or waiting for the model
        self._in_flight = 0
        self.device, self.batch_size, self.limits, self.runtime = device, batch_size, limits, runtime
        self.embedder: Embedder | None = None
        self.batcher: MicroBatcher | None = None

    def load(self) -> bool:
        self.embedder = Embedder(self.model_dir, device=self.device, batch_size=self.batch_size,
                                 limits=self.limits, runtime=self.runtime)
        # Concurrent requests share forward passes of up to max(batch_size, max_batch) rows.
        self.batcher = MicroBatcher(self.embedder.embed_arrays,
                                    max_rows=max(self.batch_size, self.max_batch),
                                    on_pass=self._count_pass)      # predict() bounds the queue
        meta = self.embedder.meta
        log.info("loaded %s version %s (%s, dim %d, input %d) from %s on %s, runtime %s (%d threads)",
                 meta.name, meta.version, meta.family, meta.embedding_dim, meta.image_size, self.model_dir,
                 self.embedder.device, self.embedder.runtime, self.embedder.threads)
        self.ready = True
        return self.ready

    def info(self) -> dict:
        """What ``GET /vsearch/v1/model`` answers: the served model's identity, the runtime that
        runs it (:mod:`.runtimes`) and its offline evaluation from ``vsearch_model.json``
        (``evaluation``: figures, baselines and the verdict; null when it was never evaluated). The rollout gate reads the verdict."""
        if self.embedder is None:
            raise ModelNotReady(self.name)
        m = self.embedder.meta
        return {"name": m.name, "version": m.version, "family": m.family, "embedding_dim": self.embedder.dim,
                "image_size": m.image_size, "runtime": self.embedder.runtime, "evaluation": m.evaluation}

    def add_routes(self, app) -> None:
        """The model's own route beside KServe's V1/V2 ones (behind the same API key)."""
        @app.get("/vsearch/v1/model", tags=["vsearch"],
                 summary="the served model: name, version, dimension and its offline evaluation")
        async def model_info():
            return self.info()

    def _count_pass(self, rows: int) -> None:
        FORWARD_PASSES.labels(self.name).inc()
        BATCH_ROWS.labels(self.name).observe(rows)

    def get_input_types(self) -> list[dict]:
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                {"name": "crop", "datatype": "FP32", "shape": [-1, 4]}]

    def get_output_types(self) -> list[dict]:
        dim = self.embedder.dim if self.embedder else -1
        return [{"name": "embedding", "datatype": "FP32", "shape": [-1, dim]}]

    def _parse(self, payload) -> tuple[list[bytes], list]:
        if isinstance(payload, InferRequest):
            check_v2_inputs(payload, ("image", "crop"))
            blobs = v2_images(payload, self.max_batch)
            return blobs, v2_crops(payload, len(blobs))
        instances = v1_instances(payload, self.max_batch, ("image", "crop"), V1_EXAMPLE, "images")
        for i, inst in enumerate(instances):
            if "image" not in inst:
                raise InvalidInput(f"instance {i}: expected an object with 'image' ({{\"b64\": ...}})")
        return ([decode_b64(inst["image"], f"image {i}") for i, inst in enumerate(instances)],
                [parse_box(inst.get("crop"), f"crop {i}") for i, inst in enumerate(instances)])

    async def predict(self, payload, headers=None):
        if self.embedder is None or self.batcher is None:
            raise ModelNotReady(self.name, "the model is still loading")
        try:
            blobs, crops = self._parse(payload)
            if self._in_flight and self._in_flight + len(blobs) > self.max_queue:
                BUSY.labels(self.name).inc()
                raise Busy(f"{self._in_flight} images are in the embedder's queue (the limit is "
                           f"{self.max_queue}); retry later")
            self._in_flight += len(blobs)
            try:
                loop = asyncio.get_running_loop()
                with EMBED_SECONDS.labels(self.name).time():
                    arrays = await loop.run_in_executor(None, self.embedder.preprocess_bytes, blobs, crops)
                    vectors = await self.batcher(arrays)
            finally:
                self._in_flight -= len(blobs)
        except InvalidImage as exc:
            REJECTED.labels(self.name).inc()
            raise InvalidInput(str(exc)) from exc
        except InvalidInput:
            REJECTED.labels(self.name).inc()
            raise
        IMAGES.labels(self.name).inc(len(blobs))
        if not isinstance(payload, InferRequest):
            return {"predictions": vectors.tolist()}
        out = InferOutput(name="embedding", shape=list(vectors.shape), datatype="FP32")
        out.set_data_from_numpy(vectors, binary_data=False)
        return InferResponse(response_id=payload.id or "", model_name=self.name,
                             infer_outputs=[out], parameters={
                                 "model_version": self.embedder.meta.version,
                                 "embedding_dim": self.embedder.dim})
