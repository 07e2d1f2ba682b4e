"""Running a KServe ``ModelServer`` (the same server an InferenceService runs) for one of our
models. KServe keeps process-wide state: it parses ``sys.argv`` when it is first imported and
serves one module-level FastAPI app. Only the entry point that owns the process touches either,
through the two functions here; library code never does."""

from __future__ import annotations

import sys
from typing import Callable


def hide_argv_from_kserve() -> None:
    """KServe parses ``sys.argv`` for flags of its own when first imported; ours are not for it
    (everything it needs is passed to ``ModelServer``). Call before anything imports kserve."""
    if "kserve" not in sys.modules:
        sys.argv = sys.argv[:1]


def run_model_server(model, *, http_port: int, workers: int = 1,
                     add_routes: Callable | None = None, on_bad_request: Callable | None = None) -> None:
    """Serve ``model`` over HTTP until the process is stopped (SIGTERM/SIGINT).

    On KServe's app: OpenAPI docs at ``/docs``; malformed request bodies answered 400 with the
    reason (like every other client mistake, instead of FastAPI's 422); ``add_routes(app)``
    adds the model's own routes and middleware before KServe adds its V1/V2 routes."""
    import kserve
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import JSONResponse
    from kserve.model_server import app

    async def bad_request(_request, exc):
        if on_bad_request:
            on_bad_request()
        return JSONResponse(status_code=400,
                            content={"error": f"malformed request body: {str(exc.errors())[:500]}"})

    app.add_exception_handler(RequestValidationError, bad_request)
    if app.docs_url is None:
        @app.get("/docs", include_in_schema=False)
        async def docs():
            return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title}: docs")
    if add_routes:
        add_routes(app)
    model.load()
    kserve.ModelServer(http_port=http_port, enable_grpc=False, enable_docs_url=True,
                       workers=workers).start([model])
