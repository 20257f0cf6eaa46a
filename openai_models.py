"""The schemas of the OpenAI-compatible API (`/v1`), in OpenAI's own field names and shapes, so that
its clients work unchanged. Sent by those clients, or answered to them. No torch here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from models import MAX_MESSAGE_CHARS, Sampling


class OpenAIMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


class ChatCompletionRequest(Sampling):
    """OpenAI's chat completion request (the fields this service uses; others are ignored)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "User1", "messages": [{"role": "user", "content": "Привіт!"}], "max_tokens": 48}]})

    model: str = Field(min_length=1, max_length=512, description="A speaker with an adapter, or the base model's name.")
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1, le=1024, validation_alias=AliasChoices("max_completion_tokens", "max_tokens"))
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="One choice per request.")


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


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
