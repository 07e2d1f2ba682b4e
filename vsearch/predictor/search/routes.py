"""The search service's plain HTTP routes, beside KServe's V1/V2 ones on the same app::

    POST /search        multipart: image (file), crop ("x0,y0,x1,y1"), k, filter (JSON) -- or JSON
                        {"image_b64", "crop", "k", "filter", "url"} -> {"query_id", "results": [...]};
                        header X-User-Id (else cookie vsearch_uid): an online experiment's unit
    GET  /images/<id>   the catalog image (file:// under --image-roots, http(s) fetched through the
                        guarded fetcher: served from this origin, never redirected)
    POST /events        {"type": "click", "token", "item_id"} (and deferred impressions)
    GET  /api/config    what the web page needs to know
    GET  /              the web page (``web/``)

The handlers live on one ``APIRouter`` (:data:`router`); :func:`add_routes` puts it on the app.
The API key (when configured: ``serving.run_model_server``) is checked by ``serving.RequestGuard``
before any body is read, on every route, KServe's included, except the exact health and
readiness routes and the static page; it shows in the OpenAPI page. The body limit is ``serving.RequestGuard``'s, on the bytes
read. Errors are ``{"error": reason}`` with the status of their kind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as futures
import functools
import logging
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from ...core.text import names_brief
from .errors import BadQuery, SearchError, TooLarge, Unavailable
from .metrics import REJECTED
from .request import query_from_fields, unit_of
from .service import SearchService
from .settings import SearchSettings

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
FORM_FIELDS = ("image", "crop", "k", "filter", "url", "log_impression")

def _settings(request: Request) -> SearchSettings:
    return request.app.state.search_settings


def _service(request: Request) -> SearchService:
    svc = request.app.state.search_service()
    if svc is None:
        raise Unavailable("the search model is still loading")
    return svc


async def _on_threads(request: Request, fn: Callable, *args):
    """``fn(*args)`` on the search threads (``--search-threads``; asyncio's default pool when 0):
    the service is synchronous and waits on the embedder and on Milvus."""
    pool = getattr(request.app.state, "search_executor", None)
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))


async def _search_error(_request, exc: SearchError):
    if exc.status >= 500:
        log.warning("search failed (%d): %s", exc.status, exc.reason)
    return JSONResponse({"error": exc.reason}, status_code=exc.status)


async def _count_rejections(request: Request, call_next):
    response = await call_next(request)
    if response.status_code >= 400:
        REJECTED.labels(str(response.status_code)).inc()
    return response


router = APIRouter(tags=["search"])


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")


@router.get("/api/config", summary="What the web page needs to know")
async def config(request: Request, settings: SearchSettings = Depends(_settings)):
    svc = request.app.state.search_service()
    return {"k_default": settings.k_default, "k_max": settings.k_max,
            "filter_fields": list(settings.filter_fields),
            "max_upload_bytes": settings.max_upload_bytes,
            "model_version": svc.model_version if svc else None,
            "model": svc.model_of() if svc else None,
            "weak_match_score": settings.weak_match_score,
            "url_queries": settings.allow_url_queries, "api_key_required": bool(settings.api_key)}


@router.post("/search", summary="Search with an image (multipart or JSON)",
             description="multipart/form-data: `image` (file), optional `crop` (x0,y0,x1,y1 "
                         "normalised), `k`, `filter` (JSON object), `url` (when URL queries are "
                         "on). Or a JSON body {image_b64, crop, k, filter, url}. Answers "
                         '{"query_id", "model_version", "model": {name, version}, "results": '
                         "[{id, score, uri (this service's /images/<id>), metadata}], \"token\"}, and "
                         '"experiment": {id, arm} while an online experiment runs. The header '
                         "`X-User-Id` (else the cookie `vsearch_uid` the web page sets) names the user "
                         "whose arm is kept across searches; without it the query image is the unit.")
async def search(request: Request, svc: SearchService = Depends(_service),
                 settings: SearchSettings = Depends(_settings)):
    unit = unit_of(request.headers, request.cookies)
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError as exc:
            raise BadQuery(f"body is not valid JSON: {str(exc)[:200]}") from exc
    elif ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        body = await _form_fields(request, settings)
    else:
        raise BadQuery("send multipart/form-data with an 'image' file, or a JSON body with image_b64")
    query = await _on_threads(request, query_from_fields, body, settings, svc.fetch_url)
    query.unit = unit
    return await _on_threads(request, svc.search, query)


@router.get("/images/{item_id:path}", summary="The catalog image of a result")
async def image(request: Request, item_id: str, svc: SearchService = Depends(_service)):
    data, media_type = await _on_threads(request, svc.catalog_image, item_id)
    return Response(data, media_type=media_type, headers={
        "cache-control": "max-age=300", "x-content-type-options": "nosniff",
        "content-security-policy": "default-src 'none'; sandbox"})


@router.post("/events", summary="Record clicks (and deferred impressions)",
             description='{"type": "click", "token": ..., "item_id": ...} or a list of such '
                         'objects; {"type": "impression", "token": ...} logs the impression of '
                         "a search made with log_impression=false.")
async def events(request: Request, svc: SearchService = Depends(_service)):
    try:
        body = await request.json()
    except ValueError as exc:
        raise BadQuery(f"body is not valid JSON: {str(exc)[:200]}") from exc
    items = body if isinstance(body, list) else [body]
    if not 1 <= len(items) <= 100:
        raise BadQuery("send 1 to 100 events")
    return {"events": await _on_threads(request, svc.record_events, items)}     # reads the catalog


def add_routes(app, get_service: Callable[[], SearchService | None], settings: SearchSettings) -> None:
    """Add :data:`router`, the page's static files, the error handler, the rejection counter
    and CORS to KServe's app (before KServe adds its own routes, so that ``/`` is the web
    page). The handlers find the service and the settings on ``app.state``."""
    app.state.search_service = get_service
    app.state.search_settings = settings
    app.state.search_executor = (futures.ThreadPoolExecutor(settings.threads, thread_name_prefix="search")
                                 if settings.threads else None)
    app.add_exception_handler(SearchError, _search_error)
    app.middleware("http")(_count_rejections)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["content-type", "x-api-key", "authorization", "x-user-id"])
    app.include_router(router)
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")


async def _form_fields(request: Request, settings: SearchSettings) -> dict[str, Any]:
    """The fields of a search form, as a JSON body would carry them (the image file as its bytes)."""
    try:
        form = await request.form(max_files=1, max_fields=10)
    except Exception as exc:  # noqa: BLE001  (Starlette's multipart parser raises several kinds)
        raise BadQuery(f"could not read the form: {exc}") from exc
    unknown = set(form.keys()) - set(FORM_FIELDS)
    if unknown:
        raise BadQuery(f"unknown form field(s) {names_brief(unknown)}: expected {', '.join(FORM_FIELDS)}")
    fields: dict[str, Any] = {}
    upload = form.get("image")
    if upload is not None and not isinstance(upload, str):
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise TooLarge(f"image is over the limit of {settings.max_upload_bytes} bytes")
        if not data:
            raise BadQuery("the uploaded image file is empty")
        fields["image"] = data                     # the parser takes bytes as they are
    elif isinstance(upload, str) and upload:
        raise BadQuery("form field 'image' must be a file upload (multipart/form-data)")
    for key in ("crop", "k", "filter", "url"):
        if form.get(key) not in (None, ""):
            fields[key] = form.get(key)
    if str(form.get("log_impression", "")).lower() in ("0", "false", "no"):
        fields["log_impression"] = False
    return fields
