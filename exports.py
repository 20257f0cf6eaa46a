"""Messenger exports → chats of `ChatMessage`s: Telegram Desktop JSON (one chat or the full account),
WhatsApp `.txt` / `.zip` (Android and iOS, every locale we have seen), Discord (DiscordChatExporter
JSON), Facebook Messenger / Instagram JSON ("download your information"), and the native JSON of
/upload-text.

Reading only: it marks what a line is (a message, a system notice, a media placeholder, a deleted
message) and leaves dropping, merging, splitting and masking to parser.clean. Bounded work: a zip is
unpacked member by member up to a byte budget, JSON nesting errors are caught. Knows nothing of HTTP.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
import zlib
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any

from chats import Chat, ChatMessage, ExportError, ExportTooLarge, Kind
from models import normalise_name
from whatsapp import looks_like_whatsapp, read_whatsapp

__all__ = ["Chat", "ChatMessage", "ExportError", "ExportTooLarge", "Kind", "normalise_name", "read_whatsapp"]

FORMATS = ("telegram", "whatsapp", "discord", "messenger", "native")
MAX_ZIP_MEMBERS = 50_000  # a WhatsApp export with media holds one file per photo; far beyond a real one


def read_export(data: bytes, filename: str, fmt: str = "auto", chat: str | None = None,
                max_unpacked: int = 256 * 1024 * 1024) -> list[Chat]:
    """The chats of an export. `chat` picks one chat of a full Telegram export (or one thread of a
    Messenger archive) by name or id; None or "all" takes every chat. A zip may unpack to at most
    `max_unpacked` bytes of chat files."""
    return read_chats(data, filename, fmt, chat, max_unpacked)[0]


def read_chats(data: bytes, filename: str, fmt: str = "auto", chat: str | None = None,
               max_unpacked: int = 256 * 1024 * 1024) -> tuple[list[Chat], str]:
    """read_export, and the format it read (detected when `fmt` is "auto")."""
    files = _unpack(data, filename, max_unpacked)
    if fmt == "auto":
        fmt = _detect(files)
    return _read(files, filename, fmt, chat), fmt


def _read(files: list[tuple[str, bytes]], filename: str, fmt: str, chat: str | None) -> list[Chat]:
    if fmt == "whatsapp":
        name, raw = next(((n, d) for n, d in files if n.lower().endswith("_chat.txt")), files[0])
        return [read_whatsapp(decode_text(raw), PurePosixPath(filename).stem or name)]
    if fmt in ("messenger", "instagram"):
        threads: dict[str, list] = {}
        for name, raw in files:  # a long thread comes as message_1.json, message_2.json, … in one folder
            threads.setdefault(PurePosixPath(name).parent.name or name, []).append(_json(raw))
        return _pick([read_messenger(_merged(docs), folder) for folder, docs in threads.items()], chat)
    document = _json(files[0][1])
    if fmt == "telegram":
        return read_telegram(document, chat)
    if fmt == "discord":
        return [read_discord(document)]
    if fmt == "native":
        return [read_native(document)]
    raise ExportError(f"unknown format {fmt!r}; use one of auto, {', '.join(FORMATS)}")


def detect_format(data: bytes, filename: str, max_unpacked: int = 256 * 1024 * 1024) -> str:
    return _detect(_unpack(data, filename, max_unpacked))


def _detect(files: list[tuple[str, bytes]]) -> str:
    name, data = files[0]
    if name.lower().endswith(".txt"):
        return "whatsapp"
    text = decode_text(data[:4096], partial=True).lstrip("\ufeff \t\r\n")
    if looks_like_whatsapp(text.lstrip("\u200e").split("\n", 1)[0].strip("\r")):  # before JSON: iOS lines start with "["
        return "whatsapp"
    if text[:1] in ("{", "["):
        document = _json(data)
        if isinstance(document, dict):
            first = next((m for m in document.get("messages") or [] if isinstance(m, dict)), {}) \
                if isinstance(document.get("messages"), list) else {}
            if "guild" in document and "channel" in document:
                return "discord"
            if "sender_name" in first or "timestamp_ms" in first or "participants" in document:
                return "messenger"
            if "messages" in document or "chats" in document:
                return "telegram"
        return "native"
    raise ExportError(
        "could not tell the format: expected a Telegram result.json, a WhatsApp .txt/.zip export, a Discord or "
        "Messenger JSON export, or the JSON of /upload-text; name it with the `format` field"
    )


def _pick(chats: list[Chat], chat: str | None) -> list[Chat]:
    if chat in (None, "", "all"):
        return chats
    chosen = [c for c in chats if chat in (c.name, c.id)]
    if not chosen:
        raise ExportError(f"no chat named or numbered {chat!r} in the export; its chats are {[c.name for c in chats]}")
    return chosen


# --- files: zip, text encodings, JSON -------------------------------------------------------------


def _unpack(data: bytes, filename: str, budget: int) -> list[tuple[str, bytes]]:
    """The chat files of an upload: the file itself, or the .txt/.json members of a zip, read as a
    stream and stopped at `budget` unpacked bytes (a zip bomb is never unpacked whole)."""
    if data[:4] != b"PK\x03\x04":
        return [(filename, data)]
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            if len(members) > MAX_ZIP_MEMBERS:
                raise ExportTooLarge(f"the .zip holds {len(members)} files; at most {MAX_ZIP_MEMBERS} are read")
            texts = [m for m in members if m.filename.lower().endswith(".txt") and not m.is_dir()]
            chats = [m for m in texts if m.filename.lower().endswith("_chat.txt")] or texts[:1]
            if not chats:
                chats = [m for m in members if re.search(r"(^|/)message_\d+\.json$", m.filename)]
            if not chats:
                chats = [m for m in members if m.filename.lower().endswith(".json")][:1]
            if not chats:
                raise ExportError("the .zip holds no chat file (expected _chat.txt, a .txt chat or message_1.json)")
            out, left = [], budget
            for member in chats:
                raw = _read_member(archive, member, left, budget)
                left -= len(raw)
                out.append((member.filename, raw))
            return out
    except ExportError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError, zlib.error, ValueError,
            OSError, struct.error) as exc:  # what a damaged or encrypted archive raises, by the member it breaks at
        raise ExportError(f"the .zip is damaged or unsupported: {exc}") from None


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, left: int, budget: int) -> bytes:
    too_large = ExportTooLarge(f"the .zip unpacks to more than {budget} bytes of chat files (4 × MAX_UPLOAD_BYTES); export a shorter chat")
    if member.file_size > left:
        raise too_large
    out = bytearray()
    with archive.open(member) as stream:  # the declared size may lie: count what is really unpacked
        while chunk := stream.read(1 << 20):
            out += chunk
            if len(out) > left:
                raise too_large
    return bytes(out)


def decode_text(data: bytes, partial: bool = False) -> str:
    """UTF-8 (with or without BOM) or UTF-16 (LE/BE, with BOM, or detected by its zero bytes)."""
    odd, even = data[1:4:2] == b"\x00\x00", data[0:3:2] == b"\x00\x00"  # ASCII as UTF-16 without BOM: every other byte zero
    encoding = ("utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-16-le" if odd and not even
                else "utf-16-be" if even and not odd else "utf-8-sig")
    try:
        return data.decode(encoding, errors="ignore" if partial else "strict")
    except UnicodeDecodeError as exc:
        raise ExportError(f"the file is not UTF-8 or UTF-16 text (byte {exc.start}); is it the right file?") from None


def _json(data: bytes) -> Any:
    try:
        return json.loads(decode_text(data))
    except json.JSONDecodeError as exc:
        raise ExportError(f"the file is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except RecursionError:
        raise ExportError("the JSON is nested too deeply to be a chat export") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ExportError(f"the file is not usable JSON: {exc}") from None


def parse_time(value: Any) -> datetime | None:
    """An ISO date, as naive UTC when it carries an offset, so aware and naive dates compare."""
    if not isinstance(value, str):
        return None
    try:
        return naive(datetime.fromisoformat(value))
    except ValueError:
        return None


def naive(time: datetime | None) -> datetime | None:
    if time is None or time.tzinfo is None:
        return time
    return time.astimezone(timezone.utc).replace(tzinfo=None)


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
        chats = document["chats"].get("list") if isinstance(document["chats"], dict) else None
        if not isinstance(chats, list):
            raise ExportError("Telegram full export: 'chats.list' is missing or not a list")
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
            time=parse_time(m.get("date")) or _unix_time(m.get("date_unixtime")),
            reply_to=m.get("reply_to_message_id") if isinstance(m.get("reply_to_message_id"), int) else None,
        ))
    return Chat(name=str(raw.get("name") or "chat"), id=str(raw["id"]) if raw.get("id") is not None else None, messages=out)


def _unix_time(value: Any) -> datetime | None:
    return _epoch(int(value)) if str(value).isdigit() else None


def _epoch(seconds: float) -> datetime | None:
    try:
        return datetime.fromtimestamp(seconds, timezone.utc).replace(tzinfo=None)
    except (OverflowError, OSError, ValueError):  # beyond year 9999
        return None


def telegram_text(value: Any) -> str:
    """`text` is a string, or a list of strings and entity objects that carry a `text` field."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(part if isinstance(part, str) else str(part.get("text", "")) if isinstance(part, dict) else "" for part in value)
    return ""


# --- Discord (DiscordChatExporter JSON) -----------------------------------------------------------

_DISCORD_MESSAGE_TYPES = ("Default", "Reply", "0", "19")


def read_discord(document: Any) -> Chat:
    messages = document.get("messages") if isinstance(document, dict) else None
    if not isinstance(messages, list):
        raise ExportError("a Discord export (DiscordChatExporter JSON) has a 'messages' list")
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
            id=_int(m.get("id")), time=parse_time(m.get("timestamp")), reply_to=_int(reference.get("messageId")),
        ))
    guild, channel = (document[k] if isinstance(document.get(k), dict) else {} for k in ("guild", "channel"))
    name = " / ".join(str(part) for part in (guild.get("name"), channel.get("name")) if part) or "discord"
    return Chat(name=name, id=str(channel["id"]) if channel.get("id") is not None else None, messages=out)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) else int(value) if isinstance(value, str) and value.isdigit() else None


# --- Facebook Messenger / Instagram ("download your information" JSON) ----------------------------

_FB_MEDIA_FIELDS = ("photos", "videos", "audio_files", "gifs", "files", "sticker", "share")
_FB_SYSTEM_TYPES = ("Call", "Subscribe", "Unsubscribe")
_FB_GENERATED = re.compile(r"\bsent an? (attachment|photo|video|link|GIF|sticker|voice message)\.?$", re.IGNORECASE)


def read_messenger(document: Any, name: str = "messenger") -> Chat:
    """Messages come newest first and their text is UTF-8 mis-encoded as latin-1 escapes."""
    messages = document.get("messages") if isinstance(document, dict) else None
    if not isinstance(messages, list):
        raise ExportError("a Messenger/Instagram export (message_1.json) has a 'messages' list")
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
        time = _epoch(ms / 1000) if isinstance(ms, (int, float)) and not isinstance(ms, bool) else None
        out.append(ChatMessage(speaker=repair_mojibake(str(m.get("sender_name") or "")), text=text, kind=kind, time=time))
    out.sort(key=lambda m: m.time or datetime.min)
    for i, m in enumerate(out):
        m.id = i
    title = document.get("title")
    return Chat(name=repair_mojibake(title) if isinstance(title, str) and title else name, id=name, messages=out)


def _merged(documents: list[Any]) -> Any:
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
