"""Facebook Messenger and Instagram ("download your information" JSON, message_N.json per thread) → chats.

Reading only; knows nothing of other messengers, of cleaning or of HTTP."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from importers.record import Chat, ChatMessage, ExportError, Kind, MessageBudget, epoch

_FB_MEDIA_FIELDS = ("photos", "videos", "audio_files", "gifs", "files", "sticker", "share")
_FB_SYSTEM_TYPES = ("Call", "Subscribe", "Unsubscribe")
_FB_GENERATED = re.compile(r"\bsent an? (attachment|photo|video|link|GIF|sticker|voice message)\.?$", re.IGNORECASE)


def read_messenger(document: Any, name: str = "messenger", budget: MessageBudget | None = None) -> Chat:
    """Messages come newest first and their text is UTF-8 mis-encoded as latin-1 escapes."""
    messages = document.get("messages") if isinstance(document, dict) else None
    if not isinstance(messages, list):
        raise ExportError("a Messenger/Instagram export (message_1.json) has a 'messages' list")
    if budget:
        budget.take(len(messages))
    out = []
    for m in reversed(messages):
        if not isinstance(m, dict):
            continue
        text = repair_mojibake(m["content"]) if isinstance(m.get("content"), str) else ""
        kind: Kind = "message"
        if m.get("is_unsent"):
            kind = "deleted"
        elif m.get("type") in _FB_SYSTEM_TYPES:
            kind = "system"
        elif any(m.get(f) for f in _FB_MEDIA_FIELDS) and (not text.strip() or _FB_GENERATED.search(text)):
            kind = "media"
        elif not text.strip():
            kind = "system"  # reactions-only or unsupported items
        ms = m.get("timestamp_ms")
        time = epoch(ms / 1000) if isinstance(ms, (int, float)) and not isinstance(ms, bool) else None
        out.append(ChatMessage(speaker=repair_mojibake(str(m.get("sender_name") or "")), text=text, kind=kind, time=time))
    out.sort(key=lambda m: m.time or datetime.min)
    for i, m in enumerate(out):
        m.id = i
    title = document.get("title")
    return Chat(name=repair_mojibake(title) if isinstance(title, str) and title else name, id=name, messages=out)


def merged_thread(documents: list[Any]) -> Any:
    """One thread from its files; a file that is not a thread is returned for read_messenger to refuse."""
    bad = [d for d in documents if not (isinstance(d, dict) and isinstance(d.get("messages"), list))]
    return bad[0] if bad else {**documents[0], "messages": [m for d in documents for m in d["messages"]]}


def repair_mojibake(text: str) -> str:
    """Meta's exports write UTF-8 bytes as latin-1 code points ("\\u00e2\\u009d\\u00a4"): undo that
    when it round-trips, and leave real latin-1 text (or already fixed text) as it is."""
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text
