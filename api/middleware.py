"""ASGI middleware of the service: the allowed hosts, cross-site refusal, the request body limit, the
access log, unexpected errors.

Both are plain ASGI (no BaseHTTPMiddleware) so that streaming responses, such as a job's event
stream, pass through untouched.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from urllib.parse import urlsplit

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


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class AllowedHosts:
    """400 for a request whose Host is not a name the server is meant to be reached by: localhost,
    127.0.0.1, [::1], the address the connection came to (the bound one) and ALLOWED_HOSTS (exact, or
    '*.domain' for its subdomains, as Starlette's TrustedHostMiddleware matches; '*' for any). A page
    on a name its owner rebound to 127.0.0.1 sends its own name as Host and as Origin, which
    CrossSiteGuard takes for the server's own: this check comes first. A request without Host
    (HTTP/1.0) passes: a browser always sends one. Not TrustedHostMiddleware itself: it answers plain
    text that does not say what to fix, and fixes its list at start-up while settings are read per
    request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"host")
        host = _hostname(sent.decode("latin-1")) if sent is not None else None
        if sent is None or self._allowed(host, scope):
            return await self.app(scope, receive, send)
        shown = host if host is not None else sent.decode("latin-1")
        await _send_json(send, 400, f"host '{shown}' is not a name this server is reached by: allowed are localhost, "
                                    "127.0.0.1, [::1], the address it is bound to and ALLOWED_HOSTS; to serve it under "
                                    "this name, add it to ALLOWED_HOSTS", scope["path"])

    @staticmethod
    def _allowed(host: str | None, scope) -> bool:
        if host is None:
            return False
        bound = (scope.get("server") or ("",))[0] or ""
        patterns = {*LOOPBACK_HOSTS, bound.lower(), *(_hostname(p) or p.lower() for p in get_settings().ALLOWED_HOSTS)}
        return "*" in patterns or any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in patterns)


def _hostname(netloc: str) -> str | None:
    """The host of a Host header ('[::1]:8000' → '::1'), lower-cased; None when it cannot be one."""
    try:
        split = urlsplit(f"//{netloc}")
        split.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        return None
    return split.hostname


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
