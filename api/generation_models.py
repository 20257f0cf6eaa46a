"""The schemas of generation: how a reply is sampled, /generate's request and answer, what memory
recalled (/speakers/{s}/memory), and the OpenAI-compatible API (`/v1`) in OpenAI's own field names and
shapes, so that its clients work unchanged. No torch here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from config import MAX_RECALL
from models import MAX_MESSAGE_CHARS, SpeakerName, Turn

MAX_CHOICES = 4  # n: each choice is a generation of its own on one serialised model
MAX_TOKENS = 1024  # the longest reply generated; OpenAI clients send their own model's limits (4096, ...): clamped


# --- /generate and memory ------------------------------------------------------------------------


class Sampling(BaseModel):
    """How to sample a persona's reply; each field left out takes the service's default (the
    GENERATION_* settings), chosen so that replies end their turn and do not loop."""

    temperature: float | None = Field(None, ge=0, le=2, description="Default GENERATION_TEMPERATURE (0.9); 0: greedy.")
    top_p: float | None = Field(None, gt=0, le=1, description="Default GENERATION_TOP_P (0.95).")
    repetition_penalty: float | None = Field(
        None, ge=1, le=2, description="Default GENERATION_REPETITION_PENALTY (1.1); 1: none."
    )
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Same seed, same request: the same reply.")
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, max_length=4, description="Up to 4 strings that end the reply (not included in it)."
    )
    memory: bool | Annotated[int, Field(ge=0, le=MAX_RECALL)] | None = Field(
        None, description="The person's earlier messages recalled into the prompt: false for none, a number for that "
                          "many; default MEMORY_K when the speaker has a memory. The answer lists them (`memory`).")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class GenerateRequest(Sampling):
    """Sent by clients: the conversation so far (or one prompt), and how to sample the reply."""

    model_config = ConfigDict(strict=True, json_schema_extra={"examples": [
        {"speaker": "User1", "messages": [{"speaker": "User2", "content": "Привіт! Що робиш?"}], "max_new_tokens": 48}]})

    speaker: SpeakerName
    messages: list[Turn] | None = Field(None, min_length=1, max_length=200, description="Earlier turns; the speaker's own turns count as theirs.")
    prompt: str | None = Field(None, min_length=1, max_length=MAX_MESSAGE_CHARS, description="Instead of messages: one message to answer.")
    max_new_tokens: int | None = Field(None, ge=1, le=1024, description="Default GENERATION_MAX_NEW_TOKENS (64).")

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("send either messages or prompt, not both and not neither")
        return self


class RecalledPublic(BaseModel):
    """One of the person's earlier messages, recalled for a reply."""

    sample_id: str
    text: str
    score: float = Field(description="BM25 relevance to the conversation; higher is more relevant.")
    answered: Turn | None = Field(None, description="The turn the message answered in the person's chat; recalled with it.")


class MemoryPublic(BaseModel):
    data: list[RecalledPublic]
    count: int = Field(description="Messages the speaker's memory holds.")


class GenerateResponse(BaseModel):
    speaker: str
    reply: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    memory: list[RecalledPublic] = Field([], description="The person's messages recalled into the prompt, most relevant first.")


class MemoryQuery(BaseModel):
    # 500 characters: a query string fits in a request head (10,000, percent-encoded, was a 400 from the server)
    q: str = Field(min_length=1, max_length=500, description="A message or conversation to recall for (recall reads its newest words).")
    limit: int = Field(5, ge=1, le=MAX_RECALL)


# --- /v1 ----------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    """One part of a message's content; only text parts (images and audio have no meaning here)."""

    type: Literal["text"]
    text: str = Field(max_length=MAX_MESSAGE_CHARS)


class OpenAIMessage(BaseModel):
    """A message as OpenAI's clients send it. `tool` and `function` results are read as turns from the
    user's side; an assistant message with only `tool_calls` (no content) adds nothing."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] | Annotated[list[TextPart], Field(max_length=64)] | None = None

    @property
    def text(self) -> str:
        """The content as one text: text parts joined by new lines."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(Sampling):
    """OpenAI's chat completion request (the fields this service uses; others are ignored)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "User1", "messages": [{"role": "user", "content": "Привіт!"}], "max_tokens": 48}]})

    model: str = Field(min_length=1, max_length=512, description="A speaker with an adapter, or the base model's name.")
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1, validation_alias=AliasChoices("max_completion_tokens", "max_tokens"),
                                   description=f"Longer than {MAX_TOKENS} is clamped to {MAX_TOKENS}.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate, one after another; choice i samples with seed + i.")

    @field_validator("max_tokens")
    @classmethod
    def _clamp(cls, value: int | None) -> int | None:
        return None if value is None else min(value, MAX_TOKENS)


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """Every error answer of `/v1`, in OpenAI's shape (its clients read the message from it)."""

    error: OpenAIErrorBody


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    memory: list[RecalledPublic] = Field([], description="Extension: the person's messages recalled into the prompt.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
