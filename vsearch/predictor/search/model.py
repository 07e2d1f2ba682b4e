"""The search service as the KServe model ``visual-search`` (V1 predict and V2 infer)::

    POST /v1/models/visual-search:predict  {"instances": [{"image": {"b64": ...}, "crop": [x0,y0,x1,y1],
                                             "k": 20, "filter": {"label": "cat"}}]}
    POST /v2/models/visual-search/infer    inputs image BYTES [N], crop FP32 [N,4], k INT32 [1]
                                           -> outputs results BYTES [N] (JSON), query_id BYTES [N]

Client mistakes raise KServe's ``InvalidInput`` (400), an unreachable Milvus or embedder
``ModelNotReady`` (503). During an online experiment the header ``X-User-Id`` (or the cookie
``vsearch_uid``) names the randomisation unit, as on ``POST /search``."""

from __future__ import annotations

import asyncio
import json
from http.cookies import CookieError, SimpleCookie
from typing import Callable

import kserve
from kserve.errors import ModelNotReady
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from .errors import Unavailable
from .request import USER_COOKIE, unit_of, v1_queries, v2_queries
from .service import SearchService

MODEL_NAME = "visual-search"


def _cookies(headers: dict) -> dict[str, str]:
    """The request's cookies (KServe hands the model the headers only)."""
    raw = next((v for k, v in headers.items() if k.lower() == "cookie"), "")
    jar = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return {}
    return {USER_COOKIE: jar[USER_COOKIE].value} if USER_COOKIE in jar else {}


class SearchModel(kserve.Model):
    def __init__(self, build_service: Callable[[], SearchService], name: str = MODEL_NAME):
        super().__init__(name)
        self._build_service = build_service
        self.service: SearchService | None = None

    def load(self) -> bool:
        self.service = self._build_service()
        self.ready = True
        return self.ready

    def get_input_types(self):
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                {"name": "crop", "datatype": "FP32", "shape": [-1, 4]},
                {"name": "k", "datatype": "INT32", "shape": [1]}]

    def get_output_types(self):
        return [{"name": "results", "datatype": "BYTES", "shape": [-1]},
                {"name": "query_id", "datatype": "BYTES", "shape": [-1]}]

    async def predict(self, payload, headers=None):
        svc = self.service
        if svc is None:
            raise ModelNotReady(self.name, "the search service is still loading")
        try:
            unit = unit_of(headers or {}, _cookies(headers or {}))
            if isinstance(payload, InferRequest):
                queries = v2_queries(payload, svc.settings)
            else:
                queries = await asyncio.to_thread(v1_queries, payload, svc.settings, svc.fetch_url)
            for q in queries:
                q.unit = unit
            answers = [await asyncio.to_thread(svc.search, q) for q in queries]
        except Unavailable as exc:
            raise ModelNotReady(self.name, exc.reason) from exc
        if not isinstance(payload, InferRequest):
            return {"predictions": answers}
        results = InferOutput(name="results", shape=[len(answers)], datatype="BYTES",
                              data=[json.dumps(a["results"]) for a in answers])
        ids = InferOutput(name="query_id", shape=[len(answers)], datatype="BYTES",
                          data=[a["query_id"] for a in answers])
        return InferResponse(response_id=payload.id or "", model_name=self.name,
                             infer_outputs=[results, ids],
                             parameters={"model_version": answers[0]["model_version"],
                                         "collection": answers[0]["collection"]})
