"""What every router shares: the settings and registry dependencies, the API key check, the documented
error answers, and the speaker allow-list. Knows nothing of the routes that use them."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from config import Settings, get_settings
from errors import Forbidden, Unauthorized
from models import ErrorPublic
from registry import JobRegistry

SettingsDep = Annotated[Settings, Depends(get_settings)]
ERRORS = {422: {"description": "Invalid request: `detail` lists each problem with its location."}}
BODY_ERRORS = {
    400: {"model": ErrorPublic, "description": "The body could not be read (not UTF-8)."},
    413: {"model": ErrorPublic, "description": "Request body over MAX_BODY_BYTES."},
    **ERRORS,
}


def error(description: str) -> dict:
    """An answer for a route's `responses`: the one error shape, with what the status means there."""
    return {"model": ErrorPublic, "description": description}


bearer = HTTPBearer(auto_error=False, description="The server's API_KEY, when one is set.")


def require_api_key(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> None:
    """With API_KEY set, every endpoint but /health needs `Authorization: Bearer <API_KEY>`."""
    if settings.API_KEY is None:
        return
    given = credentials.credentials.encode() if credentials else b""
    if not secrets.compare_digest(given, settings.API_KEY.get_secret_value().encode()):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <API_KEY>'")


def guarded_router() -> APIRouter:
    """A router whose every route needs the API key when one is set."""
    return APIRouter(
        dependencies=[Depends(require_api_key)],
        responses={401: {"model": ErrorPublic, "description": "API_KEY is set and the request did not send it."}},
    )


def registry(request: Request) -> JobRegistry:
    return request.app.state.registry


def check_allowed(speaker: str, settings: Settings) -> None:
    if settings.ALLOWED_SPEAKERS and speaker not in settings.ALLOWED_SPEAKERS:
        raise Forbidden(f"speaker '{speaker}' is not in ALLOWED_SPEAKERS ({', '.join(settings.ALLOWED_SPEAKERS)})")
