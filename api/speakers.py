"""The speaker routes: upload a dialog or a messenger export, inspect an export, list speakers, read
a speaker's messages and rendered dataset, delete a speaker, generate their reply, and read, run,
plot or download their adapter's evaluation and adapter.

Each endpoint validates through models.py and calls one function of store, parser, lm or jobs.
Knows nothing of how a job runs or how a model is loaded.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

import memory
import parser as dialog_parser
import store
import train
from api.deps import (
    ADAPTER_DAMAGED,
    BODY_ERRORS,
    ERRORS,
    GENERATION_BUSY,
    RETRY_AFTER,
    SettingsDep,
    base_ready,
    check_allowed,
    error,
    generation,
    guarded_router,
    registry,
)
from api.generation_models import GenerateRequest, GenerateResponse, MemoryPublic, MemoryQuery, RecalledPublic
from config import Settings
from errors import Conflict, NotFound, PayloadTooLarge, ServiceError, Unprocessable
from importers import ExportError, ExportTooLarge
from jobs.registry import KIND_NAMES
from jobs.runner import delete_job_files, display_path
from lm import adapters, base_model, chat_format, evals
from lm import export as model_export
from lm.infer import AdapterNotFound, persona_decoding, sampling
from models import (
    DatasetPublic,
    DatasetQuery,
    DeletedPublic,
    DeleteQuery,
    ExportForm,
    ExportInspection,
    PageQuery,
    SamplesPublic,
    SpeakerName,
    SpeakerPublic,
    SpeakersPublic,
    Turn,
    UploadFileForm,
    UploadFileResponse,
    UploadTextRequest,
    UploadTextResponse,
)

router = guarded_router()
# The routes that take a multipart form, and the curl arguments of one (main.py's 422 for any other body says them).
FORM_ROUTES = {"/upload-file": "-F file=@result.json -F speaker=NAME", "/exports/inspect": "-F file=@result.json"}


def _upload_response(speaker: str, samples, empty: int, settings: Settings) -> dict:
    result = store.append_samples(settings.DATA_DIR, speaker, samples, settings.STORAGE_LOCK_SECONDS)
    memory.add_samples(settings.DATA_DIR, speaker, samples)
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


@router.post(
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


@router.post(
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
            max_messages=settings.MAX_EXPORT_MESSAGES,
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


@router.post("/exports/inspect", response_model=ExportInspection, responses=BODY_ERRORS)
def inspect_export(file: UploadFile, form: Annotated[ExportForm, Form()], settings: SettingsDep) -> ExportInspection:
    """Read an export and say what it holds (format, chats, date range, participants); stores nothing."""
    try:
        return dialog_parser.inspect_export(file.file.read(), file.filename or "", form.format, form.chat,
                                            4 * settings.MAX_UPLOAD_BYTES, settings.MAX_EXPORT_MESSAGES)
    except ExportTooLarge as exc:
        raise PayloadTooLarge(str(exc)) from None
    except ExportError as exc:
        raise Unprocessable(str(exc)) from None


@router.get("/speakers", response_model=SpeakersPublic, responses=LOCKED)
def list_speakers(settings: SettingsDep) -> SpeakersPublic:
    """Every speaker with stored messages: count, last upload, and their adapter if trained."""
    data = []
    for stored in store.list_speakers(settings.DATA_DIR, settings.STORAGE_LOCK_SECONDS):
        info = adapters.info(settings.OUTPUT_DIR, stored.speaker)
        data.append(SpeakerPublic(  # a damaged file (a DamagedFile) has no messages, only an error
            speaker=stored.speaker, messages=getattr(stored, "messages", 0), last_upload=getattr(stored, "last_upload", None),
            adapter=info is not None, trained_at=info.get("created_at") if info else None, error=getattr(stored, "error", None),
            memory=None if isinstance(stored, store.DamagedFile) else memory.size_if_built(settings.DATA_DIR, stored.speaker),
        ))
    return SpeakersPublic(data=data, count=len(data))


def _stored(settings: Settings, speaker: str, offset: int, limit: int) -> tuple[list, int]:
    """Samples offset..offset+limit of the speaker and their count; 404 when nothing is stored."""
    found = store.read_messages(settings.DATA_DIR, speaker, offset, limit, settings.STORAGE_LOCK_SECONDS)
    if found is None:
        raise NotFound(f"no messages stored for speaker '{speaker}'")
    return found


@router.get("/speakers/{speaker}/messages", response_model=SamplesPublic,
         responses={404: error("Nothing stored."), **LOCKED, **ERRORS})
def speaker_messages(speaker: SpeakerName, settings: SettingsDep, page: Annotated[PageQuery, Query()]) -> SamplesPublic:
    """The speaker's stored messages with their context, oldest first."""
    samples, count = _stored(settings, speaker, page.offset, page.limit)
    return SamplesPublic(data=samples, count=count)


@router.get(
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
    stored = store.load_speaker(settings.DATA_DIR, speaker, settings.STORAGE_LOCK_SECONDS) if settings.MEMORY_K else None
    pool = train.holdout_split(stored.messages, settings.EVAL_FRACTION, settings.EVAL_MIN_SAMPLES)[0] if stored else []
    try:
        rendered = train.render_dataset(samples, speaker, settings.BASE_MODEL, settings.MODELS_DIR,
                                        settings.MAX_SEQ_LENGTH, warm.tokenizer, pool, settings.MEMORY_K)
    except (OSError, ValueError) as exc:
        raise ServiceError(f"could not load the tokenizer of base model {settings.BASE_MODEL!r}: {exc}") from None
    return DatasetPublic(**rendered, count=count)


@router.delete(
    "/speakers/{speaker}",
    response_model=DeletedPublic,
    responses={404: error("Nothing stored for the speaker."), 409: error("The speaker has a training or export job queued or running."), **LOCKED, **ERRORS},
)
def delete_speaker(
    speaker: SpeakerName, request: Request, settings: SettingsDep, query: Annotated[DeleteQuery, Query()]
) -> DeletedPublic:
    """Delete every file that holds the speaker's messages (their file and its temporaries, the evaluation,
    half-made adapters, job checkpoints and logs) and, unless keep_adapter, their adapter and its exports;
    says what it removed."""
    active = registry(request).active_for(speaker)
    if active:
        raise Conflict(f"speaker '{speaker}' has a {KIND_NAMES[active.kind]} job running or queued ({active.job_id}); "
                       "cancel it or wait, then delete")
    temporaries = store.clean_temporaries(settings.DATA_DIR, speaker)
    deleted = [*store.delete_speaker(settings.DATA_DIR, speaker, settings.STORAGE_LOCK_SECONDS), *temporaries,
               *memory.delete(settings.DATA_DIR, speaker),
               *adapters.discard_partial(settings.OUTPUT_DIR, speaker),  # half-made adapters of killed jobs
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


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={404: error("The speaker has no trained adapter."), 500: error(ADAPTER_DAMAGED),
               503: {**error(GENERATION_BUSY), "headers": RETRY_AFTER}, **BODY_ERRORS},
)
async def generate(body: GenerateRequest, request: Request, settings: SettingsDep) -> GenerateResponse:
    """The reply the speaker would write next, from their adapter on the base model."""
    turns = body.messages if body.messages is not None else [Turn(speaker="user", content=body.prompt)]
    decoding = persona_decoding(settings, [*turns, Turn(speaker=body.speaker, content="")], **sampling(body),
                                max_new_tokens=body.max_new_tokens)
    if adapters.info(settings.OUTPUT_DIR, body.speaker) is None:  # a 404 before any 503 of a busy or warming base
        raise NotFound(f"no adapter for speaker '{body.speaker}'; train one with POST /train")
    recalled = await run_in_threadpool(memory.recall, settings.DATA_DIR, body.speaker, turns,
                                       memory.k_for(body.memory, settings.MEMORY_K), settings.STORAGE_LOCK_SECONDS)
    messages = chat_format.to_messages(memory.recalled_turns(recalled, body.speaker) + list(turns), body.speaker)
    try:
        async with generation(request).slot() as gate:
            out = await gate.run(request.app.state.engine.generate, body.speaker, messages, decoding)
    except AdapterNotFound:
        raise NotFound(f"no adapter for speaker '{body.speaker}'; train one with POST /train") from None
    return GenerateResponse(speaker=body.speaker, reply=out.text, prompt_tokens=out.prompt_tokens,
                            completion_tokens=out.completion_tokens, finish_reason=out.finish_reason,
                            memory=[RecalledPublic(**vars(r)) for r in recalled])


@router.get("/speakers/{speaker}/memory", response_model=MemoryPublic,
            responses={404: error("Nothing stored for the speaker."), **LOCKED, **ERRORS})
def speaker_memory(speaker: SpeakerName, settings: SettingsDep, query: Annotated[MemoryQuery, Query()]) -> MemoryPublic:
    """What the persona would recall for a text: the person's most relevant earlier messages, and how many the memory holds."""
    found = memory.search(settings.DATA_DIR, speaker, query.q, query.limit, settings.STORAGE_LOCK_SECONDS)
    if found is None:
        raise NotFound(f"no messages stored for speaker '{speaker}'")
    recalled, count = found
    return MemoryPublic(data=[RecalledPublic(**vars(r)) for r in recalled], count=count)


@router.get("/speakers/{speaker}/evaluation", responses={404: error("No evaluation for the speaker.")})
def speaker_evaluation(speaker: SpeakerName, settings: SettingsDep) -> dict:
    """The adapter's latest evaluation report (eval.json)."""
    report = evals.read_report(settings, speaker)
    if report is None:
        raise NotFound(f"no evaluation for speaker '{speaker}'; train an adapter, or POST /speakers/{speaker}/evaluate")
    return report


@router.post(
    "/speakers/{speaker}/evaluate",
    responses={404: error("The speaker has no adapter."), 409: error("Training, or the adapter deleted meanwhile."),
               503: {**error(GENERATION_BUSY), "headers": RETRY_AFTER}},
)
async def evaluate_speaker(speaker: SpeakerName, request: Request, settings: SettingsDep) -> dict:
    """Evaluate the speaker's adapter now on its held-out samples; returns and stores the report."""
    active = await asyncio.to_thread(registry(request).active_for, speaker)
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


@router.get(
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


@router.get(
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
