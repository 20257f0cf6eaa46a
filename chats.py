"""The record every messenger reader produces: a `Chat` of `ChatMessage`s, each marked as a message, a
system notice, a media placeholder or a deleted message; and the errors of an unreadable export.

Knows nothing of formats, files, cleaning or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

Kind = Literal["message", "system", "media", "deleted"]


class ExportError(ValueError):
    """The file is not a readable export of the given (or any) format; the message says why."""


class ExportTooLarge(ExportError):
    """The archive unpacks to more than the budget (a zip bomb, or simply too much)."""


@dataclass
class ChatMessage:
    speaker: str
    text: str
    kind: Kind = "message"
    id: int | None = None
    time: datetime | None = None
    reply_to: int | None = None
    merged_ids: list[int] = field(default_factory=list)


@dataclass
class Chat:
    name: str
    id: str | None
    messages: list[ChatMessage]
