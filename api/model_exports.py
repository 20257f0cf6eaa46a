"""The model export routes: queue a speaker's merged-model or GGUF export as a job (run by jobs.runner
in a child process, so the API process never imports torch), and download either as a zip. Knows
nothing of how an export is made (lm/export.py) or how a job runs."""

from __future__ import annotations

import asyncio
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated

from fastapi import Query, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from api.deps import (
    ERRORS,
    SettingsDep,
    check_allowed,
    error,
    guarded_router,
    queue_job,
)
from config import Settings
from errors import Conflict, NotFound, ServiceError
from lm import adapters
from lm import export as model_export
from models import (
    ExportConfig,
    ExportKind,
    ExportPublic,
    ExportQuery,
    JobPublic,
    JobStatus,
    SpeakerName,
)

router = guarded_router()


def public(settings: Settings, speaker: str, kind: str) -> ExportPublic | None:
    found = model_export.info(settings.EXPORTS_DIR, speaker, kind)
    if found is None:
        return None
    folder = model_export.export_dir(settings.EXPORTS_DIR, speaker, kind)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return ExportPublic(speaker=speaker, kind=kind, files=files, created_at=datetime.fromisoformat(found["created_at"]),
                        seconds=found["seconds"], url=f"/speakers/{speaker}/exports/{kind}")


@router.post(
    "/speakers/{speaker}/exports/{kind}",
    response_model=ExportPublic,
    responses={
        202: {"model": JobPublic, "description": "Queued (without `wait`): the export job; follow its `url` or its events."},
        403: error("Speaker not in ALLOWED_SPEAKERS."), 404: error("The speaker has no adapter."),
        409: error("The speaker already has a queued or running job (a training or an export); or, with `wait`, "
                   "the export was cancelled."),
        429: error("MAX_QUEUED_JOBS jobs are already queued."),
        503: error("EXECUTOR=ray and the cluster cannot be reached: nothing was queued."),
        500: error("With `wait`: the export failed; `detail` says why."), **ERRORS,
    },
)
async def make_export(speaker: SpeakerName, kind: ExportKind, request: Request, settings: SettingsDep,
                      query: Annotated[ExportQuery, Query()]):
    """Export the speaker's adapter as a merged transformers model or as GGUF for llama.cpp and Ollama: a job
    (progress, events, cancel as for training) that takes minutes; with `wait`, answer when it is done."""
    check_allowed(speaker, settings)
    if adapters.info(settings.OUTPUT_DIR, speaker) is None:
        raise NotFound(f"no adapter for speaker '{speaker}'; train one with POST /train")
    config = ExportConfig(export=kind, dtype=query.dtype)
    job = await queue_job(request, speaker, config, settings.MAX_QUEUED_JOBS, query.wait, kind=f"export_{kind}")
    if not query.wait:
        return job
    if job.status == JobStatus.cancelled:
        raise Conflict(f"the {kind} export of '{speaker}' was cancelled (job {job.job_id})")
    if job.status != JobStatus.succeeded:
        raise ServiceError(f"{job.error} (job {job.job_id})")
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
