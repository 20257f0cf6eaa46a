"""Dialogs and exports → cleaned per-speaker training samples.

A sample is one message of the speaker (the reply) plus up to `max_context_turns` turns before it
(the context it answered); its id hashes context and reply, so store.py stores an uploaded dialog
once however often it comes. Knows nothing of HTTP, models or storage: it takes turns or an export's
bytes and returns samples.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import phonenumbers

from config import EXPORT_MESSAGES_DEFAULT
from importers import Chat, ChatMessage, naive, read_chats
from models import (
    MAX_MESSAGE_CHARS,
    NAME_MAX_CHARS,
    CleaningOptions,
    ExportInspection,
    ParticipantStats,
    Sample,
    Turn,
    normalise_name,
    refused_in_name,
)


def build_samples(dialog: list[Turn], speaker: str, max_context_turns: int) -> tuple[list[Sample], int]:
    """Return the speaker's samples and how many of their messages were empty (and skipped)."""
    now = datetime.now(timezone.utc)
    samples, empty = [], 0
    for i, turn in enumerate(dialog):
        if turn.speaker != speaker:
            continue
        if not turn.content.strip():
            empty += 1
            continue
        context = dialog[max(0, i - max_context_turns) : i]
        samples.append(Sample(id=sample_id(context, turn.content), context=context, reply=turn.content, added_at=now))
    return samples, empty


def sample_id(context: list[Turn], reply: str) -> str:
    payload = json.dumps([[t.speaker, t.content] for t in context] + [reply], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# --- exports: cleaning and samples with reply context ---------------------------------------------

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}")  # bounded: linear time
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_DIGIT_RUN = re.compile(r"\d(?:\D{0,2}\d){5}")  # six digits close together: a line worth a local phone search
NO_SENDER = "(no sender)"  # the speaker of kept system lines that have none


def mask_pii(text: str, phone_region: str | None = None) -> tuple[str, int]:
    """E-mail addresses, card numbers (13-19 digits passing the Luhn check) and phone numbers
    (libphonenumber, valid numbers only) become placeholders: in international form always, and in
    the local form of `phone_region` (e.g. "UA": 067 123 45 67) when one is given. Linear time: every
    pattern is bounded, and the phone matcher gets a number of tries proportional to the line."""
    text, emails = _EMAIL.subn("[email]", text)
    found: list[str] = []
    text = _CARD.sub(lambda m: found.append(m[0]) or "[card]" if _luhn(m[0]) and not _isbn13(m[0]) else m[0], text)
    cards = len(found)
    phones = 0
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if "+" not in line and not (phone_region and _DIGIT_RUN.search(line)):
            continue
        spans = [(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(
            line, phone_region, leniency=phonenumbers.Leniency.VALID, max_tries=100 + len(line) // 20)]
        for start, end in reversed(spans):
            line = line[:start] + "[phone]" + line[end:]
        phones += len(spans)
        lines[i] = line
    return "\n".join(lines), emails + cards + phones


def _digits(text: str) -> list[int]:
    return [int(ch) for ch in text if ch.isdigit()]


def _luhn(text: str) -> bool:
    digits = _digits(text)[::-1]
    return sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(digits)) % 10 == 0


def _isbn13(text: str) -> bool:
    digits = _digits(text)
    return len(digits) == 13 and text[:3] in ("978", "979") and sum(d * (3 if i % 2 else 1) for i, d in enumerate(digits)) % 10 == 0


def clean(chat: Chat, options: CleaningOptions, aliases: dict[str, str],
          phone_region: str | None = None) -> tuple[list[list[ChatMessage]], dict[str, int]]:
    """Apply the cleaning steps in order; return the chat's dialogs and what each step removed."""
    report = {"messages_read": len(chat.messages), "skipped_lines": chat.skipped_lines, "renamed_by_alias": 0, "dropped_system": 0, "dropped_media": 0,
              "dropped_deleted": 0, "masked_pii": 0, "dropped_empty": 0, "cut_long": 0, "merged": 0,
              "merge_capped": 0, "dialogs": 0}
    kept: list[ChatMessage] = []
    for m in chat.messages:
        m = ChatMessage(**{**m.__dict__, "speaker": display_name(m.speaker), "text": _scrub(m.text),
                           "time": naive(m.time), "merged_ids": list(m.merged_ids)})
        if m.speaker in aliases:
            m.speaker = aliases[m.speaker]
            report["renamed_by_alias"] += 1
        if options.drop_system and m.kind == "system":
            report["dropped_system"] += 1
            continue
        if options.drop_media and m.kind in ("media", "deleted"):
            report["dropped_media" if m.kind == "media" else "dropped_deleted"] += 1
            continue
        if len(m.text) > MAX_MESSAGE_CHARS:
            m.text = m.text[:MAX_MESSAGE_CHARS]
            report["cut_long"] += 1
        if options.mask_pii:
            m.text, n = mask_pii(m.text, phone_region)
            m.text = m.text[:MAX_MESSAGE_CHARS]
            report["masked_pii"] += n
        if options.drop_empty and (not m.text.strip() or not m.speaker):
            report["dropped_empty"] += 1
            continue
        m.speaker = m.speaker or NO_SENDER
        kept.append(m)

    dialogs: list[list[ChatMessage]] = []
    gap = options.split_gap_minutes * 60
    for m in kept:
        previous = dialogs[-1][-1] if dialogs and dialogs[-1] else None
        new_dialog = previous is None or (
            gap > 0 and m.time and previous.time and (m.time - previous.time).total_seconds() > gap
        )
        if new_dialog:
            dialogs.append([m])
        elif options.merge_consecutive and previous.speaker == m.speaker:
            if len(previous.text) + 1 + len(m.text) > MAX_MESSAGE_CHARS:  # a turn stays within MAX_MESSAGE_CHARS
                dialogs[-1].append(m)
                report["merge_capped"] += 1
                continue
            previous.text += "\n" + m.text
            previous.merged_ids.append(m.id)
            previous.time = m.time or previous.time
            report["merged"] += 1
        else:
            dialogs[-1].append(m)
    report["dialogs"] = len(dialogs)
    return dialogs, report


def display_name(name: str) -> str:
    """A speaker of an export as a valid models.DisplayName: NFC, invisible marks stripped at the
    ends, a run of line, paragraph or field separators inside as one space, and no other character
    models.refused_in_name refuses (controls, direction overrides), at most NAME_MAX_CHARS."""
    name = _SEPARATORS.sub(" ", normalise_name(_scrub(name)))
    name = "".join(ch for ch in name if not refused_in_name(ch))
    return normalise_name(name[:NAME_MAX_CHARS])


_SEPARATORS = re.compile(r"[\t\n\v\f\r\x1c-\x1f\x85\u2028\u2029]+")  # the characters str.splitlines splits at, and tab


def _scrub(text: str) -> str:
    """Lone surrogates (from JSON "\\ud800") cannot be written as UTF-8: they become U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def dialog_samples(dialogs: list[list[ChatMessage]], speaker: str, max_context_turns: int) -> list[Sample]:
    """The speaker's samples: each reply with up to `max_context_turns` turns before it, and the
    message it explicitly replied to (Telegram's reply_to_message_id) first when that lies further back."""
    now = datetime.now(timezone.utc)
    by_id = {i: m for dialog in dialogs for m in dialog for i in (m.id, *m.merged_ids) if i is not None}
    samples = []
    for dialog in dialogs:
        for i, m in enumerate(dialog):
            if m.speaker != speaker:
                continue
            window = dialog[max(0, i - max_context_turns) : i]
            target = by_id.get(m.reply_to) if m.reply_to is not None else None
            if target is not None and target is not m and all(target is not w for w in window):
                window = [target, *window]
            context = [Turn(speaker=w.speaker, content=w.text) for w in window]
            samples.append(Sample(id=sample_id(context, m.text), context=context, reply=m.text, added_at=now))
    return samples


@dataclass
class ImportResult:
    fmt: str
    chats: list[str]
    samples: list[Sample]
    report: dict[str, int]
    speakers: dict[str, dict[str, int]]
    token_counter: str


def import_export(
    data: bytes, filename: str, speaker: str, fmt: str, chat: str | None, aliases: dict[str, str],
    options: CleaningOptions, max_context_turns: int, tokenizer_file: Path | None, max_unpacked: int = 256 * 1024 * 1024,
    phone_region: str | None = None, max_messages: int = EXPORT_MESSAGES_DEFAULT,
) -> ImportResult:
    """Read, clean and turn an export into the speaker's samples. ExportError for unreadable
    files; UnknownSpeaker when the speaker does not occur in the cleaned chats."""
    chats, fmt = read_chats(data, filename, fmt, chat, max_unpacked, max_messages)
    aliases = {display_name(k): display_name(v) for k, v in aliases.items()}
    report: dict[str, int] = {}
    per_chat = []
    for one in chats:
        dialogs, steps = clean(one, options, aliases, phone_region)
        per_chat.append(dialogs)
        for key, value in steps.items():
            report[key] = report.get(key, 0) + value
    count = _token_counter(tokenizer_file)
    speakers: dict[str, dict[str, int]] = {}
    for m in (m for dialogs in per_chat for dialog in dialogs for m in dialog):
        stats = speakers.setdefault(m.speaker, {"messages": 0, "tokens": 0})
        stats["messages"] += 1
        stats["tokens"] += count(m.text)
    if speaker not in speakers:
        raise UnknownSpeaker(speaker, sorted(speakers))
    samples = [s for dialogs in per_chat for s in dialog_samples(dialogs, speaker, max_context_turns)]
    return ImportResult(fmt, [c.name for c in chats], samples, report, speakers,
                        "tokenizer" if tokenizer_file else "words")


def inspect_export(data: bytes, filename: str, fmt: str, chat: str | None, max_unpacked: int,
                   max_messages: int = EXPORT_MESSAGES_DEFAULT) -> ExportInspection:
    """What an export holds, read but not cleaned or stored: format, chats, date range, participants."""
    chats, fmt = read_chats(data, filename, fmt, chat, max_unpacked, max_messages)
    messages = [m for one in chats for m in one.messages]
    times = [t for m in messages if (t := naive(m.time))]
    counts = Counter(display_name(m.speaker) for m in messages if m.kind == "message" and display_name(m.speaker))
    return ExportInspection(
        format=fmt, chats=[one.name for one in chats], first_message=min(times, default=None),
        last_message=max(times, default=None),
        participants=[ParticipantStats(name=name, messages=n) for name, n in counts.most_common()],
    )


class UnknownSpeaker(ValueError):
    def __init__(self, speaker: str, names: list[str]):
        super().__init__(f"speaker '{speaker}' does not occur in the export (after aliases and cleaning); its speakers are {names}")


def _token_counter(tokenizer_file: Path | None):
    if tokenizer_file is None:
        return lambda text: len(text.split())
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)
