"""ASGI middleware of the service: cross-site refusal, the request body limit, the access log,
unexpected errors.

Both are plain ASGI (no BaseHTTPMiddleware) so that streaming responses, such as a job's event
stream, pass through untouched.
"""

from __future__ import annotations

import json
import logging
import time
import traceback

from fastapi import HTTPException

from config import get_settings

access_log = logging.getLogger("persona_lora.access")
error_log = logging.getLogger("persona_lora")
EXPORT_PATHS = ("/upload-file", "/exports/inspect")  # export files: MAX_UPLOAD_BYTES, not MAX_BODY_BYTES


class BodyLimit:
    """413 for a body over MAX_BODY_BYTES: at once when Content-Length says so, before anything is
    read; otherwise as soon as the chunks read so far exceed it (chunked uploads)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = get_settings()
        name, limit = ("MAX_UPLOAD_BYTES", settings.MAX_UPLOAD_BYTES) if scope["path"] in EXPORT_PATHS else (
            "MAX_BODY_BYTES", settings.MAX_BODY_BYTES)
        detail = f"request body is larger than {name}={limit} bytes; split the dialog into several uploads"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await _send_json(send, 413, detail, scope["path"])
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # FastAPI passes HTTPException from body reading through to its handler.
                    raise HTTPException(status_code=413, detail=detail)
            return message

        await self.app(scope, limited_receive, send)


STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


class CrossSiteGuard:
    """403 for a state-changing request a browser sends from another site's page: a multipart form
    or a no-cors fetch() needs no CORS pre-flight, so without this any page the user visits could
    upload, train or cancel on localhost. Refused: an Origin that is neither the server's own (the
    scheme and Host the request came to) nor in ALLOWED_ORIGINS ("null" from sandboxed frames
    included), and Sec-Fetch-Site `cross-site` or `same-site` without an allowed Origin. Requests
    with neither header (curl, SDKs: no ambient browser credentials to abuse) pass, and so do reads."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in STATE_CHANGING:
            return await self.app(scope, receive, send)
        headers = {k: v.decode("latin-1") for k, v in scope["headers"] if k in (b"origin", b"sec-fetch-site", b"host")}
        origin, site = headers.get(b"origin"), headers.get(b"sec-fetch-site", "").lower()
        if origin is None and site not in ("cross-site", "same-site"):
            return await self.app(scope, receive, send)
        allowed = {o.rstrip("/").lower() for o in get_settings().ALLOWED_ORIGINS}
        own = f"{scope.get('scheme', 'http')}://{headers.get(b'host', '')}".lower()
        if origin is not None and origin.rstrip("/").lower() in allowed | {own}:
            return await self.app(scope, receive, send)
        sender = f"Origin '{origin}'" if origin is not None else f"a {site} page (Sec-Fetch-Site)"
        await _send_json(send, 403, f"cross-site request refused: {sender} is not this server's origin; to allow a "
                                    "page there, add its origin to ALLOWED_ORIGINS", scope["path"])


class UnexpectedErrors:
    """An exception no handler took: logged with its traceback, answered 500 {"detail": ...} with
    `Connection: close`, and not passed on. Not passed on, because Starlette and uvicorn would log it
    again with its message, and messages quote what was sent (pydantic's `input_value`, a bug's repr
    of a message). Connection: close, because the connection's state is unknown after a failure:
    a pooled client then opens a fresh one instead of meeting a reset on its next request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            error_log.error("unexpected error on %s %s\n%s", scope["method"], scope["path"], traceback_without_messages(exc))
            if not started:  # else the answer is cut short, which the client sees
                await _send_json(send, 500, f"internal error ({type(exc).__name__}); see the server log", scope["path"])


def traceback_without_messages(exc: BaseException) -> str:
    """The traceback of `exc` and the exceptions it came from: files, lines and types, no messages."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        parts.insert(0, "Traceback (most recent call last):\n" + "".join(traceback.format_tb(exc.__traceback__))
                     + f"{name} (message not logged: it may quote the request)\n")
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return "\nDuring handling of the above exception, another exception occurred:\n\n".join(parts)


async def _send_json(send, status: int, detail: str, path: str) -> None:
    """FastAPI's error shape, or under /v1 OpenAI's (openai_compat.error_response's, before any app runs)."""
    error = {"message": detail, "type": "server_error" if status >= 500 else "invalid_request_error", "param": None,
             "code": None}
    body = json.dumps({"error": error} if path == "/v1" or path.startswith("/v1/") else {"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AccessLog:
    """One line per request: method, path, status, duration; at debug for reads that succeeded. Never
    bodies or query values, which may hold people's messages."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:  # a read that succeeded is debug (the page polls /health); changes and refusals are info
            level = logging.DEBUG if scope["method"] in ("GET", "HEAD") and status < 400 else logging.INFO
            access_log.log(
                level, "method=%s path=%s status=%d duration_ms=%.1f",
                scope["method"], scope["path"], status, (time.perf_counter() - started) * 1000,
            )
