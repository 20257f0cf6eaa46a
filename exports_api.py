"""The model export routes: make a speaker's merged model or GGUF export (model_export.py, run as its CLI
in a child process, so the API process never imports torch), and download either as a zip. Knows
nothing of how an export is made."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

import adapters
import model_export
from config import Settings
from deps import ERRORS, SettingsDep, check_allowed, error, guarded_router
from errors import NotFound, ServiceError
from models import ExportKind, ExportPublic, SpeakerName

router = guarded_router()
ROOT = Path(__file__).resolve().parent
ERROR_TAIL_CHARS = 2000  # the end of a failed export's log, for the answer's detail


def public(settings: Settings, speaker: str, kind: str) -> ExportPublic | None:
    found = model_export.info(settings.EXPORTS_DIR, speaker, kind)
    if found is None:
        return None
    folder = model_export.export_dir(settings.EXPORTS_DIR, speaker, kind)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return ExportPublic(speaker=speaker, kind=kind, files=files, created_at=datetime.fromisoformat(found["created_at"]),
                        seconds=found["seconds"], url=f"/speakers/{speaker}/exports/{kind}")


async def run_export(settings: Settings, speaker: str, kind: str) -> None:
    """`python model_export.py KIND SPEAKER` with this server's folders; ServiceError with its log's end on failure."""
    env = {**os.environ, "BASE_MODEL": settings.BASE_MODEL, "OUTPUT_DIR": str(settings.OUTPUT_DIR),
           "MODELS_DIR": str(settings.MODELS_DIR), "EXPORTS_DIR": str(settings.EXPORTS_DIR)}
    proc = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "model_export.py"), kind, speaker, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await proc.communicate()
    except asyncio.CancelledError:  # the server is stopping: no export outlives it half-written
        proc.kill()
        raise
    if proc.returncode:
        raise ServiceError(f"the {kind} export of '{speaker}' failed (exit {proc.returncode}): "
                           f"{output.decode(errors='replace')[-ERROR_TAIL_CHARS:]}")


@router.post(
    "/speakers/{speaker}/exports/{kind}",
    response_model=ExportPublic,
    responses={403: error("Speaker not in ALLOWED_SPEAKERS."), 404: error("The speaker has no adapter."),
               500: error("The export failed; `detail` ends with its log."), **ERRORS},
)
async def make_export(speaker: SpeakerName, kind: ExportKind, settings: SettingsDep) -> ExportPublic:
    """Export the speaker's adapter as a merged transformers model or as GGUF for llama.cpp and Ollama (minutes)."""
    check_allowed(speaker, settings)
    if adapters.info(settings.OUTPUT_DIR, speaker) is None:
        raise NotFound(f"no adapter for speaker '{speaker}'; train one with POST /train")
    await run_export(settings, speaker, kind)
    return await asyncio.to_thread(public, settings, speaker, kind)


@router.get(
    "/speakers/{speaker}/exports/{kind}",
    response_class=FileResponse,
    responses={200: {"content": {"application/zip": {}}, "description": "The export's folder, zipped."},
               404: error("No such export: POST to this path makes it."), **ERRORS},
)
async def download_export(speaker: SpeakerName, kind: ExportKind, settings: SettingsDep) -> FileResponse:
    """The speaker's export as a zip (the merged model folder, or the GGUF files and Modelfile)."""
    handle, name = tempfile.mkstemp(prefix=f"export-{kind}-", suffix=".zip")
    os.close(handle)
    path = await asyncio.to_thread(model_export.archive, settings.EXPORTS_DIR, speaker, kind, Path(name))
    if path is None:
        os.unlink(name)
        raise NotFound(f"no {kind} export for speaker '{speaker}'; make one with POST /speakers/{speaker}/exports/{kind}")
    return FileResponse(path, media_type="application/zip", filename=f"{speaker}-{kind}.zip",
                        background=BackgroundTask(path.unlink, missing_ok=True))
