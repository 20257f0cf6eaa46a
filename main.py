"""persona-lora: upload dialogs, train a LoRA adapter per speaker. Run with `fastapi dev main.py`."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from typing import Annotated

import secrets

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import format_sse_event

import parser as dialog_parser
import train
from config import Settings, get_settings
from errors import Conflict, Forbidden, NotFound, ServiceError, Unauthorized
from jobs import FINISHED, JobRegistry, JobRunner, display_path
from middleware import AccessLog, BodyLimit
from models import (
    ErrorPublic,
    EventsQuery,
    HealthPublic,
    JobsQuery,
    JobEventsPublic,
    JobPublic,
    JobsPublic,
    JobStatus,
    TrainCompleted,
    TrainRequest,
    UploadTextRequest,
    UploadTextResponse,
)

log = logging.getLogger("persona_lora")


@asynccontextmanager
async def lifespan(app: FastAPI):
    if not logging.getLogger().handlers:  # under `fastapi dev` / uvicorn, show the service's own log lines
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    for folder in (settings.DATA_DIR, settings.OUTPUT_DIR, settings.MODELS_DIR):
        folder.mkdir(parents=True, exist_ok=True)
    train.clean_stale_outputs(settings.OUTPUT_DIR)
    registry = JobRegistry(settings.db_path)
    runner = JobRunner(registry, settings)
    for job_id in registry.recover():
        runner.submit(job_id)
    app.state.registry, app.state.runner = registry, runner
    yield
    await asyncio.to_thread(runner.shutdown)


app = FastAPI(
    title="persona-lora",
    summary="Turn chat dialogs into a per-speaker LoRA adapter.",
    description=(
        "Upload dialogs with **POST /upload-text**, then train a speaker's adapter with **POST /train**. "
        "Training runs in the background; poll **GET /jobs/{job_id}**."
    ),
    version="0.1.0",
    lifespan=lifespan,
)
app.add_middleware(BodyLimit)
app.add_middleware(AccessLog)

SettingsDep = Annotated[Settings, Depends(get_settings)]
ERRORS = {422: {"description": "Invalid request: `detail` lists each problem with its location."}}
BODY_ERRORS = {
    400: {"model": ErrorPublic, "description": "The body could not be read (not UTF-8)."},
    413: {"model": ErrorPublic, "description": "Request body over MAX_BODY_BYTES."},
    **ERRORS,
}


def _error(description: str) -> dict:
    return {"model": ErrorPublic, "description": description}


@app.exception_handler(ServiceError)
async def service_error_handler(request: Request, exc: ServiceError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return JSONResponse(status_code=exc.status, content={"detail": exc.detail}, headers=headers)


@app.exception_handler(Exception)
async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse(status_code=500, content={"detail": f"internal error ({type(exc).__name__}); see the server log"})


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


api = APIRouter(
    dependencies=[Depends(require_api_key)],
    responses={401: {"model": ErrorPublic, "description": "API_KEY is set and the request did not send it."}},
)


def registry(request: Request) -> JobRegistry:
    return request.app.state.registry


def check_allowed(speaker: str, settings: Settings) -> None:
    if settings.ALLOWED_SPEAKERS and speaker not in settings.ALLOWED_SPEAKERS:
        raise Forbidden(f"speaker '{speaker}' is not in ALLOWED_SPEAKERS ({', '.join(settings.ALLOWED_SPEAKERS)})")


def check_limits(body: UploadTextRequest, settings: Settings) -> None:
    """The operator's limits (settings), when lower than the schema's own bounds; 422 like the schema."""
    problems = []
    if len(body.dialog) > settings.MAX_DIALOG_MESSAGES:
        problems.append({"type": "too_long", "loc": ("body", "dialog"), "input": None,
                         "msg": f"List should have at most {settings.MAX_DIALOG_MESSAGES} items (MAX_DIALOG_MESSAGES)"})
    for i, turn in enumerate(body.dialog):
        if len(turn.content) > settings.MAX_MESSAGE_CHARS:
            problems.append({"type": "string_too_long", "loc": ("body", "dialog", i, "content"), "input": None,
                             "msg": f"String should have at most {settings.MAX_MESSAGE_CHARS} characters (MAX_MESSAGE_CHARS)"})
    if problems:
        raise RequestValidationError(problems)


@app.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/docs")


@app.get("/health", response_model=HealthPublic)
def health(request: Request) -> HealthPublic:
    """Liveness, with the number of running and queued jobs."""
    counts = registry(request).counts()
    return HealthPublic(jobs_running=counts.get("running", 0), jobs_queued=counts.get("queued", 0))


@api.post(
    "/upload-text",
    response_model=UploadTextResponse,
    responses={
        403: _error("Speaker not in ALLOWED_SPEAKERS."),
        500: _error("Stored data unreadable or unwritable; nothing changed."),
        507: _error("Disk full; nothing changed."),
        **BODY_ERRORS,
    },
)
def upload_text(body: UploadTextRequest, settings: SettingsDep) -> UploadTextResponse:
    """Store the speaker's messages from a dialog, each with the turns it answered (appends, deduplicates)."""
    check_limits(body, settings)
    check_allowed(body.speaker, settings)
    samples, empty = dialog_parser.build_samples(body.dialog, body.speaker, settings.MAX_CONTEXT_TURNS)
    result = dialog_parser.append_samples(settings.DATA_DIR, body.speaker, samples)
    return UploadTextResponse(
        message=f"Successfully saved messages for {body.speaker}",
        filepath=display_path(result.path),
        speaker=body.speaker,
        added=result.added,
        duplicates=result.duplicates,
        skipped_empty=empty,
        total=result.total,
    )


@api.post(
    "/train",
    response_model=TrainCompleted,
    responses={
        202: {"model": JobPublic, "description": "Queued (without `wait`): poll the job's `url`."},
        403: _error("Speaker not in ALLOWED_SPEAKERS."),
        404: _error("No stored messages for the speaker: upload first."),
        409: _error("The speaker already has a queued or running job."),
        429: _error("MAX_QUEUED_JOBS jobs are already queued."),
        500: _error("With `wait`: training failed; `detail` says why."),
        **BODY_ERRORS,
    },
)
async def train_speaker(body: TrainRequest, request: Request, settings: SettingsDep):
    """Fine-tune the speaker's LoRA adapter in the background; with `wait`, answer when done."""
    check_allowed(body.speaker, settings)
    stored = await asyncio.to_thread(dialog_parser.load_speaker, settings.DATA_DIR, body.speaker)
    if stored is None or not stored.messages:
        raise NotFound(f"no messages stored for speaker '{body.speaker}'; upload a dialog with POST /upload-text first")
    config = await asyncio.to_thread(train.resolve_config, settings, body)
    job = registry(request).create(body.speaker, config, settings.MAX_QUEUED_JOBS)
    future = request.app.state.runner.submit(job.job_id)
    if not body.wait:
        return JSONResponse(status_code=202, content=jsonable_encoder(job), headers={"Location": job.url})
    await asyncio.wrap_future(future)
    job = registry(request).get(job.job_id)
    if job.status == JobStatus.cancelled:
        raise Conflict(f"training for {body.speaker} was cancelled (job {job.job_id})")
    if job.status != JobStatus.succeeded:
        raise ServiceError(f"Training failed for {body.speaker} (job {job.job_id}): {job.error}")
    return TrainCompleted(
        message=f"Training completed successfully for {body.speaker}", model_path=job.result["model_path"], job=job
    )


@api.get("/jobs", response_model=JobsPublic, responses=ERRORS)
def list_jobs(request: Request, query: Annotated[JobsQuery, Query()]) -> JobsPublic:
    """Training jobs, newest first, optionally filtered by speaker and status."""
    data, count = registry(request).list(query.speaker, query.status, query.limit, query.offset)
    return JobsPublic(data=data, count=count)


@api.get("/jobs/{job_id}", response_model=JobPublic, responses={404: _error("No such job.")})
def get_job(job_id: str, request: Request) -> JobPublic:
    """One training job: its state, and its result or error."""
    return registry(request).get(job_id)


EVENTS_POLL_S = 0.5  # how often a stream looks for new events in the registry
KEEPALIVE_S = 15.0  # an SSE comment line this often keeps proxies from closing an idle stream


@api.get(
    "/jobs/{job_id}/events",
    response_model=JobEventsPublic,
    responses={
        200: {
            "description": "With `stream=true` (default) a `text/event-stream` that ends when the job ends; "
            "with `stream=false` the events so far as JSON.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        404: _error("No such job."),
        **ERRORS,
    },
)
async def job_events(job_id: str, request: Request, query: Annotated[EventsQuery, Query()]):
    """A job's events (status changes, progress, log lines, errors), live as Server-Sent Events."""
    reg, stream, after = registry(request), query.stream, query.after
    await asyncio.to_thread(reg.get, job_id)  # 404 before any stream starts
    if not stream:
        events = await asyncio.to_thread(reg.events, job_id, after, 100_000)
        return JobEventsPublic(data=events, count=len(events))
    last = request.headers.get("last-event-id", "")
    after = max(after, int(last) if last.isdigit() else 0)

    async def sse():
        nonlocal after
        idle = 0.0
        while True:
            finished = (await asyncio.to_thread(reg.get, job_id)).status.value in FINISHED
            events = await asyncio.to_thread(reg.events, job_id, after)
            for event in events:
                after = event.id
                yield format_sse_event(data_str=json.dumps(event.data, ensure_ascii=False), event=event.type, id=str(event.id))
            if finished and not events:
                return
            if events:
                idle = 0.0
            elif (idle := idle + EVENTS_POLL_S) >= KEEPALIVE_S:
                idle = 0.0
                yield b": keep-alive\n\n"
            await asyncio.sleep(EVENTS_POLL_S)

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@api.post(
    "/jobs/{job_id}/cancel",
    response_model=JobPublic,
    responses={404: _error("No such job."), 409: _error("The job has already finished.")},
)
def cancel_job(job_id: str, request: Request) -> JobPublic:
    """Cancel a job: a queued one at once, a running one at its next step (the old adapter stays)."""
    return registry(request).cancel(job_id)


@api.post(
    "/jobs/{job_id}/resume",
    status_code=202,
    response_model=JobPublic,
    responses={404: _error("No such job."), 409: _error("Not failed/cancelled, no checkpoint, or the speaker is busy.")},
)
def resume_job(job_id: str, request: Request) -> JobPublic:
    """Queue a failed or cancelled job again; it continues from its last checkpoint."""
    job = registry(request).resume(job_id)
    request.app.state.runner.submit(job.job_id)
    return job


app.include_router(api)
