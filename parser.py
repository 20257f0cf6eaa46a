"""Dialogs → per-speaker training samples, and their storage in `<DATA_DIR>/<speaker>_messages.json`.

A sample is one message of the speaker (the reply) plus up to `max_context_turns` turns before it
(the context it answered). Knows nothing of HTTP or models: it takes turns and returns samples.

Storage is append-only with dedupe: a sample's id hashes its context and reply, so uploading the same
dialog twice stores nothing new. Every write takes a per-speaker file lock (threads and processes),
writes a temporary file, fsyncs it and renames it over the old one: a crash leaves either the old
file or the new one, never a torn one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock
from pydantic import ValidationError

from errors import InsufficientStorage, ServiceError, StorageError
from exports import Chat, ChatMessage, detect_format, normalise_name, read_export
from models import CleaningOptions, Sample, SpeakerFile, Turn


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


def speaker_file(data_dir: Path, speaker: str) -> Path:
    """The speaker's file; the name was validated (models.SpeakerName), this re-checks the folder."""
    path = data_dir / f"{speaker}_messages.json"
    if path.resolve().parent != data_dir.resolve():
        raise StorageError(f"speaker name {speaker!r} does not map to a file inside the data folder")
    return path


def _lock(path: Path) -> FileLock:
    return FileLock(str(path.with_name(f".{path.name}.lock")), timeout=60)


def load_speaker(data_dir: Path, speaker: str) -> SpeakerFile | None:
    """The stored file, or None when the speaker has none. A damaged file raises StorageError."""
    path = speaker_file(data_dir, speaker)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return SpeakerFile.model_validate_json(raw)
    except ValidationError as exc:
        raise StorageError(
            f"{path} is not a valid messages file ({exc.error_count()} problems, first: "
            f"{exc.errors()[0]['msg']}); nothing was changed. Repair or move it, then retry."
        ) from None


@dataclass
class AppendResult:
    path: Path
    added: int
    duplicates: int
    total: int


def append_samples(data_dir: Path, speaker: str, samples: list[Sample]) -> AppendResult:
    """Add the samples not stored yet, atomically, under the speaker's lock."""
    path = speaker_file(data_dir, speaker)
    try:
        return _append_locked(data_dir, path, speaker, samples)
    except ServiceError:
        raise
    except OSError as exc:
        raise storage_error(exc, path) from exc


def storage_error(exc: OSError, path: Path) -> StorageError:
    """A disk problem as an error the user can act on; the stored messages are unchanged."""
    what = f"could not write {path}: {exc.strerror or exc}; the stored messages are unchanged"
    if exc.errno == errno.ENOSPC:
        return InsufficientStorage(f"{what}. Free disk space and retry.")
    return StorageError(f"{what}. Check that the data folder exists and is writable.")


def _append_locked(data_dir: Path, path: Path, speaker: str, samples: list[Sample]) -> AppendResult:
    data_dir.mkdir(parents=True, exist_ok=True)
    with _lock(path):
        stored = load_speaker(data_dir, speaker) or SpeakerFile(speaker=speaker)
        known = {s.id for s in stored.messages}
        new = []
        for sample in samples:
            if sample.id not in known:
                known.add(sample.id)
                new.append(sample)
        if new:
            stored.messages.extend(new)
            _atomic_write(path, stored.model_dump_json(indent=1).encode("utf-8"))
        return AppendResult(path, added=len(new), duplicates=len(samples) - len(new), total=len(stored.messages))


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- exports: cleaning and samples with reply context ---------------------------------------------

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
_PHONE = re.compile(r"(?<![\w+])\+?\d[\d ()-]{7,}\d\b")


def mask_pii(text: str) -> tuple[str, int]:
    """E-mail addresses, card-like numbers (13-19 digits) and phone numbers become placeholders."""
    total = 0
    for pattern, label in ((_EMAIL, "[email]"), (_CARD, "[card]"), (_PHONE, "[phone]")):
        text, n = pattern.subn(label, text)
        total += n
    return text, total


def clean(chat: Chat, options: CleaningOptions, aliases: dict[str, str]) -> tuple[list[list[ChatMessage]], dict[str, int]]:
    """Apply the cleaning steps in order; return the chat's dialogs and what each step removed."""
    report = {"messages_read": len(chat.messages), "renamed_by_alias": 0, "dropped_system": 0, "dropped_media": 0,
              "dropped_deleted": 0, "masked_pii": 0, "dropped_empty": 0, "merged": 0, "dialogs": 0}
    kept: list[ChatMessage] = []
    for m in chat.messages:
        m = ChatMessage(**{**m.__dict__, "speaker": normalise_name(m.speaker), "merged_ids": list(m.merged_ids)})
        if m.speaker in aliases:
            m.speaker = aliases[m.speaker]
            report["renamed_by_alias"] += 1
        if options.drop_system and m.kind == "system":
            report["dropped_system"] += 1
            continue
        if options.drop_media and m.kind in ("media", "deleted"):
            report["dropped_media" if m.kind == "media" else "dropped_deleted"] += 1
            continue
        if options.mask_pii:
            m.text, n = mask_pii(m.text)
            report["masked_pii"] += n
        if options.drop_empty and (not m.text.strip() or not m.speaker):
            report["dropped_empty"] += 1
            continue
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
            previous.text += "\n" + m.text
            previous.merged_ids.append(m.id)
            previous.time = m.time or previous.time
            report["merged"] += 1
        else:
            dialogs[-1].append(m)
    report["dialogs"] = len(dialogs)
    return dialogs, report


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
    options: CleaningOptions, max_context_turns: int, tokenizer_file: Path | None,
) -> ImportResult:
    """Read, clean and turn an export into the speaker's samples. ExportError for unreadable
    files; UnknownSpeaker when the speaker does not occur in the cleaned chats."""
    fmt = detect_format(data, filename) if fmt == "auto" else fmt
    chats = read_export(data, filename, fmt, chat)
    aliases = {normalise_name(k): normalise_name(v) for k, v in aliases.items()}
    report: dict[str, int] = {}
    per_chat = []
    for one in chats:
        dialogs, steps = clean(one, options, aliases)
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


class UnknownSpeaker(ValueError):
    def __init__(self, speaker: str, names: list[str]):
        super().__init__(f"speaker '{speaker}' does not occur in the export (after aliases and cleaning); its speakers are {names}")


def _token_counter(tokenizer_file: Path | None):
    if tokenizer_file is None:
        return lambda text: len(text.split())
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def list_speakers(data_dir: Path) -> list[SpeakerFile]:
    """Every speaker with stored messages, by name. Damaged files raise StorageError."""
    files = sorted(data_dir.glob("*_messages.json")) if data_dir.exists() else []
    return [stored for path in files if (stored := load_speaker(data_dir, path.name[: -len("_messages.json")]))]


def delete_speaker(data_dir: Path, speaker: str) -> Path | None:
    """Remove the speaker's messages file (under its lock); the path, or None when there was none."""
    path = speaker_file(data_dir, speaker)
    try:
        with _lock(path):
            if not path.exists():
                return None
            path.unlink()
        path.with_name(f".{path.name}.lock").unlink(missing_ok=True)
    except OSError as exc:
        raise storage_error(exc, path) from exc
    return path
