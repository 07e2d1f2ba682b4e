"""Running a KServe ``ModelServer``'s app (the same app an InferenceService serves) for one of
our models. KServe keeps process-wide state: it parses ``sys.argv`` when it is first imported
and serves one module-level FastAPI app. Only the entry point that owns the process touches
either, through the functions here; library code never does.

What every server of ours gets (:func:`run_model_server`), bounded by :class:`ServerLimits`:

- the connection (:class:`GuardedProtocol`, uvicorn's httptools protocol): a request's headers
  must arrive within ``header_timeout_s`` of its first byte (else 408 and closed: no slowloris),
  at most ``max_connections`` connections are open (the next one gets a 503 and is closed), an
  idle kept-alive connection closes after ``keep_alive_s``;
- :class:`RequestGuard`, an ASGI middleware in front of every route, in this order: the
  exact health/readiness routes, ``/`` and the page's static files pass; then the API key
  (``api_key``) is checked from the headers, *before* any of the body is read (401); at most
  ``max_concurrent`` requests are read or answered at once (503 with ``Retry-After``); the body
  must arrive within ``body_timeout_s`` (408) and is limited on the bytes actually read (413);
  a JSON body is counted (objects, arrays, list items: ``max_json_values``) before anything
  parses it (a V2 request's inputs, ``max_inputs``, once KServe has parsed the bounded body:
  ``protocol.check_v2_inputs``); inference requests that use the
  binary tensor extension (``Inference-Header-Content-Length``) are turned into plain JSON
  off the event loop, elements counted before any is built (raw BYTES elements as
  ``{"b64": ...}``, numbers as numbers), because KServe's own decoder reads BYTES as UTF-8 text
  and answers a 500 echoing the image; an inference body sent with a form content type
  (``curl -d``) is read as the JSON it is; the body of a 500 never carries the request;
- KServe's model-repository routes (``/v2/repository/...``: load, unload, index) removed: this
  platform loads one model per process at start, and an unload would leave a live pod that is
  never ready again;
- :class:`Busy` (a full queue) answered 503 with ``Retry-After``; malformed bodies 400.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import sys
from typing import Callable

import uvicorn

# Request and Security at module level: FastAPI resolves the dependencies' (string) annotations here
from fastapi import Depends, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .limits import DEFAULT_MAX_BODY_BYTES, ServerLimits

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServerLimits", "RequestGuard", "GuardedProtocol", "Busy",
           "Unauthorized", "run_model_server", "is_open", "OPEN_ROUTES"]

# Routes that answer without the API key: health, readiness, the page (exact route templates).
OPEN_ROUTES = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}/ready",
                         "/v2/models/{model_name}/versions/{model_version}/ready", "/v1/models/{model_name}"})
_SEGMENT = "[^/]+"
_OPEN_PATHS = re.compile("|".join(
    "(?:" + re.sub(r"\{[a-z_]+\}", _SEGMENT, route) + ")" for route in sorted(OPEN_ROUTES)) + r"|/web/[^\x00]*")
_INFER_PATH = re.compile(r"^/(v1/models/[^/]+:predict|v2/models/[^/]+(/versions/[^/]+)?/infer)$")
_FORM_TYPES = ("", "application/x-www-form-urlencoded", "text/plain")
BINARY_HEADER = "inference-header-content-length"
REPOSITORY_ROUTES = re.compile(r"^/v[12]/repository(/|$)")
AUTH_REASON = "missing or wrong API key: send it in the X-API-Key header (or as a Bearer token)"


class Busy(Exception):
    """The server's queue is full: answered 503 with ``Retry-After``; retry later."""


class Unauthorized(Exception):
    """No API key, or the wrong one: answered 401 with the reason."""


def is_open(method: str, path: str) -> bool:
    """Whether a request answers without the API key: GET/HEAD of the exact health and
    readiness routes, the page and its static files; OPTIONS (CORS preflight)."""
    if method == "OPTIONS":
        return True
    return method in ("GET", "HEAD") and _OPEN_PATHS.fullmatch(path) is not None


def key_matches(headers: dict[str, str], api_key: str) -> bool:
    """The key of ``X-API-Key`` or ``Authorization: Bearer`` equals ``api_key`` (constant time)."""
    given = headers.get("x-api-key", "")
    if not given:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
    return bool(given) and hmac.compare_digest(given.encode("utf-8", "replace"), api_key.encode())


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


def _raw_response(status: int, phrase: str, reason: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection (for the protocol, below ASGI)."""
    data = json.dumps({"error": reason}).encode()
    return (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
            f"retry-after: 1\r\nconnection: close\r\n\r\n").encode() + data


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout and a cap on open connections (see
    the module); :func:`guarded_protocol` makes one with the server's limits."""

    limits = ServerLimits()

    def connection_made(self, transport) -> None:
        self._header_timer = None
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("%d connections open (the limit is %d): refusing one", len(self.connections) - 1,
                        self.limits.max_connections)
            transport.write(_raw_response(503, "Service Unavailable",
                                          "too many open connections; retry later"))
            transport.close()
            return
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        timer, self._header_timer = getattr(self, "_header_timer", None), None
        if timer is not None:
            timer.cancel()

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_raw_response(
                408, "Request Timeout", f"the request's headers did not arrive within "
                                        f"{self.limits.header_timeout_s:g} s"))
            self.transport.close()


def guarded_protocol(limits: ServerLimits) -> type[GuardedProtocol]:
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits})


class RequestGuard:
    """ASGI middleware: open routes, API key before the body, concurrency cap, body timeout
    and limit, JSON counted before parsing, binary tensor extension -> JSON off the loop, form
    content type of inference bodies -> JSON, no request echo in 500s (see the module)."""

    def __init__(self, app, limits: ServerLimits = ServerLimits(), api_key: str | None = None,
                 on_reject: Callable[[int], None] | None = None):
        self.app, self.limits, self.api_key, self.on_reject = app, limits, api_key, on_reject
        self.active = 0

    async def _answer(self, send, status: int, reason: str, *, close: bool = False) -> None:
        if self.on_reject:
            self.on_reject(status)
        extra = [(b"connection", b"close")] if close else []
        if status == 503:
            extra.append((b"retry-after", b"1"))
        start, body = _json_response(status, {"error": reason}, tuple(extra))
        await send(start)
        await send(body)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or is_open(scope["method"], scope.get("path", "")):
            return await self.app(scope, receive, send)
        if REPOSITORY_ROUTES.match(scope.get("path", "")):
            return await self._answer(send, 404, "not found: this server has no model-repository routes "
                                                 "(its model is loaded at start)", close=True)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and not key_matches(headers, self.api_key):
            return await self._answer(send, 401, AUTH_REASON, close=scope["method"] not in ("GET", "HEAD"))
        if self.active >= self.limits.max_concurrent:
            return await self._answer(send, 503, f"{self.active} requests in progress (the limit is "
                                                 f"{self.limits.max_concurrent}); retry later", close=True)
        self.active += 1
        try:
            if scope["method"] in ("GET", "HEAD", "DELETE"):
                return await self.app(scope, receive, send)
            return await self._with_body(scope, headers, receive, send)
        finally:
            self.active -= 1

    async def _read_body(self, headers, receive, send) -> bytes | None:
        limit = self.limits.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._answer(send, 413, f"request body is {declared} bytes; the limit is {limit} bytes",
                               close=True)
            return None
        chunks, total = [], 0
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    total += len(chunk)
                    if total > limit:
                        await self._answer(send, 413, f"request body is over the limit of {limit} bytes",
                                           close=True)
                        return None
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            await self._answer(send, 408, f"the request body did not arrive within "
                                          f"{self.limits.body_timeout_s:g} s ({total} bytes came)", close=True)
            return None

    async def _with_body(self, scope, headers, receive, send):
        from kserve.errors import InvalidInput

        from .protocol import binary_request_to_json, check_json_body
        body = await self._read_body(headers, receive, send)
        if body is None:
            return
        path = scope.get("path", "")
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        infer = _INFER_PATH.match(path) is not None
        try:
            if infer and BINARY_HEADER in headers:
                head = await asyncio.to_thread(binary_request_to_json, body, headers[BINARY_HEADER], self.limits)
                body = await asyncio.to_thread(json.dumps, head)
                body = body.encode()
                scope = _with_headers(scope, {"content-type": "application/json"}, drop=(BINARY_HEADER,))
            elif ctype.endswith("json") or body.lstrip()[:1] in (b"{", b"["):
                # anything a route may read as JSON (Starlette's request.json() ignores the type)
                await asyncio.to_thread(check_json_body, body, self.limits)
                if infer and ctype in _FORM_TYPES:
                    scope = _with_headers(scope, {"content-type": "application/json"})
        except InvalidInput as exc:
            return await self._answer(send, 400, str(exc.reason if hasattr(exc, "reason") else exc))
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
    every route but the open ones (:func:`is_open`). :class:`RequestGuard` enforces the same
    rule before any body is read; this one shows the key in the OpenAPI page and covers the
    routes once more."""
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")
    bearer = HTTPBearer(auto_error=False, description="the API key as a Bearer token")

    async def require_api_key(request: Request, key: str | None = Security(header),
                              token: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        if is_open(request.method, request.url.path):
            return
        given = key or (token.credentials if token else "")
        if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise Unauthorized(AUTH_REASON)

    return require_api_key


def close_repository_routes(app) -> list[str]:
    """Remove KServe's model-repository routes (load, unload, index) from ``app`` and the
    routers it includes (FastAPI keeps included routers nested); returns the paths removed.
    :class:`RequestGuard` answers 404 on those paths as well, whatever the routing does."""
    removed: list[str] = []

    def prune(router) -> None:
        routes = getattr(router, "routes", None)
        if not isinstance(routes, list):
            return
        keep = []
        for route in routes:
            path = getattr(route, "path", None)
            if isinstance(path, str) and REPOSITORY_ROUTES.match(path):
                removed.append(path)
                continue
            for inner in (getattr(route, "original_router", None), getattr(route, "router", None)):
                if inner is not None and inner is not router:
                    prune(inner)
            keep.append(route)
        routes[:] = keep

    prune(app.router)
    app.openapi_schema = None
    return removed


def run_model_server(model, *, http_port: int, workers: int = 1,
                     add_routes: Callable | None = None, on_bad_request: Callable | None = None,
                     limits: ServerLimits = ServerLimits(), api_key: str | None = None,
                     on_reject: Callable[[int], None] | None = None) -> None:
    """Serve ``model`` over HTTP until the process is stopped (SIGTERM/SIGINT).

    KServe's app and routes (V1, V2, health, ``/metrics``) with: OpenAPI docs at ``/docs``
    (behind the key like everything but health); malformed request bodies answered 400 with
    the reason (like every other client mistake, instead of FastAPI's 422); the
    :class:`RequestGuard`; the API key when given; ``add_routes(app)`` adds the model's own
    routes and middleware before KServe adds its V1/V2 routes; the model-repository routes
    removed; served by uvicorn with :class:`GuardedProtocol`. One process: scale with replicas
    (KServe's multi-process mode would bypass the guarded protocol)."""
    if workers != 1:
        raise ValueError("one worker process per server: run more replicas instead")
    import kserve
    from kserve.model_server import FASTAPI_APP_IMPORT_STRING, app
    from kserve.protocol.rest.server import RESTServer

    async def bad_request(_request, exc):
        if on_bad_request:
            on_bad_request()
        # where and what was wrong, never the values sent (they may be a whole image)
        problems = [{"loc": [str(p)[:40] for p in (e.get("loc") or ())][:6], "msg": str(e.get("msg"))[:200]}
                    for e in exc.errors()[:5]]
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
    app.add_middleware(RequestGuard, limits=limits, api_key=api_key, on_reject=on_reject)
    if app.docs_url is None:
        @app.get("/docs", include_in_schema=False)
        async def docs():
            return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title}: docs")
    if add_routes:
        add_routes(app)
    model.load()
    server = kserve.ModelServer(http_port=http_port, enable_grpc=False, enable_docs_url=True, workers=1,
                                timeout_keep_alive=int(max(1, limits.keep_alive_s)))
    server.register_model(model)
    model.start()
    rest = RESTServer(FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension,
                      http_port, workers=1, grace_period=server.grace_period,
                      timeout_keep_alive=int(max(1, limits.keep_alive_s)))
    rest.create_application()
    removed = close_repository_routes(app)
    log.info("KServe's model-repository routes removed: %s", ", ".join(removed) or "none were there")
    config = rest.config
    config.http = guarded_protocol(limits)
    config.timeout_keep_alive = limits.keep_alive_s
    config.h11_max_incomplete_event_size = 64 * 1024
    uvicorn.Server(config).run()
