"""What both of our KServe model servers (embedder and search) need from KServe itself."""

from __future__ import annotations

import sys


def import_kserve():
    """Import kserve without letting ``kserve.model_server`` parse our command line: it reads
    ``sys.argv`` at import time and builds its FastAPI app then (``/docs`` is on only when
    ``--enable_docs_url`` is in argv at that moment, so we put it there)."""
    saved = sys.argv
    sys.argv = [*saved[:1], "--enable_docs_url", "true"]
    try:
        import kserve  # noqa: F401
        import kserve.model_server  # noqa: F401
    finally:
        sys.argv = saved
    return kserve


def install_request_error_handler(on_error=None) -> None:
    """Malformed request bodies (bad JSON, wrong structure) are a 400 with the reason, like
    every other client mistake, instead of FastAPI's 422."""
    import kserve.model_server
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    async def handler(_request, exc):
        if on_error:
            on_error()
        return JSONResponse(status_code=400,
                            content={"error": f"malformed request body: {str(exc.errors())[:500]}"})

    kserve.model_server.app.add_exception_handler(RequestValidationError, handler)
