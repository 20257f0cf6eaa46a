"""The adapter folders under OUTPUT_DIR: one per speaker, written whole or not at all.

A new adapter is written into a temporary folder and swapped into place by renames; its
`training_info.json` is written last, so a folder that has one is complete. This module reads that
file, lists and deletes adapters, and cleans what interrupted runs left: a speaker's when their job
dies or they are deleted, everyone's at start-up. Every folder it makes beside the adapters is named
`<prefix><storage_name>-<8 hex>`, so it tells whose each is: `.tmp-` a new adapter being written,
`.old-` the adapter it replaces (between the swap's two renames), `.del-` a deleted one being removed.

Knows nothing of models, training or HTTP: it moves folders and reads JSON.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Any

from config import path_in, storage_name

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
TRASH_PREFIX = ".del-"  # not ".tmp-deleted-": that would read as a `.tmp-` folder of a speaker "deleted-…"
INFO_FILE = "training_info.json"
_TAIL = re.compile(r"-[0-9a-f]{8}")  # uuid4().hex[:8]: no "-", so a name that ends in "-<8 hex>" stays apart


def folder(output_root: Path, speaker: str) -> Path | None:
    """The speaker's adapter folder, named by config.storage_name (existing or not); None for a name
    that would lead outside."""
    try:
        return path_in(output_root, storage_name(speaker))
    except ValueError:
        return None


def new_tmp(output_root: Path, speaker: str) -> Path:
    """A fresh, empty temporary folder to write the speaker's next adapter into; removed at the next
    start if the run dies before `install`."""
    tmp = output_root / f"{TMP_PREFIX}{storage_name(speaker)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def install(tmp: Path, output_root: Path, speaker: str, info: dict[str, Any]) -> Path:
    """Write `info` as the marker of the complete folder `tmp`, then put it at the speaker's place;
    the old adapter stays in place until the new one is there."""
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    final = path_in(output_root, storage_name(speaker))
    old = output_root / f"{OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def info(output_root: Path, speaker: str) -> dict[str, Any] | None:
    """The adapter's training_info.json, or None when the speaker has no complete adapter."""
    place = folder(output_root, speaker)
    if place is None:
        return None
    try:
        return json.loads((place / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def archive(output_root: Path, speaker: str, exclude: set[str]) -> Path | None:
    """The speaker's complete adapter folder as a zip in a temporary file (the caller removes it): its
    top-level files but `exclude`, so that `PeftModel.from_pretrained(base, unzipped)` loads it. None
    when the speaker has no complete adapter."""
    place = folder(output_root, speaker)
    if place is None or not (place / INFO_FILE).is_file():
        return None
    handle, name = tempfile.mkstemp(prefix="adapter-", suffix=".zip")
    os.close(handle)
    try:
        with zipfile.ZipFile(name, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(place.iterdir()):
                if path.is_file() and path.name not in exclude:
                    zf.write(path, path.name)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def names(output_root: Path) -> list[str]:
    """Speakers with a complete adapter (their real names, as training_info.json holds them), sorted."""
    if not output_root.is_dir():
        return []
    found = []
    for place in output_root.iterdir():
        if place.name.startswith("."):
            continue
        try:
            found.append(json.loads((place / INFO_FILE).read_text(encoding="utf-8"))["speaker"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(found)


def delete(output_root: Path, speaker: str) -> Path | None:
    """Remove the speaker's adapter folder (with everything evaluated from it); None if absent."""
    place = folder(output_root, speaker)
    if place is None or not place.is_dir():
        return None
    trash = output_root / f"{TRASH_PREFIX}{place.name}-{uuid.uuid4().hex[:8]}"
    os.replace(place, trash)  # gone from its place at once; removed below, or at the next start
    shutil.rmtree(trash, ignore_errors=True)
    return place


def _beside(output_root: Path, prefix: str, name: str | None) -> list[Path]:
    """The folders `<prefix><name>-<8 hex>` (of every name when None), sorted."""
    head = f"{prefix}{name}" if name is not None else prefix
    return sorted(p for p in output_root.glob(glob.escape(head) + "*") if p.is_dir()
                  and (name is None or _TAIL.fullmatch(p.name[len(head):])))


def discard_partial(output_root: Path, speaker: str | None = None) -> list[Path]:
    """Remove what runs that died mid-way left: the speaker's (when their job died, or they are
    deleted), or every speaker's at start-up. Call only when no job of theirs runs (the registry sees
    to that); an adapter moved aside by an interrupted swap is put back when its place is empty. The
    folders removed: half-made adapters (they may hold eval.json, which quotes messages), replaced
    ones and interrupted deletes."""
    place = folder(output_root, speaker) if speaker is not None else None
    if not output_root.is_dir() or (speaker is not None and place is None):
        return []
    name = place.name if place else None
    removed = []
    for path in _beside(output_root, OLD_PREFIX, name):
        final = output_root / path.name[len(OLD_PREFIX):].rsplit("-", 1)[0]
        if final.exists():  # the swap got as far as putting the new one in place
            removed.append(path)
        else:
            os.replace(path, final)
    removed += _beside(output_root, TRASH_PREFIX, name) + _beside(output_root, TMP_PREFIX, name)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def clean_stale(output_root: Path) -> None:
    """At start-up: remove folders of runs that died mid-way; restore an adapter whose replacement
    was interrupted between its two renames."""
    discard_partial(output_root)
