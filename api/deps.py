"""What every router shares: the services on `app.state` (opened at start-up, closed at shutdown: the
job registry and runner, the persona engine, the generation queue, the base model's warm-up), the
settings and registry dependencies, the API key check, the documented error answers and the speaker
allow-list. Knows nothing of the routes that use them."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

import memory
import store
from config import Settings, get_settings
from errors import Forbidden, ServiceUnavailable, Unauthorized
from jobs.registry import JobRegistry
from jobs.cluster import open_runner
from lm import adapters, base_model
from lm import export as model_export
from lm.infer import PersonaEngine
from models import ErrorPublic

log = logging.getLogger("persona_lora")

SettingsDep = Annotated[Settings, Depends(get_settings)]
ERRORS = {422: {"description": "Invalid request: `detail` lists each problem with its location."}}
BODY_ERRORS = {
    400: {"model": ErrorPublic, "description": "The body could not be read (not UTF-8)."},
    413: {"model": ErrorPublic, "description": "Request body over MAX_BODY_BYTES."},
    **ERRORS,
}


ADAPTER_DAMAGED = ("The speaker's adapter folder is damaged (a truncated adapter_model.safetensors, no adapter_config.json): "
                   "`detail` names it; train it again with POST /train, or delete the folder.")
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
GENERATION_BUSY = ("Generation is busy (GENERATION_WORKERS running, GENERATION_QUEUE waiting), or the base model is being "
        "provisioned: retry after Retry-After seconds.")


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


async def queue_job(request: Request, speaker: str, config, max_queued: int, wait: bool, kind: str = "train"):
    """Queue a job and hand it to the runner: without `wait`, a 202 answer with the job and its Location;
    with `wait`, the job as it finished (any status: the route says what a failure means). The registry is
    called on a thread: a database another process holds locked made /health wait for it too."""
    await asyncio.to_thread(request.app.state.runner.check_available)  # 503 while the cluster cannot be reached
    job = await asyncio.to_thread(registry(request).create, speaker, config, max_queued, kind=kind)
    future = request.app.state.runner.submit(job.job_id)
    if not wait:
        return JSONResponse(status_code=202, content=jsonable_encoder(job), headers={"Location": job.url})
    await asyncio.wrap_future(future)
    return await asyncio.to_thread(registry(request).get, job.job_id)


def check_allowed(speaker: str, settings: Settings) -> None:
    if settings.ALLOWED_SPEAKERS and speaker not in settings.ALLOWED_SPEAKERS:
        raise Forbidden(f"speaker '{speaker}' is not in ALLOWED_SPEAKERS ({', '.join(settings.ALLOWED_SPEAKERS)})")


class GenerationGate:
    """Generation's own bounded queue: `workers` requests generate at once, on threads of their own
    (the default pool stays free for the job and data endpoints: with generation on it, 9 queued
    generations of 3 s held GET /jobs/{id}/events for 2 s), and at most `queue` more wait; beyond
    that, 503 with Retry-After at once. A request holds its slot for all its work (n choices, a whole
    stream). Used from the event loop only, so the counts need no lock."""

    def __init__(self, workers: int, queue: int):
        self.workers, self.queue, self.admitted = workers, queue, 0
        self._slots = asyncio.Semaphore(workers)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="generation")
        self._mean_s = 5.0  # a slot's hold time, learned as requests finish; 5 s before the first

    async def enter(self) -> float:
        """Take a slot, waiting in the queue, and say when it was taken; 503 when the queue is full."""
        if self.admitted >= self.workers + self.queue:
            running = min(self.admitted, self.workers)
            retry = max(1, math.ceil(self._mean_s * self.admitted / self.workers))
            raise ServiceUnavailable(
                f"generation is busy: {running} running and {self.admitted - running} waiting (GENERATION_WORKERS="
                f"{self.workers}, GENERATION_QUEUE={self.queue}); retry after the Retry-After seconds", retry)
        self.admitted += 1
        try:
            await self._slots.acquire()
        except BaseException:
            self.admitted -= 1
            raise
        return time.monotonic()

    def leave(self, started: float) -> None:
        """Give back the slot taken at `started` (what enter returned)."""
        self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - started)
        self.admitted -= 1
        self._slots.release()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[GenerationGate]:
        started = await self.enter()
        try:
            yield self
        finally:
            self.leave(started)

    async def run(self, fn, *args):
        """fn(*args) on a generation thread (call it holding a slot)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


PROVISIONING_RETRY_S = 30  # provisioning the default model takes about a minute


def base_ready(request: Request):
    """The warmed base (base_model.Warmup); 503 with Retry-After while it is being provisioned, so no
    request waits a minute for it. A failed warm-up lets the request try again (and say why it cannot)."""
    warmup = request.app.state.warmup
    if warmup.state == "provisioning":
        raise ServiceUnavailable(f"the base model {warmup.base_model!r} is being provisioned (the first start takes "
                                 "about a minute); retry after the Retry-After seconds", PROVISIONING_RETRY_S)
    return warmup


def generation(request: Request) -> GenerationGate:
    """The generation queue, once the base model is there to generate with."""
    base_ready(request)
    return request.app.state.generation


def open_services(app, settings: Settings) -> None:
    """Start-up: the folders, what interrupted runs left removed, the registry with its interrupted jobs
    queued again (or, on a cluster, followed again), the runner, the persona engine, the generation queue and the base model's warm-up."""
    for folder in (settings.DATA_DIR, settings.OUTPUT_DIR, settings.MODELS_DIR):
        folder.mkdir(parents=True, exist_ok=True)
    adapters.clean_stale(settings.OUTPUT_DIR)
    if stale := store.clean_temporaries(settings.DATA_DIR):
        log.info("removed %d temporary messages files left by interrupted writes", len(stale))
    if stale := memory.clean_orphans(settings.DATA_DIR):
        log.info("removed %d memory indexes whose messages were deleted", len(stale))
    if stale := model_export.discard_partial(settings.EXPORTS_DIR):
        log.info("removed %d half-made exports left by an interrupted server", len(stale))
    jobs = JobRegistry(settings.db_path, replace_damaged=True)
    runner = open_runner(jobs, settings)
    runner.recover()
    app.state.registry, app.state.runner = jobs, runner
    app.state.engine = PersonaEngine(settings.BASE_MODEL, settings.MODELS_DIR, settings.OUTPUT_DIR, settings.DEVICE,
                                     settings.LOAD_IN_8BIT, settings.ADAPTER_CACHE_SIZE)
    app.state.generation = GenerationGate(settings.GENERATION_WORKERS, settings.GENERATION_QUEUE)
    app.state.warmup = base_model.Warmup(settings.BASE_MODEL, settings.MODELS_DIR).start()


async def close_services(app) -> None:
    """Shutdown: no new generation; running jobs' children are stopped (their jobs resume at the next start)."""
    app.state.generation.shutdown()
    await asyncio.to_thread(app.state.runner.shutdown)
