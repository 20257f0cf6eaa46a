"""The job routes: /train, /jobs (trainings and exports), a job's events (JSON or Server-Sent Events),
cancel and resume.
Knows nothing of how a job runs (jobs.runner) or is stored (jobs.registry)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import Query, Request
from fastapi.responses import StreamingResponse
from fastapi.sse import format_sse_event

import store
import train
from api.deps import (
    BODY_ERRORS,
    ERRORS,
    SettingsDep,
    check_allowed,
    error,
    guarded_router,
    queue_job,
    registry,
)
from errors import Conflict, NotFound, ServiceError
from jobs.registry import FINISHED
from models import (
    EventsQuery,
    JobEventsPublic,
    JobPublic,
    JobsPublic,
    JobsQuery,
    JobStatus,
    TrainCompleted,
    TrainRequest,
)

router = guarded_router()


@router.post(
    "/train",
    response_model=TrainCompleted,
    responses={
        202: {"model": JobPublic, "description": "Queued (without `wait`): poll the job's `url`."},
        403: error("Speaker not in ALLOWED_SPEAKERS."),
        404: error("No stored messages for the speaker: upload first."),
        409: error("The speaker already has a queued or running job."),
        429: error("MAX_QUEUED_JOBS jobs are already queued."),
        503: error("EXECUTOR=ray and the cluster cannot be reached: nothing was queued."),
        500: error("With `wait`: training failed; `detail` says why."),
        **BODY_ERRORS,
    },
)
async def train_speaker(body: TrainRequest, request: Request, settings: SettingsDep):
    """Fine-tune the speaker's LoRA adapter in the background; with `wait`, answer when done."""
    check_allowed(body.speaker, settings)
    stored = await asyncio.to_thread(store.summary, settings.DATA_DIR, body.speaker, settings.STORAGE_LOCK_SECONDS)
    if stored is None or not stored.messages:
        raise NotFound(f"no messages stored for speaker '{body.speaker}'; upload a dialog with POST /upload-text or an export with POST /upload-file first")
    config = await asyncio.to_thread(train.resolve_config, settings, body)
    job = await queue_job(request, body.speaker, config, settings.MAX_QUEUED_JOBS, body.wait)
    if not body.wait:
        return job
    if job.status == JobStatus.cancelled:
        raise Conflict(f"training for {body.speaker} was cancelled (job {job.job_id})")
    if job.status != JobStatus.succeeded:
        raise ServiceError(f"Training failed for {body.speaker} (job {job.job_id}): {job.error}")
    return TrainCompleted(
        message=f"Training completed successfully for {body.speaker}", model_path=job.result["model_path"], job=job
    )


@router.get("/jobs", response_model=JobsPublic, responses=ERRORS)
def list_jobs(request: Request, query: Annotated[JobsQuery, Query()]) -> JobsPublic:
    """Jobs (trainings and exports), newest first, optionally filtered by speaker, status and kind."""
    data, count = registry(request).list(query.speaker, query.status, query.limit, query.offset, query.kind)
    return JobsPublic(data=data, count=count)


@router.get("/jobs/{job_id}", response_model=JobPublic, responses={404: error("No such job.")})
def get_job(job_id: str, request: Request) -> JobPublic:
    """One job (a training or an export): its state, progress, and its result or error."""
    return registry(request).get(job_id)


EVENTS_POLL_S = 0.5  # how often a stream looks for new events in the registry
MAX_EVENT_ID = 2**62  # as EventsQuery.after; SQLite integers end at 2**63 - 1
KEEPALIVE_S = 15.0  # an SSE comment line this often keeps proxies from closing an idle stream


def last_event_id(header: str) -> int:
    """A Last-Event-ID the registry can look up (ASCII digits, at most MAX_EVENT_ID); else 0, ignored."""
    return int(header) if header.isascii() and header.isdigit() and len(header) <= 19 and int(header) <= MAX_EVENT_ID else 0


@router.get(
    "/jobs/{job_id}/events",
    response_model=JobEventsPublic,
    responses={
        200: {
            "description": "With `stream=true` (default) a `text/event-stream` that ends when the job ends; "
            "with `stream=false` the events so far as JSON.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        404: error("No such job."),
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
    after = max(after, last_event_id(request.headers.get("last-event-id", "")))

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


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobPublic,
    responses={404: error("No such job."), 409: error("The job has already finished.")},
)
def cancel_job(job_id: str, request: Request) -> JobPublic:
    """Cancel a job: a queued one at once, a running training at its next step (the old adapter stays), a
    running export at once (the previous export stays)."""
    return registry(request).cancel(job_id)


@router.post(
    "/jobs/{job_id}/resume",
    status_code=202,
    response_model=JobPublic,
    responses={404: error("No such job."), 409: error("Not failed/cancelled, no checkpoint, or the speaker is busy."),
               503: error("EXECUTOR=ray and the cluster cannot be reached.")},
)
def resume_job(job_id: str, request: Request) -> JobPublic:
    """Queue a failed or cancelled job again; it continues from its last checkpoint."""
    request.app.state.runner.check_available()  # 503 while the cluster cannot be reached
    job = registry(request).resume(job_id)
    request.app.state.runner.submit(job.job_id)
    return job


