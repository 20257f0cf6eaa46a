"""The record every messenger reader produces: a `Chat` of `ChatMessage`s, each marked as a message, a
system notice, a media placeholder or a deleted message; the errors of an unreadable export; and the
readers' shared helpers (ISO dates and Unix epochs as naive UTC, numbers written as strings).

Knows nothing of formats, files, cleaning or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

Kind = Literal["message", "system", "media", "deleted"]


class ExportError(ValueError):
    """The file is not a readable export of the given (or any) format; the message says why."""


class ExportTooLarge(ExportError):
    """The archive unpacks to more than the budget, or the export holds more messages than MessageBudget allows."""


class MessageBudget:
    """The messages an export may hold (MAX_EXPORT_MESSAGES), shared by its files and chats, and the JSON objects and
    lists it may parse (4 a message): each is refused before it is built, so a hostile file's parsed size is bounded."""

    JSON_ITEMS_PER_MESSAGE = 4  # a Telegram message: itself, text_entities and an entity; reactions and formatting add more

    def __init__(self, limit: int):
        self.limit, self.messages, self.items = limit, limit, limit * self.JSON_ITEMS_PER_MESSAGE

    def take(self, count: int) -> None:
        self.messages -= count
        if self.messages < 0:
            raise ExportTooLarge(f"the export holds more than {self.limit} messages (MAX_EXPORT_MESSAGES); export one chat "
                                 "or a shorter period, or raise MAX_EXPORT_MESSAGES")

    def take_json(self, data: bytes) -> None:
        """Before parsing: every '{' and '[' may open an object or a list (those in strings too: an upper bound)."""
        items = data.count(b"{") + data.count(b"[")
        if items > self.items:
            raise ExportTooLarge(
                f"the JSON holds {items} objects and lists, more than {self.items} ({self.JSON_ITEMS_PER_MESSAGE} per message "
                f"of MAX_EXPORT_MESSAGES={self.limit}); export one chat or a shorter period, or raise MAX_EXPORT_MESSAGES")
        self.items -= items


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
    skipped_lines: int = 0  # WhatsApp: lines before the first message line (a copied page's number and title), not read


def parse_time(value: Any) -> datetime | None:
    """An ISO date, as naive UTC when it carries an offset, so aware and naive dates compare."""
    if not isinstance(value, str):
        return None
    try:
        return naive(datetime.fromisoformat(value))
    except ValueError:
        return None


def integer(value: Any, max_digits: int = 20) -> int | None:
    """An int, or a string of at most `max_digits` ASCII digits as one (Discord's ids, Telegram's
    date_unixtime); anything else is None. str.isdigit alone takes "²" and "١٧" (int() refuses them)
    and 5,000 digits (int() refuses more than 4,300); 20 digits hold any 64-bit id."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and 0 < len(value) <= max_digits and value.isascii() and value.isdigit():
        return int(value)
    return None


def naive(time: datetime | None) -> datetime | None:
    if time is None or time.tzinfo is None:
        return time
    return time.astimezone(timezone.utc).replace(tzinfo=None)


def epoch(seconds: float) -> datetime | None:
    try:
        return datetime.fromtimestamp(seconds, timezone.utc).replace(tzinfo=None)
    except (OverflowError, OSError, ValueError):  # beyond year 9999
        return None
