"""persona-lora: upload dialogs, train a LoRA adapter per speaker. Run with `fastapi dev main.py`, or
`python main.py` (uvicorn closing half-sent requests: api/server.py).

The app: its lifespan (the services in api/deps.py), its error handlers (one shape: `{"detail": ...}`,
OpenAI's under /v1) and its routers (api/). No endpoint bodies here.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import health, openai_compat, page, server, speakers
from api import jobs as jobs_api
from api import model_exports as exports_api
from api.deps import close_services, open_services, require_api_key
from api.middleware import AccessLog, AllowedHosts, BodyLimit, CrossSiteGuard, UnexpectedErrors
from config import get_settings
from errors import ServiceError, public_errors, scrub


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    if not logging.getLogger().handlers:  # under `fastapi dev` / uvicorn; a host's own logging (tests) is left alone
        configure_logging(settings.LOG_LEVEL)
    logging.getLogger("uvicorn.access").disabled = True  # it logs query strings; AccessLog logs the request without
    open_services(app, settings)
    yield
    await close_services(app)


class _OwnLines(logging.Filter):
    """Above debug, the service's own lines and other libraries' errors: what happened, not how."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.startswith("persona_lora")


def configure_logging(level: str) -> None:
    """The server's log on stderr at LOG_LEVEL. Above debug: no libraries' warnings (bitsandbytes' missing
    `kernels`, transformers' FutureWarnings: Python warnings go through logging, then the filter), no
    progress bars (huggingface_hub's and transformers', off by their variables, read at their import, which
    comes later: in the warm-up and the first generation) and no read that succeeded (AccessLog)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if level != "debug":
        handler.addFilter(_OwnLines())
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its own handler, not the root's
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.captureWarnings(True)


app = FastAPI(
    title="persona-lora",
    summary="Turn chat dialogs into a per-speaker LoRA adapter.",
    description=(
        "Upload dialogs with **POST /upload-text**, then train a speaker's adapter with **POST /train**. "
        "Training runs in the background; poll **GET /jobs/{job_id}**. A page for people is at [/](/)."
    ),
    version="0.1.0",
    lifespan=lifespan,
)
app.add_middleware(UnexpectedErrors)  # innermost: AccessLog sees its 500
app.add_middleware(BodyLimit)
app.add_middleware(CrossSiteGuard)  # before the body is read
app.add_middleware(AllowedHosts)  # before CrossSiteGuard, which trusts the Host header
app.add_middleware(AccessLog)

@app.exception_handler(ServiceError)
async def service_error_handler(request: Request, exc: ServiceError) -> JSONResponse:
    return openai_compat.openai_error(request, exc, exc.headers) or JSONResponse(
        status_code=exc.status, content={"detail": scrub(exc.detail)}, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with each problem's location and message, never the value sent (it may be a person's message),
    and for a body of the wrong form what to send instead; under /v1 OpenAI's 400."""
    problems = public_errors(exc.errors(), exc.body, request.headers.get("content-type"),
                             speakers.FORM_ROUTES.get(request.url.path))
    return openai_compat.openai_error(request, exc, problems=problems) or JSONResponse(status_code=422, content={"detail": problems})


@app.exception_handler(StarletteHTTPException)
async def http_error_handler(request: Request, exc: StarletteHTTPException):
    """Unknown paths, wrong methods, the body limit: FastAPI's own answer (OpenAI's shape under /v1).
    A 405's Allow lists every method of the path: Starlette names only the first route's (one path
    may have a GET route and a POST route)."""
    if exc.status_code == 405:
        exc.headers = {**(exc.headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    return openai_compat.openai_error(request, exc, exc.headers) or await http_exception_handler(request, exc)


def _allowed_methods(request: Request) -> list[str]:
    from starlette.routing import Match

    def served(method: str) -> bool:
        scope = {**request.scope, "method": method}
        return any(route.matches(scope)[0] == Match.FULL for route in request.app.routes)

    allowed = [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE") if served(m)]
    return allowed + ["HEAD"] * ("GET" in allowed)


app.include_router(health.router)
app.include_router(speakers.router)
app.include_router(jobs_api.router)
app.include_router(exports_api.router)
app.include_router(openai_compat.router, dependencies=[Depends(require_api_key)])  # its errors: OpenAI's shape
app.include_router(page.router)  # the page at / and its files: no data, so no key
app.mount("/static", page.assets, name="static")


if __name__ == "__main__":  # python main.py [--host 0.0.0.0] [--port 8000]
    server.run(app)
