"""The schemas of the OpenAI-compatible API (`/v1`), in OpenAI's own field names and shapes, so that
its clients work unchanged. Sent by those clients, or answered to them. No torch here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from models import MAX_MESSAGE_CHARS, RecalledPublic, Sampling

MAX_CHOICES = 4  # n: each choice is a generation of its own on one serialised model
MAX_TOKENS = 1024  # the longest reply generated; OpenAI clients send their own model's limits (4096, ...): clamped


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
