"""An upload → its chats: unpack (a zip member by member, up to a byte budget), decode (UTF-8 or
UTF-16), tell the format, and hand the files to that messenger's reader; and the native JSON of
/upload-text.

Bounded work: a zip bomb is never unpacked whole, JSON nesting errors are caught. Knows nothing of
any one messenger's fields (its module does), of cleaning (parser.clean) or of HTTP.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
import zlib
from pathlib import PurePosixPath
from typing import Any

from importers.discord import read_discord
from importers.messenger import merged_thread, read_messenger
from config import EXPORT_MESSAGES_DEFAULT
from importers.record import Chat, ChatMessage, ExportError, ExportTooLarge, MessageBudget
from importers.telegram import read_telegram
from importers.whatsapp import looks_like_whatsapp, read_whatsapp

FORMATS = ("telegram", "whatsapp", "discord", "messenger", "native")
MAX_ZIP_MEMBERS = 50_000  # a WhatsApp export with media holds one file per photo; far beyond a real one


def read_export(data: bytes, filename: str, fmt: str = "auto", chat: str | None = None,
                max_unpacked: int = 256 * 1024 * 1024, max_messages: int = EXPORT_MESSAGES_DEFAULT) -> list[Chat]:
    """The chats of an export. `chat` picks one chat of a full Telegram export (or one thread of a
    Messenger archive) by name or id; None or "all" takes every chat. A zip may unpack to at most
    `max_unpacked` bytes of chat files; the export may hold at most `max_messages` messages (MessageBudget)."""
    return read_chats(data, filename, fmt, chat, max_unpacked, max_messages)[0]


def read_chats(data: bytes, filename: str, fmt: str = "auto", chat: str | None = None,
               max_unpacked: int = 256 * 1024 * 1024, max_messages: int = EXPORT_MESSAGES_DEFAULT) -> tuple[list[Chat], str]:
    """read_export, and the format it read (detected when `fmt` is "auto")."""
    files, budget = _unpack(data, filename, max_unpacked), MessageBudget(max_messages)
    document = None
    if fmt == "auto":
        fmt, document = _detect(files, budget)
    return _read(files, filename, fmt, chat, budget, document), fmt


def _read(files: list[tuple[str, bytes]], filename: str, fmt: str, chat: str | None, budget: MessageBudget,
          first: Any = None) -> list[Chat]:
    """`first`: the first file's JSON when detection has parsed it already (parsed once, counted once)."""
    if fmt == "whatsapp":
        name, raw = next(((n, d) for n, d in files if n.lower().endswith("_chat.txt")), files[0])
        return [read_whatsapp(decode_text(raw), PurePosixPath(filename).stem or name, budget)]
    documents = [first if i == 0 and first is not None else None for i in range(len(files))]
    if fmt in ("messenger", "instagram"):
        threads: dict[str, list] = {}
        for (name, raw), document in zip(files, documents):  # a long thread: message_1.json, message_2.json, … in one folder
            threads.setdefault(PurePosixPath(name).parent.name or name, []).append(
                document if document is not None else _json(raw, budget))
        return _pick([read_messenger(merged_thread(docs), folder, budget) for folder, docs in threads.items()], chat)
    document = documents[0] if documents[0] is not None else _json(files[0][1], budget)
    if fmt == "telegram":
        return read_telegram(document, chat, budget)
    if fmt == "discord":
        return [read_discord(document, budget)]
    if fmt == "native":
        return [read_native(document, budget)]
    raise ExportError(f"unknown format {fmt!r}; use one of auto, {', '.join(FORMATS)}")


def detect_format(data: bytes, filename: str, max_unpacked: int = 256 * 1024 * 1024,
                  max_messages: int = EXPORT_MESSAGES_DEFAULT) -> str:
    return _detect(_unpack(data, filename, max_unpacked), MessageBudget(max_messages))[0]


def _detect(files: list[tuple[str, bytes]], budget: MessageBudget) -> tuple[str, Any]:
    """The format, and the first file's JSON when it had to be parsed to tell (None for text)."""
    name, data = files[0]
    if name.lower().endswith(".txt"):
        return "whatsapp", None
    text = decode_text(data[:4096], partial=True).lstrip("\ufeff \t\r\n")
    if looks_like_whatsapp(text.lstrip("\u200e").split("\n", 1)[0].strip("\r")):  # before JSON: iOS lines start with "["
        return "whatsapp", None
    if text[:1] in ("{", "["):
        document = _json(data, budget)
        if isinstance(document, dict):
            first = next((m for m in document.get("messages") or [] if isinstance(m, dict)), {}) \
                if isinstance(document.get("messages"), list) else {}
            if "guild" in document and "channel" in document:
                return "discord", document
            if "sender_name" in first or "timestamp_ms" in first or "participants" in document:
                return "messenger", document
            if "messages" in document or "chats" in document:
                return "telegram", document
        return "native", document
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


def _json(data: bytes, budget: MessageBudget) -> Any:
    budget.take_json(data)
    try:
        return json.loads(decode_text(data))
    except json.JSONDecodeError as exc:
        raise ExportError(f"the file is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except RecursionError:
        raise ExportError("the JSON is nested too deeply to be a chat export") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ExportError(f"the file is not usable JSON: {exc}") from None


# --- native -------------------------------------------------------------------------------------


def read_native(document: Any, budget: MessageBudget | None = None) -> Chat:
    turns = document.get("dialog") if isinstance(document, dict) else document
    if not isinstance(turns, list):
        raise ExportError('native JSON must be {"dialog": [{"speaker": ..., "content": ...}, ...]} or such a list')
    if budget:
        budget.take(len(turns))
    messages = []
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("speaker"), str) and isinstance(turn.get("content"), str)):
            raise ExportError(f"dialog item {i}: expected {{\"speaker\": string, \"content\": string}}")
        messages.append(ChatMessage(speaker=turn["speaker"], text=turn["content"], id=i))
    return Chat(name="dialog", id=None, messages=messages)


