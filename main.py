"""persona-lora: upload dialogs, train a LoRA adapter per speaker. Run with `fastapi dev main.py`."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Form, Query, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

import adapters
import base_model
import chat_format
import evals
import exports_api
import jobs_api
import model_export
import openai_compat
import page
import parser as dialog_parser
import store
import train
from config import Settings, get_settings
from deps import (BODY_ERRORS, ERRORS, GENERATION_BUSY, RETRY_AFTER, base_ready, GenerationGate, SettingsDep, check_allowed, error,
                  generation, guarded_router, registry, require_api_key)
from errors import (Conflict, NotFound, PayloadTooLarge, ServiceError, Unprocessable,
                    public_errors, scrub)
from exports import ExportError, ExportTooLarge
from infer import AdapterNotFound, PersonaEngine, persona_decoding, sampling
from jobs import JobRunner, delete_job_files, display_path
from registry import KIND_NAMES, JobRegistry
from middleware import AccessLog, BodyLimit, CrossSiteGuard, UnexpectedErrors
from models import (
    DatasetPublic, DatasetQuery, DeletedPublic, DeleteQuery, ExportForm, ExportInspection, GenerateRequest,
    GenerateResponse, HealthPublic, PageQuery, SamplesPublic, SpeakerName, SpeakerPublic, SpeakersPublic, Turn,
    UploadFileForm, UploadFileResponse, UploadTextRequest, UploadTextResponse
)

log = logging.getLogger("persona_lora")


@asynccontextmanager
async def lifespan(app: FastAPI):
    if not logging.getLogger().handlers:  # under `fastapi dev` / uvicorn, show the service's own log lines
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.access").disabled = True  # it logs query strings; AccessLog logs the request without
    settings = get_settings()
    for folder in (settings.DATA_DIR, settings.OUTPUT_DIR, settings.MODELS_DIR):
        folder.mkdir(parents=True, exist_ok=True)
    adapters.clean_stale(settings.OUTPUT_DIR)
    if stale := store.clean_temporaries(settings.DATA_DIR):
        log.info("removed %d temporary messages files left by interrupted writes", len(stale))
    if stale := model_export.discard_partial(settings.EXPORTS_DIR):
        log.info("removed %d half-made exports left by an interrupted server", len(stale))
    registry = JobRegistry(settings.db_path, replace_damaged=True)
    runner = JobRunner(registry, settings)
    for job_id in registry.recover():
        runner.submit(job_id)
    app.state.registry, app.state.runner = registry, runner
    app.state.engine = PersonaEngine(settings.BASE_MODEL, settings.MODELS_DIR, settings.OUTPUT_DIR, settings.DEVICE,
                                     settings.LOAD_IN_8BIT, settings.ADAPTER_CACHE_SIZE)
    app.state.generation = GenerationGate(settings.GENERATION_WORKERS, settings.GENERATION_QUEUE)
    app.state.warmup = base_model.Warmup(settings.BASE_MODEL, settings.MODELS_DIR).start()
    yield
    app.state.generation.shutdown()
    await asyncio.to_thread(runner.shutdown)


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
app.add_middleware(AccessLog)

@app.exception_handler(ServiceError)
async def service_error_handler(request: Request, exc: ServiceError) -> JSONResponse:
    return openai_compat.openai_error(request, exc, exc.headers) or JSONResponse(
        status_code=exc.status, content={"detail": scrub(exc.detail)}, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with each problem's location and message, never the value sent (it may be a person's message);
    under /v1 OpenAI's 400."""
    return openai_compat.openai_error(request, exc) or JSONResponse(status_code=422, content={"detail": public_errors(exc.errors())})


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


api = guarded_router()


def _upload_response(speaker: str, samples, empty: int, settings: Settings) -> dict:
    result = store.append_samples(settings.DATA_DIR, speaker, samples, settings.STORAGE_LOCK_SECONDS)
    return dict(
        message=f"Successfully saved messages for {speaker}", filepath=display_path(result.path), speaker=speaker,
        added=result.added, duplicates=result.duplicates, skipped_empty=empty, total=result.total,
    )


LOCKED = {503: error("The speaker's messages stayed locked by other requests (STORAGE_LOCK_SECONDS); retry after "
                   "`Retry-After` seconds.")}
UPLOAD_ERRORS = {
    403: error("Speaker not in ALLOWED_SPEAKERS."),
    500: error("Stored data unreadable or unwritable; nothing changed."),
    507: error("Disk full; nothing changed."),
    **LOCKED,
    **BODY_ERRORS,
}


@app.get("/health", response_model=HealthPublic)
def health(request: Request) -> HealthPublic:
    """Liveness, with the number of running and queued jobs and the base model's state."""
    counts = registry(request).counts()
    return HealthPublic(jobs_running=counts.get("running", 0), jobs_queued=counts.get("queued", 0),
                        model=request.app.state.warmup.state)


@api.post(
    "/upload-text",
    response_model=UploadTextResponse,
    responses=UPLOAD_ERRORS,
)
def upload_text(body: UploadTextRequest, settings: SettingsDep) -> UploadTextResponse:
    """Store the speaker's messages from a dialog, each with the turns it answered (appends, deduplicates)."""
    if problems := body.over_limits(settings.MAX_DIALOG_MESSAGES, settings.MAX_MESSAGE_CHARS):
        raise RequestValidationError(problems)  # 422 like the schema's own bounds
    check_allowed(body.speaker, settings)
    samples, empty = dialog_parser.build_samples(body.dialog, body.speaker, settings.MAX_CONTEXT_TURNS)
    return UploadTextResponse(**_upload_response(body.speaker, samples, empty, settings))


@api.post(
    "/upload-file",
    response_model=UploadFileResponse,
    responses=UPLOAD_ERRORS,
)
def upload_file(file: UploadFile, form: Annotated[UploadFileForm, Form()], settings: SettingsDep) -> UploadFileResponse:
    """Import a Telegram, WhatsApp, Discord or Messenger/Instagram export (or /upload-text JSON): clean it, keep the speaker's messages."""
    check_allowed(form.speaker, settings)
    try:
        imported = dialog_parser.import_export(
            file.file.read(), file.filename or "", form.speaker, form.format, form.chat, form.aliases or {},
            form, settings.MAX_CONTEXT_TURNS, base_model.tokenizer_file(settings.BASE_MODEL, settings.MODELS_DIR),
            max_unpacked=4 * settings.MAX_UPLOAD_BYTES, phone_region=settings.PHONE_REGION,
        )
    except ExportTooLarge as exc:
        raise PayloadTooLarge(str(exc)) from None
    except (ExportError, dialog_parser.UnknownSpeaker) as exc:
        raise Unprocessable(str(exc)) from None
    warnings = []
    if len(imported.samples) < settings.MIN_SAMPLES:
        warnings.append(f"{form.speaker} has {len(imported.samples)} samples in this export; at least "
                        f"{settings.MIN_SAMPLES} (MIN_SAMPLES) are needed to train well")
    return UploadFileResponse(
        **_upload_response(form.speaker, imported.samples, 0, settings), format=imported.fmt, chats=imported.chats,
        report=imported.report, speakers=imported.speakers, token_counter=imported.token_counter, warnings=warnings,
    )


@api.post("/exports/inspect", response_model=ExportInspection, responses=BODY_ERRORS)
def inspect_export(file: UploadFile, form: Annotated[ExportForm, Form()], settings: SettingsDep) -> ExportInspection:
    """Read an export and say what it holds (format, chats, date range, participants); stores nothing."""
    try:
        return dialog_parser.inspect_export(file.file.read(), file.filename or "", form.format, form.chat,
                                            4 * settings.MAX_UPLOAD_BYTES)
    except ExportTooLarge as exc:
        raise PayloadTooLarge(str(exc)) from None
    except ExportError as exc:
        raise Unprocessable(str(exc)) from None


@api.get("/speakers", response_model=SpeakersPublic, responses=LOCKED)
def list_speakers(settings: SettingsDep) -> SpeakersPublic:
    """Every speaker with stored messages: count, last upload, and their adapter if trained."""
    data = []
    for stored in store.list_speakers(settings.DATA_DIR, settings.STORAGE_LOCK_SECONDS):
        info = adapters.info(settings.OUTPUT_DIR, stored.speaker)
        data.append(SpeakerPublic(  # a damaged file (a DamagedFile) has no messages, only an error
            speaker=stored.speaker, messages=getattr(stored, "messages", 0), last_upload=getattr(stored, "last_upload", None),
            adapter=info is not None, trained_at=info.get("created_at") if info else None, error=getattr(stored, "error", None),
        ))
    return SpeakersPublic(data=data, count=len(data))


def _stored(settings: Settings, speaker: str, offset: int, limit: int) -> tuple[list, int]:
    """Samples offset..offset+limit of the speaker and their count; 404 when nothing is stored."""
    found = store.read_messages(settings.DATA_DIR, speaker, offset, limit, settings.STORAGE_LOCK_SECONDS)
    if found is None:
        raise NotFound(f"no messages stored for speaker '{speaker}'")
    return found


@api.get("/speakers/{speaker}/messages", response_model=SamplesPublic,
         responses={404: error("Nothing stored."), **LOCKED, **ERRORS})
def speaker_messages(speaker: SpeakerName, settings: SettingsDep, page: Annotated[PageQuery, Query()]) -> SamplesPublic:
    """The speaker's stored messages with their context, oldest first."""
    samples, count = _stored(settings, speaker, page.offset, page.limit)
    return SamplesPublic(data=samples, count=count)


@api.get(
    "/speakers/{speaker}/dataset",
    response_model=DatasetPublic,
    responses={404: error("Nothing stored."), 500: error("The base model could not be loaded."),
               503: {**error("The speaker's messages stayed locked by other requests (STORAGE_LOCK_SECONDS), or the base "
                             "model is being provisioned: retry after Retry-After seconds."), "headers": RETRY_AFTER},
               **ERRORS},
)
def speaker_dataset(speaker: SpeakerName, request: Request, settings: SettingsDep,
                    query: Annotated[DatasetQuery, Query()]) -> DatasetPublic:
    """The first samples exactly as training renders them (chat template applied, trained span marked)."""
    samples, count = _stored(settings, speaker, 0, query.limit)
    warm = base_ready(request)
    try:
        rendered = train.render_dataset(samples, speaker, settings.BASE_MODEL, settings.MODELS_DIR,
                                        settings.MAX_SEQ_LENGTH, warm.tokenizer)
    except (OSError, ValueError) as exc:
        raise ServiceError(f"could not load the tokenizer of base model {settings.BASE_MODEL!r}: {exc}") from None
    return DatasetPublic(**rendered, count=count)


@api.delete(
    "/speakers/{speaker}",
    response_model=DeletedPublic,
    responses={404: error("Nothing stored for the speaker."), 409: error("The speaker has a training or export job queued or running."), **LOCKED, **ERRORS},
)
def delete_speaker(
    speaker: SpeakerName, request: Request, settings: SettingsDep, query: Annotated[DeleteQuery, Query()]
) -> DeletedPublic:
    """Delete every file that holds the speaker's messages (their file and its temporaries, the evaluation,
    job checkpoints and logs) and, unless keep_adapter, their adapter and its exports; says what it removed."""
    active = registry(request).active_for(speaker)
    if active:
        raise Conflict(f"speaker '{speaker}' has a {KIND_NAMES[active.kind]} job running or queued ({active.job_id}); "
                       "cancel it or wait, then delete")
    temporaries = store.clean_temporaries(settings.DATA_DIR, speaker)  # first: delete_speaker removes the lock
    deleted = [*store.delete_speaker(settings.DATA_DIR, speaker, settings.STORAGE_LOCK_SECONDS), *temporaries,
               *([adapters.delete(settings.OUTPUT_DIR, speaker), model_export.delete(settings.EXPORTS_DIR, speaker)]
                 if not query.keep_adapter else [evals.delete_report(settings, speaker)])]  # eval.json quotes held-out messages
    for job in registry(request).list(speaker=speaker, limit=10_000)[0]:  # checkpoints hold a copy of the samples
        removed = delete_job_files(settings, job.job_id)
        if removed or job.checkpoint:
            registry(request).clear_checkpoint(job.job_id)
        deleted += removed
    deleted = [display_path(p) for p in deleted if p]
    if not deleted:
        raise NotFound(f"nothing stored for speaker '{speaker}'")
    return DeletedPublic(message=f"Deleted the data of {speaker}", deleted=deleted)


@api.post(
    "/generate",
    response_model=GenerateResponse,
    responses={404: error("The speaker has no trained adapter."), 503: {**error(GENERATION_BUSY), "headers": RETRY_AFTER}, **BODY_ERRORS},
)
async def generate(body: GenerateRequest, request: Request, settings: SettingsDep) -> GenerateResponse:
    """The reply the speaker would write next, from their adapter on the base model."""
    turns = body.messages if body.messages is not None else [Turn(speaker="user", content=body.prompt)]
    decoding = persona_decoding(settings, [*turns, Turn(speaker=body.speaker, content="")], **sampling(body),
                                max_new_tokens=body.max_new_tokens)
    if adapters.info(settings.OUTPUT_DIR, body.speaker) is None:  # a 404 before any 503 of a busy or warming base
        raise NotFound(f"no adapter for speaker '{body.speaker}'; train one with POST /train")
    try:
        async with generation(request).slot() as gate:
            out = await gate.run(request.app.state.engine.generate, body.speaker, chat_format.to_messages(turns, body.speaker),
                                 decoding)
    except AdapterNotFound:
        raise NotFound(f"no adapter for speaker '{body.speaker}'; train one with POST /train") from None
    return GenerateResponse(speaker=body.speaker, reply=out.text, prompt_tokens=out.prompt_tokens,
                            completion_tokens=out.completion_tokens, finish_reason=out.finish_reason)


@api.get("/speakers/{speaker}/evaluation", responses={404: error("No evaluation for the speaker.")})
def speaker_evaluation(speaker: SpeakerName, settings: SettingsDep) -> dict:
    """The adapter's latest evaluation report (eval.json)."""
    report = evals.read_report(settings, speaker)
    if report is None:
        raise NotFound(f"no evaluation for speaker '{speaker}'; train an adapter, or POST /speakers/{speaker}/evaluate")
    return report


@api.post(
    "/speakers/{speaker}/evaluate",
    responses={404: error("The speaker has no adapter."), 409: error("Training, or the adapter deleted meanwhile."),
               503: {**error(GENERATION_BUSY), "headers": RETRY_AFTER}},
)
async def evaluate_speaker(speaker: SpeakerName, request: Request, settings: SettingsDep) -> dict:
    """Evaluate the speaker's adapter now on its held-out samples; returns and stores the report."""
    active = registry(request).active_for(speaker)
    if active and active.kind == "train":  # an export only reads the adapter, as the evaluation does
        raise Conflict(f"speaker '{speaker}' is training (job {active.job_id}); evaluate when it has finished")
    if adapters.info(settings.OUTPUT_DIR, speaker) is None:  # a 404 before any 503 of a busy or warming base
        raise NotFound(f"no adapter for speaker '{speaker}'; train one with POST /train")
    try:
        async with generation(request).slot() as gate:
            report = await gate.run(evals.evaluate_speaker, settings, speaker, request.app.state.engine)
    except AdapterNotFound:  # DELETE /speakers/{speaker} or a new training's swap after the check above
        raise Conflict(f"the adapter of speaker '{speaker}' was deleted or replaced during the evaluation; "
                       "evaluate again (train first if it was deleted)") from None
    if report is None:
        raise NotFound(f"no adapter for speaker '{speaker}'; train one with POST /train")
    return report


@api.get(
    "/speakers/{speaker}/loss.png",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}, "description": "Training and held-out loss."},
               404: error("No evaluation for the speaker.")},
)
def speaker_loss_plot(speaker: SpeakerName, settings: SettingsDep) -> FileResponse:
    """The training loss curve with the held-out loss of base and adapter."""
    folder = adapters.folder(settings.OUTPUT_DIR, speaker)
    path = folder / evals.PLOT_FILE if folder else None
    if path is None or not path.is_file():
        raise NotFound(f"no loss plot for speaker '{speaker}'; it is drawn when an adapter is evaluated")
    return FileResponse(path, media_type="image/png")


@api.get(
    "/speakers/{speaker}/adapter",
    response_class=FileResponse,
    responses={200: {"content": {"application/zip": {}}, "description": "The adapter folder, zipped."},
               404: error("The speaker has no adapter.")},
)
def download_adapter(speaker: SpeakerName, settings: SettingsDep) -> FileResponse:
    """The speaker's adapter as a zip: PEFT's files, the tokenizer and training_info.json (not the evaluation, which quotes messages)."""
    path = adapters.archive(settings.OUTPUT_DIR, speaker, exclude={evals.EVAL_FILE, evals.PLOT_FILE})
    if path is None:
        raise NotFound(f"no adapter for speaker '{speaker}'; train one with POST /train")
    # Starlette writes the name as RFC 5987 `filename*=utf-8''...` when it is not plain ASCII.
    return FileResponse(path, media_type="application/zip", filename=f"{speaker}-adapter.zip",
                        background=BackgroundTask(path.unlink, missing_ok=True))


app.include_router(api)
app.include_router(jobs_api.router)
app.include_router(exports_api.router)
app.include_router(openai_compat.router, dependencies=[Depends(require_api_key)])  # its errors: OpenAI's shape
app.include_router(page.router)  # the page at / and its files: no data, so no key
app.mount("/static", page.assets, name="static")
