"""DiscordChatExporter's JSON export of a channel → a chat.

Reading only; knows nothing of other messengers, of cleaning or of HTTP."""

from __future__ import annotations

from typing import Any

from importers.record import Chat, ChatMessage, ExportError, Kind, MessageBudget, integer, parse_time

_DISCORD_MESSAGE_TYPES = ("Default", "Reply", "0", "19")


def read_discord(document: Any, budget: MessageBudget | None = None) -> Chat:
    messages = document.get("messages") if isinstance(document, dict) else None
    if not isinstance(messages, list):
        raise ExportError("a Discord export (DiscordChatExporter JSON) has a 'messages' list")
    if budget:
        budget.take(len(messages))
    out = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        author = m.get("author") if isinstance(m.get("author"), dict) else {}
        text = m.get("content") if isinstance(m.get("content"), str) else ""
        kind: Kind = "message"
        if str(m.get("type", "Default")) not in _DISCORD_MESSAGE_TYPES:
            kind = "system"
        elif not text.strip() and (m.get("attachments") or m.get("stickers") or m.get("embeds")):
            kind = "media"
        reference = m.get("reference") if isinstance(m.get("reference"), dict) else {}
        out.append(ChatMessage(
            speaker=str(author.get("nickname") or author.get("name") or ""), text=text, kind=kind,
            id=integer(m.get("id")), time=parse_time(m.get("timestamp")), reply_to=integer(reference.get("messageId")),
        ))
    guild, channel = (document[k] if isinstance(document.get(k), dict) else {} for k in ("guild", "channel"))
    name = " / ".join(str(part) for part in (guild.get("name"), channel.get("name")) if part) or "discord"
    return Chat(name=name, id=str(channel["id"]) if channel.get("id") is not None else None, messages=out)
