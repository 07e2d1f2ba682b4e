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

Every client mistake is a 400 with a reason (``InvalidInput``); the server keeps serving.
Readiness ``/v2/models/<name>/ready``, liveness ``/v2/health/live``, metrics ``/metrics``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Any

import numpy as np
from prometheus_client import Counter, Histogram

from predictor.batching import MicroBatcher
from predictor.kserve_app import import_kserve, install_request_error_handler
from predictor.model import Embedder
from predictor.preprocess import InvalidImage, Limits, parse_crop

log = logging.getLogger(__name__)

IMAGES = Counter("vsearch_embedder_images_total", "Images embedded", ["model"])
REJECTED = Counter("vsearch_embedder_rejected_total", "Requests rejected with a 400", ["model"])
FORWARD_PASSES = Counter("vsearch_embedder_forward_passes_total",
                         "Forward passes (concurrent requests share one)", ["model"])
BATCH_ROWS = Histogram("vsearch_embedder_batch_rows", "Images per forward pass", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
EMBED_SECONDS = Histogram("vsearch_embedder_embed_seconds", "Decode + forward time per request",
                          ["model"])


kserve = import_kserve()
from kserve.errors import InvalidInput  # noqa: E402
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse  # noqa: E402


def _decode_b64(item: Any, index: int) -> bytes:
    if isinstance(item, (bytes, bytearray)):          # binary tensor extension: raw file bytes
        return bytes(item)
    if isinstance(item, dict) and "b64" in item:      # V1 {"b64": ...}
        item = item["b64"]
    if not isinstance(item, str):
        raise InvalidInput(f"image {index}: expected a base64 string, got {type(item).__name__}")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"image {index}: not valid base64 ({exc})") from exc


class EmbedderModel(kserve.Model):
    """KServe model wrapping :class:`predictor.model.Embedder`."""

    def __init__(self, name: str, model_dir: str, *, max_batch: int = 64, threads: int | None = None,
                 device: str | None = None, batch_size: int = 32, limits: Limits = Limits()):
        super().__init__(name)
        self.model_dir = model_dir
        self.max_batch = max_batch
        self.threads, self.device, self.batch_size, self.limits = threads, device, batch_size, limits
        self.embedder: Embedder | None = None
        self.batcher: MicroBatcher | None = None

    def load(self) -> bool:
        self.embedder = Embedder(self.model_dir, device=self.device, threads=self.threads,
                                 batch_size=self.batch_size, limits=self.limits)
        # Concurrent requests share forward passes of up to max(batch_size, max_batch) rows.
        self.batcher = MicroBatcher(self.embedder.embed_arrays,
                                    max_rows=max(self.batch_size, self.max_batch),
                                    on_pass=self._count_pass)
        meta = self.embedder.meta
        log.info("loaded %s version %s (%s, dim %d, input %d) from %s on %s", meta.name,
                 meta.version, meta.family, meta.embedding_dim, meta.image_size, self.model_dir,
                 self.embedder.device)
        self.ready = True
        return self.ready

    def _count_pass(self, calls: int, rows: int) -> None:
        FORWARD_PASSES.labels(self.name).inc()
        BATCH_ROWS.labels(self.name).observe(rows)

    def get_input_types(self) -> list[dict]:
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                {"name": "crop", "datatype": "FP32", "shape": [-1, 4]}]

    def get_output_types(self) -> list[dict]:
        dim = self.embedder.dim if self.embedder else -1
        return [{"name": "embedding", "datatype": "FP32", "shape": [-1, dim]}]

    # -- request parsing
    def _check_count(self, n: int) -> None:
        if n == 0:
            raise InvalidInput("no images in the request")
        if n > self.max_batch:
            raise InvalidInput(f"{n} images in one request, over the limit of {self.max_batch}; "
                               f"split the request")

    def _parse_v2(self, req: InferRequest) -> tuple[list[bytes], list]:
        names = [i.name for i in req.inputs]
        unknown = set(names) - {"image", "crop"}
        if unknown:
            raise InvalidInput(f"unknown input(s) {sorted(unknown)}: expected 'image' and optional 'crop'")
        image = req.get_input_by_name("image")
        if image is None:
            raise InvalidInput("missing input 'image' (BYTES, base64 of the image file)")
        if image.datatype != "BYTES":
            raise InvalidInput(f"input 'image' must have datatype BYTES, got {image.datatype}")
        data = image.data
        if isinstance(data, np.ndarray):
            data = data.reshape(-1).tolist()
        if not isinstance(data, list):
            raise InvalidInput("input 'image' data must be a list of base64 strings")
        if len(image.shape) != 1 or image.shape[0] != len(data):
            raise InvalidInput(f"input 'image' shape must be [N] with N = number of images "
                               f"({len(data)}), got {list(image.shape)}")
        self._check_count(len(data))
        blobs = [_decode_b64(item, i) for i, item in enumerate(data)]
        crops: list = [None] * len(blobs)
        crop = req.get_input_by_name("crop")
        if crop is not None:
            if crop.datatype not in ("FP32", "FP64"):
                raise InvalidInput(f"input 'crop' must have datatype FP32, got {crop.datatype}")
            if list(crop.shape) != [len(blobs), 4]:
                raise InvalidInput(f"input 'crop' shape must be [{len(blobs)}, 4] (one normalised "
                                   f"x0,y0,x1,y1 box per image), got {list(crop.shape)}")
            try:
                boxes = np.asarray(crop.data, dtype=np.float64).reshape(len(blobs), 4)
            except (ValueError, TypeError) as exc:
                raise InvalidInput(f"input 'crop' data does not match its shape [{len(blobs)}, 4]") from exc
            crops = [self._crop(b, i) for i, b in enumerate(boxes)]
        return blobs, crops

    def _parse_v1(self, payload: dict) -> tuple[list[bytes], list]:
        if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
            raise InvalidInput('V1 body must be {"instances": [{"image": {"b64": ...}, "crop": [...]}]}')
        instances = payload["instances"]
        self._check_count(len(instances))
        blobs, crops = [], []
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict) or "image" not in inst:
                raise InvalidInput(f"instance {i}: expected an object with 'image' ({{\"b64\": ...}})")
            unknown = set(inst) - {"image", "crop"}
            if unknown:
                raise InvalidInput(f"instance {i}: unknown field(s) {sorted(unknown)}")
            blobs.append(_decode_b64(inst["image"], i))
            crops.append(self._crop(inst.get("crop"), i))
        return blobs, crops

    @staticmethod
    def _crop(box, index: int):
        try:
            return parse_crop(box)
        except InvalidImage as exc:
            raise InvalidInput(f"crop {index}: {exc}") from exc

    # -- inference
    async def predict(self, payload, headers=None):
        if self.embedder is None:
            raise InvalidInput("model not loaded")
        is_v2 = isinstance(payload, InferRequest)
        try:
            blobs, crops = self._parse_v2(payload) if is_v2 else self._parse_v1(payload)
            loop = asyncio.get_running_loop()
            with EMBED_SECONDS.labels(self.name).time():
                arrays = await loop.run_in_executor(None, self.embedder.preprocess_bytes, blobs, crops)
                vectors = await self.batcher(arrays)
        except (InvalidInput, InvalidImage) as exc:
            REJECTED.labels(self.name).inc()
            raise InvalidInput(str(exc)) from exc
        IMAGES.labels(self.name).inc(len(blobs))
        if not is_v2:
            return {"predictions": vectors.tolist()}
        out = InferOutput(name="embedding", shape=list(vectors.shape), datatype="FP32")
        out.set_data_from_numpy(vectors, binary_data=False)
        return InferResponse(response_id=payload.id or "", model_name=self.name,
                             infer_outputs=[out], parameters={
                                 "model_version": self.embedder.meta.version,
                                 "embedding_dim": self.embedder.dim})


def serve(model_dir: str, *, name: str = "embedder", http_port: int = 8080, max_batch: int = 64,
          threads: int | None = None, device: str | None = None, batch_size: int = 32,
          limits: Limits = Limits(), workers: int = 1) -> None:
    model = EmbedderModel(name, model_dir, max_batch=max_batch, threads=threads, device=device,
                          batch_size=batch_size, limits=limits)
    model.load()
    install_request_error_handler(on_error=REJECTED.labels("request").inc)
    kserve.ModelServer(http_port=http_port, enable_grpc=False, enable_docs_url=True,
                       workers=workers).start([model])
