"""The per-speaker message files in `<DATA_DIR>`: store, deduplicate, list, read and delete samples.
Knows nothing of HTTP, exports or how samples are made; it takes samples and gives them back.

Each speaker has one JSON document, `<storage_name>_messages.json` (models.SpeakerFile), laid out
exactly as `SpeakerFile.model_dump_json(indent=1)` writes it, so `json.load` and the seed's readers
read it unchanged:

    {\\n "speaker": "Ann",\\n "version": 1,\\n "messages": [\\n  {...},\\n  {...}\\n ]\\n}

JSON escapes newlines inside strings, so a line that is exactly two spaces and "{" starts a sample,
two spaces and "}" ends one, and the document ends with TAIL. An append writes ",\\n<new samples>"
and TAIL over the old TAIL and fsyncs before it answers: it neither reads nor rewrites what is
stored. A kill mid-append leaves a torn tail; the next access cuts the file after its last complete
sample, checks that the rest parses, and replaces the file atomically (temporary file, fsync,
rename). A file in any other layout (an older writer's) is rewritten once in this one.
Why not rewrite the file per upload, as the seed did: with 50,000 samples (53 MB) that took 15 s per
one-message upload and made concurrent uploads time out; in place it takes 5 ms (bench/README.md).

Beside it, the sidecar `.<file>.index` (append-only text) holds each sample's id and byte offset,
and after each append the file's size, count and last upload: dedupe, `GET /speakers` and one page of
messages read it, not the file. It is trusted only when its last line names the file's current size;
otherwise it is rebuilt from the file, which is the source of truth. An in-process cache, keyed by
the file's size, inode and mtime, saves re-reading it (ids and offsets: ~10 MB per 50,000 samples).
Every access holds the speaker's file lock (threads and processes); one that cannot have it within
its bound raises StorageBusy (503, Retry-After). The lock file lives only as long as the messages file:
a read of a speaker with no file takes no lock, and an access that leaves no file removes it.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from filelock import FileLock, Timeout
from pydantic import TypeAdapter, ValidationError

from config import STORAGE_SUFFIX, storage_name
from errors import InsufficientStorage, ServiceError, StorageBusy, StorageError
from models import Sample, SpeakerFile

log = logging.getLogger("persona_lora.store")

TAIL = b"\n ]\n}"
SEPARATOR = b",\n"
LOCK_SECONDS = 10.0  # an append of one upload takes milliseconds; 10 s is hundreds of them queued
INDEX_VERSION = 1
_SAMPLES = TypeAdapter(list[Sample])


@dataclass
class Index:
    """What the sidecar says of a file of `size` bytes: its speaker, ids, offsets and last upload."""
    speaker: str
    size: int
    stamp: tuple[int, int]  # the file's inode and mtime when it was `size` bytes: another writer changes them
    ids: set[str]
    offsets: list[int]
    last_upload: datetime | None


@dataclass
class SpeakerSummary:
    speaker: str
    messages: int
    last_upload: datetime | None


@dataclass
class DamagedFile:
    """A messages file that cannot be read: the speaker as its file names them, and why."""
    speaker: str
    error: str


@dataclass
class AppendResult:
    path: Path
    added: int
    duplicates: int
    total: int


_cache: dict[Path, Index] = {}  # read and changed only under the file's lock


def speaker_file(data_dir: Path, speaker: str) -> Path:
    """The speaker's file, named by storage_name; this re-checks that it lies in the folder."""
    path = data_dir / f"{storage_name(speaker)}{STORAGE_SUFFIX}"
    if path.resolve().parent != data_dir.resolve():
        raise StorageError(f"speaker name {speaker!r} does not map to a file inside the data folder")
    return path


def index_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.index")


@contextmanager
def _locked(path: Path, wait: float):
    """Hold the file's lock, `.<file>.lock`. An access that ends with no file (nothing stored, or
    deleted) removes the lock file while it still holds it, so no lock names a speaker without
    messages: filelock (4.x) has a process that waited on a removed lock file try again on a new one."""
    lock_path = path.with_name(f".{path.name}.lock")
    lock = FileLock(str(lock_path), timeout=wait)
    try:
        lock.acquire()
    except Timeout:
        raise StorageBusy(f"the messages of {path.name[: -len(STORAGE_SUFFIX)]!r} are being written by other "
                          f"requests (waited {wait:g} s); retry in a second", retry_after=1) from None
    try:
        yield
    finally:
        try:
            if not path.exists():
                lock_path.unlink(missing_ok=True)
        finally:
            lock.release()


def storage_error(exc: OSError, path: Path) -> StorageError:
    """A disk problem as an error the user can act on; the stored messages are unchanged."""
    what = f"could not write {path.name}: {exc.strerror or exc}; the stored messages are unchanged"
    if exc.errno == errno.ENOSPC:
        return InsufficientStorage(f"{what}. Free disk space and retry.")
    return StorageError(f"{what}. Check that the data folder exists and is writable.")


@contextmanager
def _disk_errors(path: Path):
    try:
        yield
    except ServiceError:
        raise
    except OSError as exc:
        raise storage_error(exc, path) from exc


# --- the document's bytes -----------------------------------------------------------------------


def _item(sample: Sample) -> bytes:
    """A sample as it stands inside the document: indent=1, two levels in."""
    return b"\n".join(b"  " + line for line in sample.model_dump_json(indent=1).encode("utf-8").split(b"\n"))


def document(speaker: str, samples: list[Sample]) -> tuple[bytes, list[int]]:
    """The whole file, byte for byte what SpeakerFile.model_dump_json(indent=1) writes, and each
    sample's offset in it."""
    empty = SpeakerFile(speaker=speaker).model_dump_json(indent=1).encode("utf-8")
    if not samples:
        return empty, []
    head = empty[: empty.rindex(b"[]")] + b"[\n"
    parts, offsets, pos = [head], [], len(head)
    for i, sample in enumerate(samples):
        if i:
            parts.append(SEPARATOR)
            pos += len(SEPARATOR)
        item = _item(sample)
        offsets.append(pos)
        parts.append(item)
        pos += len(item)
    parts.append(TAIL)
    return b"".join(parts), offsets


def _atomic_write(path: Path, data: bytes, sync: bool = True) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --- the index ------------------------------------------------------------------------------------


def _index_lines(samples: list[Sample], offsets: list[int], size: int, count: int, last: datetime | None) -> bytes:
    lines = [f"s {s.id} {offset}\n" for s, offset in zip(samples, offsets)]
    lines.append(f"b {size} {count} {last.isoformat() if last else '-'}\n")
    return "".join(lines).encode("ascii")


def _read_index(path: Path, size: int) -> Index | None:
    """The sidecar's index when it describes the file as it is (`size` bytes), else None."""
    try:
        text = index_file(path).read_text(encoding="ascii")
        lines = text.split("\n")
        if lines.pop() != "" or not lines:  # a torn last line has no newline
            return None
        header = json.loads(lines[0])
        ids, offsets = set(), []
        for line in lines[1:-1]:
            kind, *fields = line.split(" ")
            if kind == "s":
                ids.add(fields[0])
                offsets.append(int(fields[1]))
        kind, end, count, stamp = lines[-1].split(" ")
        last = None if stamp == "-" else datetime.fromisoformat(stamp)
        if header.get("index") != INDEX_VERSION or kind != "b" or int(end) != size or int(count) != len(offsets):
            return None
        return Index(header["speaker"], size, (0, 0), ids, offsets, last)
    except (OSError, ValueError, KeyError, IndexError, AttributeError, TypeError):
        return None


def _write_index(path: Path, index: Index, samples: list[Sample]) -> None:
    header = json.dumps({"index": INDEX_VERSION, "speaker": index.speaker}).encode("ascii") + b"\n"
    _atomic_write(index_file(path), header + _index_lines(samples, index.offsets, index.size, len(index.offsets),
                                                          index.last_upload), sync=False)


def _rebuild(path: Path, raw: bytes) -> Index:
    """The index from the file itself: a torn tail is cut, another layout rewritten in this one."""
    stored, torn = _parse(path, raw)
    data, offsets = document(stored.speaker, stored.messages)
    if data != raw:
        log.warning("rewriting %s (%d bytes) as %d bytes: %s", path.name, len(raw), len(data),
                    "a torn end cut after its last whole message" if torn else "another layout")
        _atomic_write(path, data)
    st = path.stat()
    index = Index(stored.speaker, st.st_size, (st.st_ino, st.st_mtime_ns), {s.id for s in stored.messages}, offsets,
                  max((s.added_at for s in stored.messages), default=None))
    _write_index(path, index, stored.messages)
    return index


def _parse(path: Path, raw: bytes) -> tuple[SpeakerFile, bool]:
    """The stored file, and whether its torn end had to be cut (after the last whole sample)."""
    try:
        return SpeakerFile.model_validate_json(raw), False
    except ValidationError as exc:
        first = exc
    end = raw.rfind(b"\n  }")  # the end of the last complete sample, when an append was torn
    if end > 0:
        try:
            return SpeakerFile.model_validate_json(raw[: end + 4] + TAIL), True
        except ValidationError:
            pass
    raise StorageError(
        f"{path.name} is not a valid messages file ({first.error_count()} problems, first: "
        f"{first.errors()[0]['msg']}); nothing was changed. Repair or move it, then retry."
    ) from None


def _current(path: Path) -> Index | None:
    """The file's index, consistent with the file (repaired first if it was torn); None without a
    file. Call it holding the file's lock."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    with open(path, "rb") as f:
        f.seek(max(0, st.st_size - len(TAIL)))
        whole = f.read(len(TAIL)) == TAIL
    cached = _cache.get(path)
    if whole and cached and (cached.size, cached.stamp) == (st.st_size, (st.st_ino, st.st_mtime_ns)):
        return cached
    index = _read_index(path, st.st_size) if whole else None
    if index is None:
        index = _rebuild(path, path.read_bytes())
    else:
        index.stamp = (st.st_ino, st.st_mtime_ns)
    _cache[path] = index
    return index


# --- what the service calls -------------------------------------------------------------------------


def append_samples(data_dir: Path, speaker: str, samples: list[Sample], wait: float = LOCK_SECONDS) -> AppendResult:
    """Add the samples not stored yet, under the speaker's lock; durable (fsynced) when it returns."""
    path = speaker_file(data_dir, speaker)
    with _disk_errors(path):
        data_dir.mkdir(parents=True, exist_ok=True)
        with _locked(path, wait):
            index = _current(path)
            known = set() if index is None else index.ids
            before = 0 if index is None else len(index.offsets)
            new, seen = [], set()
            for sample in samples:
                if sample.id not in known and sample.id not in seen:
                    seen.add(sample.id)
                    new.append(sample)
            if new and (index is None or not index.offsets):
                _write_new(path, speaker if index is None else index.speaker, new)
            elif new:
                _append_in_place(path, index, new)
            return AppendResult(path, added=len(new), duplicates=len(samples) - len(new), total=before + len(new))


def _write_new(path: Path, speaker: str, samples: list[Sample]) -> None:
    data, offsets = document(speaker, samples)
    _atomic_write(path, data)
    st = path.stat()
    index = Index(speaker, st.st_size, (st.st_ino, st.st_mtime_ns), {s.id for s in samples}, offsets,
                  max(s.added_at for s in samples))
    _write_index(path, index, samples)
    _cache[path] = index


def _append_in_place(path: Path, index: Index, new: list[Sample]) -> None:
    start = index.size - len(TAIL)
    parts, offsets, pos = [], [], start
    for sample in new:
        item = _item(sample)
        offsets.append(pos + len(SEPARATOR))
        parts += [SEPARATOR, item]
        pos += len(SEPARATOR) + len(item)
    parts.append(TAIL)
    _cache.pop(path, None)  # until the append and its index are complete
    with open(path, "r+b") as f:
        try:
            f.seek(start)
            f.write(b"".join(parts))
            f.flush()
            os.fsync(f.fileno())
        except OSError:  # a full disk: put the old end back, so the stored messages stay as they were
            f.truncate(start)
            f.seek(start)
            f.write(TAIL)
            f.flush()
            os.fsync(f.fileno())
            raise
    st = path.stat()
    index.ids.update(s.id for s in new)
    index.offsets += offsets
    index.size, index.stamp = st.st_size, (st.st_ino, st.st_mtime_ns)
    index.last_upload = max([s.added_at for s in new] + ([index.last_upload] if index.last_upload else []))
    try:
        with open(index_file(path), "ab") as f:
            f.write(_index_lines(new, offsets, index.size, len(index.offsets), index.last_upload))
    except OSError as exc:  # the messages are stored; the next access rebuilds the index from them
        log.warning("could not append to %s: %s", index_file(path).name, exc)
        return
    _cache[path] = index


def summary(data_dir: Path, speaker: str, wait: float = LOCK_SECONDS) -> SpeakerSummary | None:
    """The speaker's count and last upload, from the index; None when nothing is stored."""
    path = speaker_file(data_dir, speaker)
    return _summary(path, wait)


def _summary(path: Path, wait: float) -> SpeakerSummary | None:
    if not path.exists():  # a read of a speaker with no file writes nothing, not even a lock
        return None
    with _disk_errors(path), _locked(path, wait):
        index = _current(path)
    return SpeakerSummary(index.speaker, len(index.offsets), index.last_upload) if index else None


def list_speakers(data_dir: Path, wait: float = LOCK_SECONDS) -> list[SpeakerSummary | DamagedFile]:
    """Every speaker with stored messages, by name (the one inside the file, not the file's name).
    A damaged file is listed as a DamagedFile, so it hides no other speaker."""
    listed: list[SpeakerSummary | DamagedFile] = []
    for path in data_dir.glob(f"*{STORAGE_SUFFIX}") if data_dir.exists() else []:
        try:
            if one := _summary(path, wait):
                listed.append(one)
        except StorageBusy:
            raise
        except StorageError as exc:
            listed.append(DamagedFile(path.name[: -len(STORAGE_SUFFIX)], str(exc.detail)))
    return sorted(listed, key=lambda one: one.speaker)


def read_messages(data_dir: Path, speaker: str, offset: int, limit: int,
                  wait: float = LOCK_SECONDS) -> tuple[list[Sample], int] | None:
    """Samples offset..offset+limit (oldest first) and the count, reading only their bytes; None
    when nothing is stored."""
    path = speaker_file(data_dir, speaker)
    if not path.exists():
        return None
    with _disk_errors(path), _locked(path, wait):
        index = _current(path)
        if index is None:
            return None
        count = len(index.offsets)
        lo, hi = min(offset, count), min(offset + limit, count)
        if lo == hi:
            return [], count
        end = index.offsets[hi] - len(SEPARATOR) if hi < count else index.size - len(TAIL)
        with open(path, "rb") as f:
            f.seek(index.offsets[lo])
            chunk = f.read(end - index.offsets[lo])
    return _SAMPLES.validate_json(b"[" + chunk + b"]"), count


def load_speaker(data_dir: Path, speaker: str, wait: float = LOCK_SECONDS) -> SpeakerFile | None:
    """The whole stored file, or None when the speaker has none. A damaged file raises StorageError."""
    path = speaker_file(data_dir, speaker)
    if not path.exists():
        return None
    with _disk_errors(path), _locked(path, wait):
        if _current(path) is None:
            return None
        raw = path.read_bytes()
    return _parse(path, raw)[0]


def delete_speaker(data_dir: Path, speaker: str, wait: float = LOCK_SECONDS) -> list[Path]:
    """Remove every file holding the speaker's messages (the file and its index), under its lock;
    the paths removed (none when nothing was stored)."""
    path = speaker_file(data_dir, speaker)
    removed = []
    if not (path.exists() or index_file(path).exists()):
        return removed
    with _disk_errors(path), _locked(path, wait):  # which removes the lock file with the file
        _cache.pop(path, None)
        for one in (path, index_file(path)):
            if one.exists():
                one.unlink()
                removed.append(one)
    return removed


def clean_temporaries(data_dir: Path, speaker: str | None = None, wait: float = LOCK_SECONDS) -> list[Path]:
    """Remove the temporary files that writes killed mid-way left (`.<file>.<random>.tmp`; they may
    hold messages): the speaker's, or every speaker's at start-up. Each is removed under its file's
    lock, so a write in progress keeps its own. The paths removed."""
    if not data_dir.is_dir():
        return []
    pattern = f".{glob.escape(speaker_file(data_dir, speaker).name)}.*.tmp" if speaker else f".*{STORAGE_SUFFIX}.*.tmp"
    removed = []
    for tmp in sorted(data_dir.glob(pattern)):
        target = tmp.with_name(tmp.name[1:].rsplit(".", 2)[0])  # `.X_messages.json.k3j2.tmp` → X_messages.json
        try:
            with _locked(target, wait):
                tmp.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise storage_error(exc, tmp) from exc
        removed.append(tmp)
    return removed
