"""Messenger exports → chats of `ChatMessage`s: Telegram Desktop JSON (one chat or the full account),
WhatsApp `.txt` / `.zip` (Android and iOS, every locale we have seen), Discord (DiscordChatExporter
JSON), Facebook Messenger / Instagram JSON ("download your information"), and the native JSON of
/upload-text.

Owns: detecting and unpacking an upload (`detect`), one reader per messenger (`telegram`,
`whatsapp`, `discord`, `messenger`), and the record they all produce (`record`). Reading only: it
marks what a line is (a message, a system notice, a media placeholder, a deleted message) and
leaves dropping, merging, splitting and masking to parser.clean. Knows nothing of speakers' files,
models, training or HTTP.
"""

from importers.detect import (
           FORMATS,
           MAX_ZIP_MEMBERS,
           decode_text,
           detect_format,
           read_chats,
           read_export,
           read_native,
)
from importers.record import (
           Chat,
           ChatMessage,
           ExportError,
           ExportTooLarge,
           Kind,
           naive,
           parse_time,
)
from importers.telegram import read_telegram, telegram_text
from importers.whatsapp import read_whatsapp

__all__ = ["FORMATS", "MAX_ZIP_MEMBERS", "Chat", "ChatMessage", "ExportError", "ExportTooLarge", "Kind", "decode_text",
           "detect_format", "naive", "parse_time", "read_chats", "read_export", "read_native", "read_telegram",
           "read_whatsapp", "telegram_text"]
