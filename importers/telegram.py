"""Telegram Desktop's JSON export (result.json: one chat, or the full account) → chats.

Reading only; knows nothing of other messengers, of cleaning or of HTTP."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from importers.record import Chat, ChatMessage, ExportError, Kind, MessageBudget, epoch, integer, parse_time

_TG_MEDIA_FIELDS = ("photo", "file", "media_type", "sticker_emoji", "poll", "location_information", "contact_information")


def read_telegram(document: Any, chat: str | None, budget: MessageBudget | None = None) -> list[Chat]:
    if not isinstance(document, dict):
        raise ExportError("a Telegram export is a JSON object (result.json)")
    if "chats" in document:  # the full-account export
        chats = document["chats"].get("list") if isinstance(document["chats"], dict) else None
        if not isinstance(chats, list):
            raise ExportError("Telegram full export: 'chats.list' is missing or not a list")
        if chat not in (None, "", "all"):
            chosen = [c for c in chats if isinstance(c, dict) and chat in (str(c.get("id")), c.get("name"))]
            if not chosen:
                names = [c.get("name") or str(c.get("id")) for c in chats if isinstance(c, dict)]
                raise ExportError(f"no chat named or numbered {chat!r} in the export; its chats are {names}")
            chats = chosen
        return [_telegram_chat(c, budget) for c in chats if isinstance(c, dict)]
    if "messages" in document:
        return [_telegram_chat(document, budget)]
    raise ExportError("a Telegram export has 'messages' (one chat) or 'chats' (the full account)")


def _telegram_chat(raw: dict, budget: MessageBudget | None) -> Chat:
    messages = raw.get("messages")
    if not isinstance(messages, list):
        raise ExportError(f"Telegram chat {raw.get('name')!r}: 'messages' must be a list")
    if budget:
        budget.take(len(messages))
    out = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        speaker = m.get("from") or m.get("actor") or (str(m["from_id"]) if m.get("from_id") else "")
        text = telegram_text(m.get("text", ""))
        kind: Kind = "message"
        if m.get("type") != "message":
            kind = "system"
        elif any(m.get(f) for f in _TG_MEDIA_FIELDS) and not text.strip():
            kind = "media"
        out.append(ChatMessage(
            speaker=str(speaker), text=text, kind=kind,
            id=m.get("id") if isinstance(m.get("id"), int) else None,
            time=parse_time(m.get("date")) or _unix_time(m.get("date_unixtime")),
            reply_to=m.get("reply_to_message_id") if isinstance(m.get("reply_to_message_id"), int) else None,
        ))
    return Chat(name=str(raw.get("name") or "chat"), id=str(raw["id"]) if raw.get("id") is not None else None, messages=out)


def _unix_time(value: Any) -> datetime | None:
    seconds = integer(value)
    return epoch(seconds) if seconds is not None else None


def telegram_text(value: Any) -> str:
    """`text` is a string, or a list of strings and entity objects that carry a `text` field."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(part if isinstance(part, str) else str(part.get("text", "")) if isinstance(part, dict) else "" for part in value)
    return ""


