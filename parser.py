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
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock
from pydantic import ValidationError

from errors import InsufficientStorage, ServiceError, StorageError
from models import Sample, SpeakerFile, Turn


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
