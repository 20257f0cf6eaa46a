"""The page for people at `/`: static/index.html with its script and style sheet, served as they are
(no build step, nothing fetched from elsewhere: it works offline). The page holds no data and needs no
API key; everything it shows it asks the public API for, with the key the person enters, through the
same key and origin checks as any client. Knows nothing of the API's routes or storage."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static"
# Only this server's own script, styles, API and images (the loss plot is fetched with the key, shown as a blob:
# URL); no inline script, so a message that slipped into the page as markup could not run.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' blob:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

router = APIRouter(include_in_schema=False)
assets = StaticFiles(directory=STATIC)


@router.get("/")
def index() -> FileResponse:
    """The page: speakers, import, training, evaluation and chat, over the public API."""
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})
