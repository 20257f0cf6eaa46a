"""OpenAI-compatible endpoints, so existing clients talk to a persona unchanged:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="<API_KEY or anything>")
    client.chat.completions.create(model="Олена", messages=[{"role": "user", "content": "Привіт!"}])

`model` is a speaker with a trained adapter, or the base model's name. `stream: true` answers with
Server-Sent Events chunks ending in `data: [DONE]`, as OpenAI's API does.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from config import get_settings
from errors import NotFound
import adapters
import chat_format
from infer import AdapterNotFound, Generation, created, persona_decoding, sampling
from models import ErrorPublic, Turn, normalise_name
from openai_models import (ChatChoice, ChatCompletion, ChatCompletionRequest, ChatMessageOut, ModelCard, ModelList,
                           Usage)

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
ASSISTANT = "assistant"


def _target(request: Request, model: str) -> str | None:
    """None for the base model, else the speaker, who must have an adapter."""
    settings = get_settings()
    if model == settings.BASE_MODEL:
        return None
    return normalise_name(model)  # the name as /upload-text stored it (NFC, trimmed): one name, one persona


def _messages(body: ChatCompletionRequest, persona: str) -> list[dict]:
    """OpenAI roles to the persona's chat: the assistant's turns are the persona's (named so in a
    transcript), system text leads the first user turn (not every template has a system role); the
    rest keeps its order."""
    system = "\n".join(m.content for m in body.messages if m.role in ("system", "developer"))
    turns = [Turn(speaker=persona if m.role == "assistant" else "user", content=m.content)
             for m in body.messages if m.role in ("user", "assistant")]
    if system:
        turns.insert(0, Turn(speaker="user", content=system))
    return chat_format.to_messages(turns, persona)


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
        404: {"model": ErrorPublic, "description": "No adapter for that model (speaker)."},
    },
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Chat with a persona in OpenAI's request and response shapes."""
    engine = request.app.state.engine
    speaker = _target(request, body.model)
    messages = _messages(body, speaker or ASSISTANT)
    decoding = persona_decoding(get_settings(), **sampling(body), max_new_tokens=body.max_tokens)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if not body.stream:
        try:
            out = await asyncio.to_thread(engine.generate, speaker, messages, decoding)
        except AdapterNotFound:
            raise _no_adapter(body.model) from None
        return ChatCompletion(
            id=completion_id, created=created(), model=body.model,
            choices=[ChatChoice(index=0, message=ChatMessageOut(role="assistant", content=out.text), finish_reason=out.finish_reason)],
            usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                        total_tokens=out.prompt_tokens + out.completion_tokens),
        )
    try:
        pieces = await asyncio.to_thread(engine.stream, speaker, messages, decoding)
        first = await asyncio.to_thread(next, pieces, None)  # errors (no adapter) before the 200
    except AdapterNotFound:
        raise _no_adapter(body.model) from None

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        data = {"id": completion_id, "object": "chat.completion.chunk", "created": created(), "model": body.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        piece = first
        while isinstance(piece, str):
            yield chunk({"content": piece})
            piece = await asyncio.to_thread(next, pieces, None)
        yield chunk({}, piece.finish_reason if isinstance(piece, Generation) else "stop")
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _no_adapter(model: str) -> NotFound:
    return NotFound(f"no model '{model}': train the speaker first (POST /train), or use the base model "
                    f"'{get_settings().BASE_MODEL}'; GET /v1/models lists them")
