"""OpenAI-compatible endpoints, so existing clients talk to a persona unchanged:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="<API_KEY or anything>")
    client.chat.completions.create(model="Олена", messages=[{"role": "user", "content": "Привіт!"}])

`model` is a speaker with a trained adapter, or the base model's name. `stream: true` answers with
Server-Sent Events chunks ending in `data: [DONE]`, as OpenAI's API does. Errors on every `/v1` path
answer OpenAI's `{"error": {"message", "type", "param", "code"}}` (main.py's handlers call
`error_response` here), so its clients raise their own exceptions with our message.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import memory
from api.deps import ADAPTER_DAMAGED, GENERATION_BUSY, RETRY_AFTER, generation
from api.generation_models import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessageOut,
    ModelCard,
    ModelList,
    OpenAIError,
    OpenAIErrorBody,
    RecalledPublic,
    Usage,
)
from config import get_settings
from errors import NotFound, ServiceError, public_errors, scrub
from lm import adapters, chat_format
from lm.infer import (
    AdapterNotFound,
    Decoding,
    Generation,
    created,
    persona_decoding,
    sampling,
)
from models import Turn

log = logging.getLogger("persona_lora.openai")
router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], responses={
    400: {"model": OpenAIError, "description": "Invalid request (OpenAI's status for FastAPI's 422), or a body not UTF-8."},
    401: {"model": OpenAIError, "description": "API_KEY is set and the request did not send it."},
    413: {"model": OpenAIError, "description": "Request body over MAX_BODY_BYTES."}})
ASSISTANT = "assistant"
CODES = {401: "invalid_api_key"}  # OpenAI's `code` for a status, where it has one


class ModelNotFound(NotFound):
    """No adapter for the model asked for: OpenAI's 404 `model_not_found`, about `model`."""

    code, param = "model_not_found", "model"


def is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def openai_error(request: Request, exc: Exception, headers: dict | None = None,
                 problems: list[dict] | None = None) -> JSONResponse | None:
    """The error as OpenAI answers it on a /v1 path (main.py's handlers ask first); None elsewhere.
    `problems`: a validation error's, as errors.public_errors showed them."""
    if not is_openai(request.url.path):
        return None
    if isinstance(exc, RequestValidationError):
        return validation_error(exc.errors() if problems is None else problems)
    if isinstance(exc, StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=headers)
    if isinstance(exc, ServiceError):
        return error_response(exc.status, scrub(str(exc)), getattr(exc, "param", None), getattr(exc, "code", None), headers)
    return error_response(500, f"internal error ({type(exc).__name__}); see the server log")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """An error in OpenAI's shape: `invalid_request_error` for the client's mistakes, `server_error` for ours."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = OpenAIError(error=OpenAIErrorBody(message=message, type=kind, param=param, code=code or CODES.get(status)))
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


def validation_error(errors) -> JSONResponse:
    """FastAPI's 422 as OpenAI answers an invalid request: 400, every problem in the message, the first
    one's field (`messages.0.content`) as `param`."""
    errors = public_errors(errors)  # never the value sent; a lone surrogate said in words
    where = [".".join(str(part) for part in e["loc"] if part != "body") for e in errors]
    problems = "; ".join(f"{w or 'body'}: {e['msg']}" for w, e in zip(where, errors))
    return error_response(400, f"invalid request: {problems}", where[0] if where else None)


def _target(request: Request, model: str) -> str | None:
    """None for the base model, else the speaker, who must have an adapter."""
    settings = get_settings()
    if model == settings.BASE_MODEL:
        return None
    try:  # the name as /upload-text stored it (NFC, trimmed): one name, one persona
        speaker = Turn(speaker=model, content="").speaker
    except ValidationError:  # no speaker can have that name (too long, control characters)
        raise _no_adapter(model) from None
    if adapters.info(settings.OUTPUT_DIR, speaker) is None:  # a 404 before any 503 of a busy or warming base
        raise _no_adapter(model)
    return speaker


def _turns(body: ChatCompletionRequest, persona: str) -> list[Turn]:
    """OpenAI roles to the persona's conversation: the assistant's turns are the persona's; user, tool
    and function messages are turns from the other side (a tool's result is something said to the
    persona); system text leads as the first user turn (not every template has a system role); empty
    messages (an assistant's bare `tool_calls`) add nothing; the rest keeps its order."""
    system = "\n".join(m.text for m in body.messages if m.role in ("system", "developer"))
    turns = [Turn(speaker=persona if m.role == "assistant" else "user", content=m.text)
             for m in body.messages if m.role not in ("system", "developer") and m.text]
    if system:
        turns.insert(0, Turn(speaker="user", content=system))
    return turns


@router.get("/models", response_model=ModelList)
def list_models(request: Request) -> ModelList:
    """The base model and one model per speaker with a trained adapter."""
    settings = get_settings()
    names = adapters.names(settings.OUTPUT_DIR)
    now = created()
    cards = [ModelCard(id=settings.BASE_MODEL, created=now, owned_by="base")]
    cards += [ModelCard(id=name, created=now, owned_by="persona-lora") for name in names]
    return ModelList(data=cards)


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
              "description": "A chat completion, or with `stream` its chunks as Server-Sent Events."},
        404: {"model": OpenAIError, "description": "No adapter for that model (speaker)."},
        500: {"model": OpenAIError, "description": ADAPTER_DAMAGED},
        503: {"model": OpenAIError, "description": GENERATION_BUSY, "headers": RETRY_AFTER},
    },
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Chat with a persona in OpenAI's request and response shapes."""
    engine = request.app.state.engine
    speaker = _target(request, body.model)
    persona = speaker or ASSISTANT
    turns = _turns(body, persona)
    settings = get_settings()
    recalled = await run_in_threadpool(memory.recall, settings.DATA_DIR, speaker, turns,
                                       memory.k_for(body.memory, settings.MEMORY_K), settings.STORAGE_LOCK_SECONDS) if speaker else []
    recalled_public = [RecalledPublic(**vars(r)) for r in recalled]
    messages = chat_format.to_messages(memory.recalled_turns(recalled, persona) + turns, persona)
    decoding = persona_decoding(get_settings(), [*turns, Turn(speaker=persona, content="")], **sampling(body),
                                max_new_tokens=body.max_tokens)
    # Choice i samples with seed + i: n choices differ, and each is the answer of a request for n=1 with its seed.
    decodings = [replace(decoding, seed=None if decoding.seed is None else decoding.seed + i) for i in range(body.n)]
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    gate = generation(request)
    if body.stream:  # the stream holds its generation slot until its last chunk (_events gives it back)
        started = await gate.enter()
        try:
            opened = await _open(gate, engine, speaker, messages, decodings[0], body.model)  # a 404 comes before the 200
        except BaseException:
            gate.leave(started)
            raise
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        release = _once(lambda: gate.leave(started))
        events = _events(completion_id, body.model, include_usage, opened,
                         lambda d: _open(gate, engine, speaker, messages, d, body.model), decodings, gate, release,
                         [r.model_dump() for r in recalled_public])
        return _SlotStream(release, events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    outs = []
    async with gate.slot():
        for each in decodings:
            try:
                outs.append(await gate.run(engine.generate, speaker, messages, each))
            except AdapterNotFound:
                raise _no_adapter(body.model) from None
    return ChatCompletion(
        id=completion_id, created=created(), model=body.model, usage=_usage(outs), memory=recalled_public,
        choices=[ChatChoice(index=i, message=ChatMessageOut(role="assistant", content=out.text), finish_reason=out.finish_reason)
                 for i, out in enumerate(outs)],
    )


def _usage(outs: list[Generation]) -> Usage:
    """One prompt, read once, and every choice's tokens (OpenAI counts n choices so)."""
    completion = sum(out.completion_tokens for out in outs)
    return Usage(prompt_tokens=outs[0].prompt_tokens, completion_tokens=completion,
                 total_tokens=outs[0].prompt_tokens + completion)


async def _open(gate, engine, speaker: str | None, messages: list[dict], decoding: Decoding, model: str):
    """engine.stream started: its first item fetched (no adapter: the model's 404), and the rest."""
    pieces = engine.stream(speaker, messages, decoding)
    try:
        first = await gate.run(next, pieces, None)
    except AdapterNotFound:
        raise _no_adapter(model) from None
    return first, pieces


async def _events(completion_id: str, model: str, include_usage: bool, opened, open_next, decodings: list[Decoding],
                  gate, release, recalled: list[dict]):
    """The chunks of every choice in turn (its role, its text in pieces, its finish reason; the first
    chunk also carries `memory`, the recalled messages, an extension OpenAI's clients ignore), then with
    `include_usage` one chunk with `usage` and no choices, then `[DONE]`. A failure after the 200 is sent
    as an `error` event, which OpenAI's clients raise. Gives back the generation slot (`release`) when
    it ends, or when the client goes away."""

    def sse(data: dict) -> bytes:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    def chunk(choices: list[dict], **extra) -> bytes:
        return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created(), "model": model,
                    "choices": choices, **extra})

    outs = []
    try:
        for index, decoding in enumerate(decodings):
            item, pieces = opened if index == 0 else await open_next(decoding)
            yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                        **({"memory": recalled} if index == 0 else {}))
            while item is not None:
                if isinstance(item, Generation):
                    outs.append(item)
                    yield chunk([{"index": index, "delta": {}, "finish_reason": item.finish_reason}])
                else:
                    yield chunk([{"index": index, "delta": {"content": item}, "finish_reason": None}])
                item = await gate.run(next, pieces, None)
        if include_usage:
            yield chunk([], usage=_usage(outs).model_dump())
    except Exception as exc:  # the 200 is sent: the error can only travel in the stream
        log.exception("stream of %s failed", completion_id)
        body = OpenAIErrorBody(message=f"generation failed ({type(exc).__name__}); see the server log", type="server_error")
        yield sse({"error": body.model_dump()})
    finally:
        release()
    yield b"data: [DONE]\n\n"


def _once(fn):
    """fn, run at most once however often it is called."""
    done = False

    def call():
        nonlocal done
        if not done:
            done = True
            fn()
    return call


class _SlotStream(StreamingResponse):
    """A stream that gives its generation slot back however the response ends: also when the client
    went away before the first chunk was read (the body's own `finally` never runs then)."""

    def __init__(self, release, content, **kwargs):
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def _no_adapter(model: str) -> ModelNotFound:
    return ModelNotFound(f"no model '{model}': train the speaker first (POST /train), or use the base model "
                         f"'{get_settings().BASE_MODEL}'; GET /v1/models lists them")
