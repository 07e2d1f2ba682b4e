"""The search service's plain HTTP routes, beside KServe's V1/V2 ones on the same app::

    POST /search        multipart: image (file), crop ("x0,y0,x1,y1"), k, filter (JSON) -- or JSON
                        {"image_b64", "crop", "k", "filter", "url"} -> {"query_id", "results": [...]}
    GET  /images/<id>   the catalog image (file served, http(s) redirected)
    POST /events        {"type": "click", "query_id", "item_id"} (and deferred impressions)
    GET  /api/config    what the web page needs to know
    GET  /              the web page (``web/``)

The API key (when configured) is a FastAPI security dependency of every route, KServe's
included, except the exact health and readiness routes and the static page; it shows in the
OpenAPI page. Errors are ``{"error": reason}`` with the status of their kind.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import urllib.parse
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, Request, Security
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from ...core.images import web_media_type
from .errors import BadQuery, NotFound, SearchError, TooLarge, Unauthorized, Unavailable
from .metrics import REJECTED
from .request import query_from_fields
from .service import SearchService
from .settings import SearchSettings

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
FORM_FIELDS = ("image", "crop", "k", "filter", "url", "log_impression")
# Routes that answer without the API key: health, readiness, the page (exact route templates).
OPEN_ROUTES = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}/ready",
                         "/v2/models/{model_name}/versions/{model_version}/ready", "/v1/models/{model_name}"})


def api_key_dependency(api_key: str):
    """A dependency that requires ``api_key`` in ``X-API-Key`` or as a Bearer token."""
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the search API key")
    bearer = HTTPBearer(auto_error=False, description="the search API key as a Bearer token")

    async def require_api_key(request: Request, key: str | None = Security(header),
                              token: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        route = request.scope.get("route")
        if request.method == "OPTIONS" or getattr(route, "path", None) in OPEN_ROUTES:
            return
        given = key or (token.credentials if token else "")
        if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise Unauthorized("missing or wrong API key: send it in the X-API-Key header")

    return require_api_key


def add_routes(app, get_service: Callable[[], SearchService | None], settings: SearchSettings) -> None:
    """Add the routes, the API-key dependency, the body limit and CORS to KServe's app (before
    KServe adds its own routes, so that ``/`` is the web page and they get the dependency too)."""

    async def search_error(_request, exc: SearchError):
        if exc.status >= 500:
            log.warning("search failed (%d): %s", exc.status, exc.reason)
        return JSONResponse({"error": exc.reason}, status_code=exc.status)

    app.add_exception_handler(SearchError, search_error)
    if settings.api_key:
        app.router.dependencies.append(Depends(api_key_dependency(settings.api_key)))

    max_body = settings.max_upload_bytes * 4 // 3 + 256 * 1024     # base64 + multipart overhead

    @app.middleware("http")
    async def limit_and_count(request: Request, call_next):
        length = request.headers.get("content-length")
        if request.method in ("POST", "PUT") and length and length.isdigit() and int(length) > max_body:
            REJECTED.labels("413").inc()
            return JSONResponse({"error": f"request body is {length} bytes; uploads are limited to "
                                          f"{settings.max_upload_bytes} bytes"}, status_code=413)
        response = await call_next(request)
        if response.status_code >= 400:
            REJECTED.labels(str(response.status_code)).inc()
        return response

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["content-type", "x-api-key", "authorization"])

    def service() -> SearchService:
        svc = get_service()
        if svc is None:
            raise Unavailable("the search model is still loading")
        return svc

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

    @app.get("/api/config", tags=["search"], summary="What the web page needs to know")
    async def config():
        svc = get_service()
        return {"k_default": settings.k_default, "k_max": settings.k_max,
                "filter_fields": list(settings.filter_fields),
                "max_upload_bytes": settings.max_upload_bytes,
                "model_version": svc.model_version if svc else None,
                "url_queries": settings.allow_url_queries, "api_key_required": bool(settings.api_key)}

    @app.post("/search", tags=["search"], summary="Search with an image (multipart or JSON)",
              description="multipart/form-data: `image` (file), optional `crop` (x0,y0,x1,y1 "
                          "normalised), `k`, `filter` (JSON object), `url` (when URL queries are "
                          "on). Or a JSON body {image_b64, crop, k, filter, url}. Answers "
                          '{"query_id", "model_version", "results": [{id, score, uri, metadata}]}.')
    async def search(request: Request):
        svc = service()
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            try:
                body = await request.json()
            except ValueError as exc:
                raise BadQuery(f"body is not valid JSON: {exc}") from exc
        elif ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            body = await _form_fields(request, settings)
        else:
            raise BadQuery("send multipart/form-data with an 'image' file, or a JSON body with image_b64")
        query = await asyncio.to_thread(query_from_fields, body, settings, svc.fetch_url)
        return await asyncio.to_thread(svc.search, query)

    @app.get("/images/{item_id:path}", tags=["search"], summary="The catalog image of a result")
    async def image(item_id: str):
        svc = service()
        uri = await asyncio.to_thread(svc.image_location, item_id)
        parsed = urllib.parse.urlsplit(uri)
        if parsed.scheme in ("http", "https"):
            return RedirectResponse(uri, status_code=307)
        if parsed.scheme not in ("file", ""):
            raise NotFound(f"catalog image {item_id!r} has a uri this server cannot serve ({parsed.scheme}:)")
        path = Path(urllib.parse.unquote(parsed.path)).resolve()
        if settings.image_roots and not any(path.is_relative_to(r) for r in settings.image_roots):
            raise NotFound(f"catalog image {item_id!r} lies outside the served folders")
        if not path.is_file():
            raise NotFound(f"catalog image {item_id!r} is gone from {path}")
        if path.stat().st_size > settings.max_upload_bytes:
            raise NotFound(f"catalog image {item_id!r} is too large to serve")
        data = await asyncio.to_thread(path.read_bytes)
        kind = web_media_type(data)
        if kind is None:
            raise NotFound(f"catalog item {item_id!r} does not point at a JPEG/PNG/WebP/GIF image")
        return Response(data, media_type=kind[0], headers={"cache-control": "max-age=300"})

    @app.post("/events", tags=["search"], summary="Record clicks (and deferred impressions)",
              description='{"type": "click", "query_id": ..., "item_id": ...} or a list of such '
                          'objects; {"type": "impression", "query_id": ...} logs the impression of '
                          "a search made with log_impression=false.")
    async def events(request: Request):
        svc = service()
        try:
            body = await request.json()
        except ValueError as exc:
            raise BadQuery(f"body is not valid JSON: {exc}") from exc
        items = body if isinstance(body, list) else [body]
        if not 1 <= len(items) <= 100:
            raise BadQuery("send 1 to 100 events")
        return {"events": [svc.record_event(e) for e in items]}


async def _form_fields(request: Request, settings: SearchSettings) -> dict[str, Any]:
    """The fields of a search form, the image file as base64 (as a JSON body would carry it)."""
    try:
        form = await request.form(max_files=1, max_fields=10)
    except Exception as exc:  # noqa: BLE001  (Starlette's multipart parser raises several kinds)
        raise BadQuery(f"could not read the form: {exc}") from exc
    unknown = set(form.keys()) - set(FORM_FIELDS)
    if unknown:
        raise BadQuery(f"unknown form field(s) {sorted(unknown)}: expected image, crop, k, filter, url")
    fields: dict[str, Any] = {}
    upload = form.get("image")
    if upload is not None and not isinstance(upload, str):
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise TooLarge(f"image is over the limit of {settings.max_upload_bytes} bytes")
        if not data:
            raise BadQuery("the uploaded image file is empty")
        fields["image"] = base64.b64encode(data).decode()
    elif isinstance(upload, str) and upload:
        raise BadQuery("form field 'image' must be a file upload (multipart/form-data)")
    for key in ("crop", "k", "filter", "url"):
        if form.get(key) not in (None, ""):
            fields[key] = form.get(key)
    if str(form.get("log_impression", "")).lower() in ("0", "false", "no"):
        fields["log_impression"] = False
    return fields
