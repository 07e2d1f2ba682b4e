"""Running a KServe ``ModelServer`` (the same server an InferenceService runs) for one of our
models. KServe keeps process-wide state: it parses ``sys.argv`` when it is first imported and
serves one module-level FastAPI app. Only the entry point that owns the process touches either,
through the functions here; library code never does.

What every server of ours gets on that app (:func:`run_model_server`):

- :class:`RequestGuard`, an ASGI middleware in front of everything: the request body is
  limited on the bytes actually read (a Content-Length over the limit, a chunked body or a
  multipart upload that grows past it: 413 with the reason); inference requests that use
  the binary tensor extension (``Inference-Header-Content-Length``) are turned into plain
  JSON before KServe sees them (raw BYTES elements as ``{"b64": ...}``, numbers as numbers),
  because KServe's own decoder reads BYTES as UTF-8 text and answers a 500 echoing the image;
  an inference body sent with a form content type (``curl -d``) is read as the JSON it is;
  the body of a 500 never carries the request (only "internal error").
- an API key (``api_key``) required on every route but the exact health/readiness routes;
- :class:`Busy` (a full queue) answered 503 with ``Retry-After``; malformed bodies 400.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import sys
from typing import Callable

# at module level: FastAPI resolves the dependency's (string) annotations in this module
from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
# Routes that answer without the API key: health, readiness, the page (exact route templates).
OPEN_ROUTES = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}/ready",
                         "/v2/models/{model_name}/versions/{model_version}/ready", "/v1/models/{model_name}"})
_INFER_PATH = re.compile(r"^/(v1/models/[^/]+:predict|v2/models/[^/]+(/versions/[^/]+)?/infer)$")
_FORM_TYPES = ("", "application/x-www-form-urlencoded", "text/plain")
BINARY_HEADER = "inference-header-content-length"


class Busy(Exception):
    """The server's queue is full: answered 503 with ``Retry-After``; retry later."""


class Unauthorized(Exception):
    """No API key, or the wrong one: answered 401 with the reason."""


def hide_argv_from_kserve() -> None:
    """KServe parses ``sys.argv`` for flags of its own when first imported; ours are not for it
    (everything it needs is passed to ``ModelServer``). Call before anything imports kserve."""
    if "kserve" not in sys.modules:
        sys.argv = sys.argv[:1]


def _json_response(status: int, body: dict, extra_headers: tuple = ()) -> tuple[dict, dict]:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
               *extra_headers]
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": data})


class RequestGuard:
    """ASGI middleware: body limit on the bytes read, binary tensor extension -> JSON, form
    content type of inference bodies -> JSON, no request echo in 500s (see the module)."""

    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 on_reject: Callable[[int], None] | None = None):
        self.app, self.max_body_bytes, self.on_reject = app, int(max_body_bytes), on_reject

    async def _answer(self, send, status: int, reason: str) -> None:
        if self.on_reject:
            self.on_reject(status)
        start, body = _json_response(status, {"error": reason})
        await send(start)
        await send(body)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        limit = self.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await self._answer(send, 413, f"request body is {declared} bytes; the limit is {limit} bytes")
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return await self._answer(send, 413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if _INFER_PATH.match(scope.get("path", "")):
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if BINARY_HEADER in headers:
                from kserve.errors import InvalidInput

                from .protocol import binary_request_to_json
                try:
                    body = json.dumps(binary_request_to_json(body, headers[BINARY_HEADER])).encode()
                except InvalidInput as exc:
                    return await self._answer(send, 400, str(exc.reason if hasattr(exc, "reason") else exc))
                scope = _with_headers(scope, {"content-type": "application/json"}, drop=(BINARY_HEADER,))
            elif ctype in _FORM_TYPES and body.lstrip()[:1] in (b"{", b"["):
                scope = _with_headers(scope, {"content-type": "application/json"})
        scope = _with_headers(scope, {"content-length": str(len(body))}, drop=("transfer-encoding",))
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        hidden = False

        async def guarded_send(message):
            nonlocal hidden
            if message["type"] == "http.response.start" and message["status"] == 500:
                hidden = True
                start, out = _json_response(500, {"error": "internal server error (the server log has the details)"})
                await send(start)
                await send(out)
                return
            if hidden:
                return
            await send(message)

        await self.app(scope, replay, guarded_send)


def _with_headers(scope, set_headers: dict[str, str], drop: tuple[str, ...] = ()) -> dict:
    names = set(set_headers) | set(drop)
    headers = [(k, v) for k, v in scope.get("headers", []) if k.decode("latin-1").lower() not in names]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in set_headers.items()]
    return {**scope, "headers": headers}


def api_key_dependency(api_key: str):
    """A FastAPI dependency that requires ``api_key`` in ``X-API-Key`` or as a Bearer token on
    every route but the exact health/readiness routes of :data:`OPEN_ROUTES`."""
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")
    bearer = HTTPBearer(auto_error=False, description="the API key as a Bearer token")

    async def require_api_key(request: Request, key: str | None = Security(header),
                              token: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        route = request.scope.get("route")
        if request.method == "OPTIONS" or getattr(route, "path", None) in OPEN_ROUTES:
            return
        given = key or (token.credentials if token else "")
        if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise Unauthorized("missing or wrong API key: send it in the X-API-Key header")

    return require_api_key


def run_model_server(model, *, http_port: int, workers: int = 1,
                     add_routes: Callable | None = None, on_bad_request: Callable | None = None,
                     max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, api_key: str | None = None,
                     on_reject: Callable[[int], None] | None = None) -> None:
    """Serve ``model`` over HTTP until the process is stopped (SIGTERM/SIGINT).

    On KServe's app: OpenAPI docs at ``/docs``; malformed request bodies answered 400 with the
    reason (like every other client mistake, instead of FastAPI's 422); the
    :class:`RequestGuard` with ``max_body_bytes``; the API key when given; ``add_routes(app)``
    adds the model's own routes and middleware before KServe adds its V1/V2 routes."""
    import kserve
    from fastapi import Depends
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import JSONResponse
    from kserve.model_server import app

    async def bad_request(_request, exc):
        if on_bad_request:
            on_bad_request()
        # where and what was wrong, never the values sent (they may be a whole image)
        problems = [{"loc": e.get("loc"), "msg": e.get("msg")} for e in exc.errors()[:5]]
        return JSONResponse(status_code=400, content={"error": f"malformed request body: {problems}"})

    async def busy(_request, exc):
        return JSONResponse(status_code=503, content={"error": str(exc)}, headers={"retry-after": "1"})

    async def unauthorized(_request, exc):
        return JSONResponse(status_code=401, content={"error": str(exc)})

    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(Busy, busy)
    app.add_exception_handler(Unauthorized, unauthorized)
    if api_key:
        app.router.dependencies.append(Depends(api_key_dependency(api_key)))
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, on_reject=on_reject)
    if app.docs_url is None:
        @app.get("/docs", include_in_schema=False)
        async def docs():
            return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title}: docs")
    if add_routes:
        add_routes(app)
    model.load()
    kserve.ModelServer(http_port=http_port, enable_grpc=False, enable_docs_url=True,
                       workers=workers).start([model])
