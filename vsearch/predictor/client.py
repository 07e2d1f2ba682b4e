"""Client of the embedder's V2 endpoint: the remote
:class:`~vsearch.predictor.embedding.ImageEmbedder`, so the consumer and the search service
embed in process or over HTTP with the same code."""

from __future__ import annotations

import base64
import threading
from concurrent import futures
from typing import Sequence

import numpy as np
import requests

from .embedding import embed_isolated
from .preprocess import Box, InvalidImage


class EmbedderUnavailable(ConnectionError):
    """The embedder cannot be reached or failed on its side (5xx): retry later."""


class EmbedderClient:
    """``embed_bytes`` sends at most ``batch_size`` images per request (the embedder refuses more
    than its ``--max-batch``, 64 by default), so callers may pass batches of any size. A call
    of several requests keeps up to ``in_flight`` of them open at once: the embedder decodes
    one request's images while its model runs on the previous one's (its micro-batcher
    serialises the forward passes), so it does not sit idle while this side encodes the next
    request or reads an answer. ``in_flight=1`` sends them one after the other."""

    def __init__(self, url: str, model_name: str = "embedder", timeout: float = 30.0,
                 api_key: str | None = None, batch_size: int = 32, pool_size: int = 64,
                 in_flight: int = 2):
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.timeout = timeout
        self.batch_size = max(1, int(batch_size))
        self.in_flight = max(1, int(in_flight))
        self._senders: futures.ThreadPoolExecutor | None = None
        self._senders_lock = threading.Lock()
        self._session = requests.Session()
        self._session.trust_env = False           # the embedder is where it was configured, no proxy
        # Kept-alive connections for up to ``pool_size`` concurrent callers (the search service's
        # threads share this client): requests' default keeps 10 and opens a new connection
        # for every call past them.
        adapter = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=max(1, int(pool_size)))
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        if api_key:
            self._session.headers["X-API-Key"] = api_key
        self._dim: int | None = None
        self._version: str | None = None

    @property
    def endpoint(self) -> str:
        return self.url

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.model_name}/infer"

    def _call(self, method: str, url: str, **kwargs) -> requests.Response:
        try:
            resp = self._session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise EmbedderUnavailable(f"embedder at {self.url} unreachable: {exc}") from exc
        if resp.status_code in (400, 413):          # the images' fault: sending them again cannot help
            try:
                reason = resp.json().get("error", "") if resp.content else ""
            except ValueError:
                reason = resp.text[:300]
            raise InvalidImage(reason or f"the embedder answered {resp.status_code}")
        if resp.status_code >= 300:
            raise EmbedderUnavailable(f"embedder at {url} answered {resp.status_code}: {resp.text[:300]}")
        return resp

    @property
    def dim(self) -> int:
        if self._dim is None:
            meta = self._call("GET", f"{self.url}/v2/models/{self.model_name}").json()
            shape = meta["outputs"][0]["shape"]
            self._dim = int(shape[-1])
        return self._dim

    def model_info(self) -> dict | None:
        """The served model's identity and offline evaluation (``GET /vsearch/v1/model``), or
        None from an embedder that has no such route (404)."""
        url = f"{self.url}/vsearch/v1/model"
        try:
            resp = self._session.get(url, timeout=self.timeout)
        except requests.RequestException as exc:
            raise EmbedderUnavailable(f"embedder at {self.url} unreachable: {exc}") from exc
        if resp.status_code == 404:
            return None
        if resp.status_code >= 300:
            raise EmbedderUnavailable(f"embedder at {url} answered {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    @property
    def version(self) -> str | None:
        return self._version

    @property
    def model_id(self) -> str:
        """``<served name>__<version>`` once the endpoint answered with a version, else the name."""
        return f"{self.model_name}__{self._version}" if self._version else self.model_name

    def embed_each(self, blobs: Sequence[bytes]) -> list[np.ndarray | InvalidImage]:
        """Each image's vector, or the :class:`InvalidImage` saying why it has none (the
        requests the embedder refuses are split until each refusal is one image's)."""
        return embed_isolated(lambda idx: self.embed_bytes([blobs[i] for i in idx]), list(range(len(blobs))))

    def embed_bytes(self, blobs: Sequence[bytes], crops: Sequence[Box | None] | None = None
                    ) -> np.ndarray:
        if len(blobs) == 0:
            return np.zeros((0, self.dim), np.float32)
        crops = list(crops) if crops is not None else [None] * len(blobs)
        n = self.batch_size
        starts = range(0, len(blobs), n)
        if len(starts) == 1 or self.in_flight == 1:
            return np.concatenate([self._request(blobs[i:i + n], crops[i:i + n]) for i in starts])
        # Results in request order; the first failure is raised once every request sent is
        # answered (none is left running behind the caller's back).
        sent = [self._sender().submit(self._request, blobs[i:i + n], crops[i:i + n]) for i in starts]
        futures.wait(sent)
        return np.concatenate([f.result() for f in sent])

    def _sender(self) -> futures.ThreadPoolExecutor:
        with self._senders_lock:
            if self._senders is None:
                self._senders = futures.ThreadPoolExecutor(self.in_flight, thread_name_prefix="embed-request")
            return self._senders

    def close(self) -> None:
        """Stops the request threads and closes the kept-alive connections."""
        with self._senders_lock:
            if self._senders is not None:
                self._senders.shutdown(wait=True)
                self._senders = None
        self._session.close()

    def _request(self, blobs: Sequence[bytes], crops: Sequence[Box | None]) -> np.ndarray:
        inputs = [{"name": "image", "datatype": "BYTES", "shape": [len(blobs)],
                   "data": [base64.b64encode(b).decode("ascii") for b in blobs]}]
        if any(c is not None for c in crops):
            boxes = [list(c) if c is not None else [0.0, 0.0, 1.0, 1.0] for c in crops]
            inputs.append({"name": "crop", "datatype": "FP32", "shape": [len(blobs), 4],
                           "data": [v for box in boxes for v in box]})
        body = self._call("POST", self.infer_url, json={"inputs": inputs}).json()
        out = next(o for o in body["outputs"] if o["name"] == "embedding")
        params = body.get("parameters") or {}
        self._version = params.get("model_version", self._version)
        vectors = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        self._dim = vectors.shape[1]
        return vectors
