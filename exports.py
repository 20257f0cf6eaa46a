"""Messenger exports → chats of `ChatMessage`s: Telegram Desktop JSON (one chat or the full account),
WhatsApp `.txt` / iOS `.zip` (Android and iOS styles), and the native JSON of /upload-text.

Reading only: it marks what a line is (a message, a system notice, a media placeholder, a deleted
message) and leaves dropping, merging, splitting and masking to parser.clean. Knows nothing of HTTP.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Kind = Literal["message", "system", "media", "deleted"]
FORMATS = ("telegram", "whatsapp", "native")


class ExportError(ValueError):
    """The file is not a readable export of the given (or any) format; the message says why."""


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


def read_export(data: bytes, filename: str, fmt: str = "auto", chat: str | None = None) -> list[Chat]:
    """The chats of an export. `chat` picks one chat of a full Telegram export by name or id; None
    or "all" takes every chat."""
    if fmt == "auto":
        fmt = detect_format(data, filename)
    if fmt == "whatsapp":
        return [read_whatsapp(_whatsapp_text(data, filename), filename)]
    document = _json(data)
    if fmt == "telegram":
        return read_telegram(document, chat)
    if fmt == "native":
        return [read_native(document)]
    raise ExportError(f"unknown format {fmt!r}; use one of auto, {', '.join(FORMATS)}")


def detect_format(data: bytes, filename: str) -> str:
    if data[:4] == b"PK\x03\x04" or filename.lower().endswith((".txt", ".zip")):
        return "whatsapp"
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:1] in (b"{", b"["):
        document = _json(data)
        if isinstance(document, dict) and ("messages" in document or "chats" in document):
            return "telegram"
        return "native"
    if _WA_ANDROID.match(_first_line(data)) or _WA_IOS.match(_first_line(data)):
        return "whatsapp"
    raise ExportError(
        "could not tell the format: expected a Telegram result.json, a WhatsApp .txt/.zip export or the "
        "JSON of /upload-text; name it with the `format` field"
    )


def _first_line(data: bytes) -> str:
    return data[:1000].decode("utf-8", errors="replace").lstrip("\ufeff\u200e").split("\n", 1)[0]


def _json(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ExportError(f"the file is not UTF-8 text (byte {exc.start}); is it the right file?") from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"the file is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None


# --- native -------------------------------------------------------------------------------------


def read_native(document: Any) -> Chat:
    turns = document.get("dialog") if isinstance(document, dict) else document
    if not isinstance(turns, list):
        raise ExportError('native JSON must be {"dialog": [{"speaker": ..., "content": ...}, ...]} or such a list')
    messages = []
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("speaker"), str) and isinstance(turn.get("content"), str)):
            raise ExportError(f"dialog item {i}: expected {{\"speaker\": string, \"content\": string}}")
        messages.append(ChatMessage(speaker=turn["speaker"], text=turn["content"], id=i))
    return Chat(name="dialog", id=None, messages=messages)


# --- Telegram -----------------------------------------------------------------------------------

_TG_MEDIA_FIELDS = ("photo", "file", "media_type", "sticker_emoji", "poll", "location_information", "contact_information")


def read_telegram(document: Any, chat: str | None) -> list[Chat]:
    if not isinstance(document, dict):
        raise ExportError("a Telegram export is a JSON object (result.json)")
    if "chats" in document:  # the full-account export
        chats = (document.get("chats") or {}).get("list")
        if not isinstance(chats, list):
            raise ExportError("Telegram full export: 'chats.list' is missing")
        if chat not in (None, "", "all"):
            chosen = [c for c in chats if isinstance(c, dict) and chat in (str(c.get("id")), c.get("name"))]
            if not chosen:
                names = [c.get("name") or str(c.get("id")) for c in chats if isinstance(c, dict)]
                raise ExportError(f"no chat named or numbered {chat!r} in the export; its chats are {names}")
            chats = chosen
        return [_telegram_chat(c) for c in chats if isinstance(c, dict)]
    if "messages" in document:
        return [_telegram_chat(document)]
    raise ExportError("a Telegram export has 'messages' (one chat) or 'chats' (the full account)")


def _telegram_chat(raw: dict) -> Chat:
    messages = raw.get("messages")
    if not isinstance(messages, list):
        raise ExportError(f"Telegram chat {raw.get('name')!r}: 'messages' must be a list")
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
            time=_parse_iso(m.get("date")),
            reply_to=m.get("reply_to_message_id") if isinstance(m.get("reply_to_message_id"), int) else None,
        ))
    return Chat(name=str(raw.get("name") or "chat"), id=str(raw["id"]) if raw.get("id") is not None else None, messages=out)


def telegram_text(value: Any) -> str:
    """`text` is a string, or a list of strings and entity objects that carry a `text` field."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(part if isinstance(part, str) else str(part.get("text", "")) if isinstance(part, dict) else "" for part in value)
    return ""


def _parse_iso(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


# --- WhatsApp -----------------------------------------------------------------------------------

# Android: "12/31/23, 21:05 - Name: text", "31.12.2023, 9:05 pm - Name: text"
_WA_ANDROID = re.compile(
    r"^(\d{1,4})[./-](\d{1,2})[./-](\d{1,4}),? (\d{1,2}):(\d{2})(?::(\d{2}))?(?:\s?([AaPp])\.?\s?[Mm]\.?)? [-–] (.*)$"
)
# iOS: "[31.12.23, 21:05:09] Name: text"
_WA_IOS = re.compile(
    r"^\[(\d{1,4})[./-](\d{1,2})[./-](\d{1,4}),? (\d{1,2}):(\d{2})(?::(\d{2}))?(?:\s?([AaPp])\.?\s?[Mm]\.?)?\] (.*)$"
)
_WA_MEDIA = re.compile(
    r"^(<Media omitted>|<Медіа пропущено>|<attached: [^>]*>|(image|video|audio|sticker|GIF|document|Contact card) omitted"
    r"|.+ \(file attached\))$",
    re.IGNORECASE,
)
_WA_DELETED = re.compile(r"^(This message was deleted\.?|You deleted this message\.?|Це повідомлення видалено\.?)$", re.IGNORECASE)
# iOS puts an author on system notices: recognise them by their text. Phrases no one types in a
# chat count always; everyday words ("added", "left") only on lines iOS marks with U+200E.
_WA_SYSTEM = re.compile(
    r"(Messages and calls are end-to-end encrypted|\b(created group|changed the subject|changed this group's icon"
    r"|changed the group description|deleted this group's icon|joined using this group's invite link"
    r"|changed their phone number)\b|security code (with .+ )?changed)",
    re.IGNORECASE,
)
_WA_SYSTEM_MARKED = re.compile(r"(\badded\b|\bremoved\b|\bleft\b|Missed (voice|video) call|is a contact)", re.IGNORECASE)
_INVISIBLE = "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\ufeff"


def _whatsapp_text(data: bytes, filename: str) -> str:
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = [n for n in archive.namelist() if n.endswith(".txt")]
                if not names:
                    raise ExportError("the .zip holds no .txt chat (expected _chat.txt)")
                name = next((n for n in names if n.endswith("_chat.txt")), names[0])
                data = archive.read(name)
        except zipfile.BadZipFile as exc:
            raise ExportError(f"the .zip is damaged: {exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ExportError(f"the chat is not UTF-8 text (byte {exc.start}); is it the right file?") from None


def read_whatsapp(text: str, name: str = "chat") -> Chat:
    """Lines starting with a timestamp begin a message; others continue the one before it."""
    raw: list[tuple[tuple[str, ...], str]] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        clean = line.strip(_INVISIBLE)
        match = _WA_ANDROID.match(clean) or _WA_IOS.match(clean)
        if match:
            raw.append((match.groups()[:7], match.group(8)))
        elif raw:
            stamp, body = raw[-1]
            raw[-1] = (stamp, body + "\n" + line.strip(_INVISIBLE))
        elif clean:
            raise ExportError(f"line 1 is not a WhatsApp message line: {clean[:80]!r}")
    if not raw:
        raise ExportError("no WhatsApp message lines found (expected '12/31/23, 21:05 - Name: text' or '[31.12.23, 21:05:09] Name: text')")
    day_first = _day_first([stamp for stamp, _ in raw])
    messages = []
    for i, (stamp, body) in enumerate(raw):
        speaker, sep, text = body.rstrip("\n").partition(": ")
        if not sep:  # Android system line: no author
            messages.append(ChatMessage(speaker="", text=body, kind="system", id=i, time=_wa_time(stamp, day_first)))
            continue
        marked = text.startswith("\u200e")
        text = text.strip(_INVISIBLE)
        kind: Kind = "message"
        if _WA_MEDIA.match(text.strip()):
            kind = "media"
        elif _WA_DELETED.match(text.strip()):
            kind = "deleted"
        elif _WA_SYSTEM.search(text) or (marked and _WA_SYSTEM_MARKED.search(text)):
            kind = "system"
        messages.append(ChatMessage(speaker=speaker.strip(_INVISIBLE + " "), text=text, kind=kind, id=i, time=_wa_time(stamp, day_first)))
    return Chat(name=name, id=None, messages=messages)


def _day_first(stamps: list[tuple[str, ...]]) -> bool:
    """Infer the date order across the whole file: a first number over 12 means day-first, a
    second over 12 month-first; with neither, day-first (the order of most locales)."""
    firsts = [int(s[0]) for s in stamps if len(s[0]) <= 2]
    seconds = [int(s[1]) for s in stamps]
    if any(n > 12 for n in firsts):
        return True
    if any(n > 12 for n in seconds):
        return False
    return True


def _wa_time(stamp: tuple[str, ...], day_first: bool) -> datetime | None:
    a, b, c, hour, minute, second, ampm = stamp
    if len(a) == 4:  # 2023-12-31
        year, month, day = int(a), int(b), int(c)
    else:
        day, month = (int(a), int(b)) if day_first else (int(b), int(a))
        year = int(c) + (2000 if len(c) == 2 else 0)
    h = int(hour)
    if ampm:
        h = h % 12 + (12 if ampm.lower() == "p" else 0)
    try:
        return datetime(year, month, day, h, int(minute), int(second or 0))
    except ValueError:
        return None


def normalise_name(name: str) -> str:
    return unicodedata.normalize("NFC", name).strip()
