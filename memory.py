"""Memory: each speaker's own messages in a full-text index, and recall of the ones most relevant to
a conversation, so a persona can say again what the person actually said.

The engine is SQLite's FTS5 (Python's own `sqlite3`; BM25 ranking; the `unicode61` tokenizer with
diacritics folded, so it works for every script the importers read). Why not an embedding model:
offline, no second model in memory, and on 100,000 messages indexing and a query cost what
bench/README.md ("Memory") measures. One index file per speaker beside their messages file,
`.<storage_name>_messages.json.fts`, rebuilt from the stored messages (the source of truth) when it is
missing, stale (its count differs from the store's) or damaged. `Memory(":memory:")` is the same
index held in memory, as training builds it from the training split.

A query is the conversation so far, newest turn first: its words, less those that occur in more than
COMMON_SHARE of the messages (a stop-word list for any language, from the index's own counts), OR-ed
and ranked by BM25. Knows nothing of models, prompts or HTTP: `Memory` takes texts and sample ids
and gives texts back; the speaker-level functions read the stored messages through store.py. To
plug in an embedding model instead, replace `Memory.recall` (keep its signature); everything else
stays.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import unicodedata
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import store
from models import Sample, Turn

log = logging.getLogger("persona_lora.memory")

VERSION = 2  # of the index's layout: an index of another version is rebuilt
SUFFIX = ".fts"  # `.<messages file>.fts`, beside the store's `.<messages file>.index`
# The newest distinct words of the conversation, less the common ones: a word in more than 1% of the
# messages says little about which to recall, and its long posting list is what a query spends its
# time on. On 100,000 Zipf-worded messages (bench/memory_speed.py, the machine busy with a training)
# the query's median was 24 ms with 24 terms and a 2% cut, 17 ms with 24 and 1%, 11 ms with 12 and 1%.
QUERY_TERMS = 16
COMMON_SHARE = 0.01
COMMON_MIN_DOCS = 25  # ... but in a small memory a topic's word is in a few dozen: never drop one found in fewer
RECALL_CHARS = 300  # one recalled message at most this long in a prompt (a chat line is ~60)
NEAR_DUPLICATE = 0.8  # word-set overlap at or above which two messages say the same thing
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class Recalled:
    sample_id: str
    text: str
    score: float  # BM25, higher is more relevant (SQLite's bm25() negated)
    answered: Turn | None = None  # the turn the message answered, as the person's chat had it


def words(text: str) -> list[str]:
    """The text's words as the index's tokenizer sees them: lower case, diacritics removed."""
    folded = "".join(ch for ch in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(ch))
    return _WORD.findall(folded)


def near_duplicate(a: str, b: str) -> bool:
    """Whether two messages say the same thing: the same words, or nearly (Jaccard ≥ NEAR_DUPLICATE),
    or one of three words or more said again inside the other ("I fix trams" in "I fix trams, you
    know"; "yes" in "yes, the Skoda" is no duplicate)."""
    x, y = set(words(a)), set(words(b))
    if not x or not y:
        return a.strip() == b.strip()
    return len(x & y) / len(x | y) >= NEAR_DUPLICATE or min(len(x), len(y)) >= 3 and (x <= y or y <= x)


class Memory:
    """One speaker's messages in an FTS5 index (a file, or ":memory:")."""

    def __init__(self, path: str | Path):
        self.db = sqlite3.connect(str(path), timeout=10, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=DELETE")  # no -wal/-shm files beside it: one file to delete
        self.db.executescript(
            "CREATE VIRTUAL TABLE IF NOT EXISTS lines USING fts5(text, sample_id UNINDEXED, answered UNINDEXED,"
            " tokenize='unicode61 remove_diacritics 2');"
            "CREATE VIRTUAL TABLE IF NOT EXISTS vocab USING fts5vocab(lines, row);"
            "CREATE TABLE IF NOT EXISTS ids (sample_id TEXT PRIMARY KEY);"
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER);"
            "INSERT OR IGNORE INTO meta VALUES ('count', (SELECT count(*) FROM ids));"
            f"INSERT OR IGNORE INTO meta VALUES ('version', {VERSION});"
        )

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def count(self) -> int:
        return self.db.execute("SELECT value FROM meta WHERE key = 'count'").fetchone()[0]

    def version(self) -> int:
        return self.db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0]

    def add(self, items: Iterable[tuple[str, str, Turn | None]]) -> int:
        """Index (sample_id, text, the turn it answered) not indexed yet; the number added."""
        added = 0
        with self.db:
            for sample_id, text, answered in items:
                if not text.strip():
                    continue
                if self.db.execute("INSERT OR IGNORE INTO ids VALUES (?)", (sample_id,)).rowcount:
                    self.db.execute("INSERT INTO lines (text, sample_id, answered) VALUES (?, ?, ?)",
                                    (text, sample_id, answered.model_dump_json() if answered else None))
                    added += 1
            self.db.execute("UPDATE meta SET value = value + ? WHERE key = 'count'", (added,))
        return added

    def query_terms(self, texts: list[str]) -> list[str]:
        """The words to look for: the newest distinct words of `texts` (newest text first), less the common ones."""
        terms: list[str] = []
        for text in texts:
            for word in reversed(words(text)):
                if len(word) > 1 and word not in terms:
                    terms.append(word)
        terms = terms[: QUERY_TERMS * 2]
        if not terms:
            return []
        total = self.count()
        limit = max(COMMON_MIN_DOCS, COMMON_SHARE * total)
        marks = ",".join("?" * len(terms))
        common = {t for t, docs in self.db.execute(f"SELECT term, doc FROM vocab WHERE term IN ({marks})", terms) if docs > limit}
        return [t for t in terms if t not in common][:QUERY_TERMS]

    def recall(self, texts: list[str], k: int, exclude_ids: set[str] = frozenset(),
               exclude_texts: list[str] = ()) -> list[Recalled]:
        """The k messages most relevant to `texts` (the conversation, newest first), best first; none
        whose id is in `exclude_ids` or that nearly duplicates one of `exclude_texts`."""
        terms = self.query_terms(texts) if k > 0 else []
        if not terms:
            return []
        query = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        found, seen = [], []
        rows = self.db.execute("SELECT sample_id, text, bm25(lines), answered FROM lines WHERE lines MATCH ?"
                               " ORDER BY bm25(lines) LIMIT ?",
                               (query, 4 * k + len(exclude_ids) + 8))
        for sample_id, text, rank, answered in rows:
            if sample_id in exclude_ids or any(near_duplicate(text, other) for other in [*exclude_texts, *seen]):
                continue
            asked = Turn.model_validate_json(answered) if answered else None
            if asked is not None and any(near_duplicate(asked.content, other) for other in exclude_texts):
                asked = None  # the person's own earlier line (two in a row) that the caller must not see
            if asked is not None and len(asked.content) > RECALL_CHARS:
                asked = Turn(speaker=asked.speaker, content=asked.content[:RECALL_CHARS])
            found.append(Recalled(sample_id, text[:RECALL_CHARS], -rank, asked))
            seen.append(text)
            if len(found) == k:
                break
        return found


# --- one speaker's index file beside their messages ---------------------------------------------


def index_path(messages_file: Path) -> Path:
    return messages_file.with_name(f".{messages_file.name}{SUFFIX}")


_locks: dict[Path, threading.RLock] = {}
_locks_guard = threading.Lock()


def _lock(path: Path) -> threading.RLock:
    """One writer of an index at a time in this process (50 uploads at once for one speaker raced to
    build and update it: 'attempt to write a readonly database'); SQLite's own lock between processes."""
    with _locks_guard:
        return _locks.setdefault(path, threading.RLock())


def open_index(messages_file: Path, items: callable, expected: int) -> Memory:
    """The speaker's index, rebuilt from `items()` (`triples` of every stored message) when it is
    missing, stale (holds other than `expected` messages, or was written by an older version) or damaged."""
    path = index_path(messages_file)
    with _lock(path):
        return _open_or_rebuild(path, items, expected)


def _open_or_rebuild(path: Path, items: callable, expected: int) -> Memory:
    if not path.exists():
        log.info("memory index %s: building it from the stored messages", path.name)
        memory = Memory(path)
        memory.add(items())
        return memory
    try:
        memory = Memory(path)
        held = memory.count()
        if memory.version() == VERSION and held == expected:
            return memory
        if memory.version() == VERSION and held < expected:  # an update lost (a kill between the two writes)
            log.info("memory index %s is %d messages behind the store; adding them", path.name, expected - held)
            memory.add(items())
            return memory
        memory.close()
        reason = "of another layout" if memory.version() != VERSION else "ahead of the store"
    except sqlite3.OperationalError:
        raise  # locked or unreadable just now: not damage, nothing is rebuilt
    except sqlite3.DatabaseError as exc:
        reason = f"damaged ({exc})"
    log.info("memory index %s is %s; rebuilding it from the stored messages", path.name, reason)
    path.unlink(missing_ok=True)
    memory = Memory(path)
    memory.add(items())
    return memory


def add_to_index(messages_file: Path, items: list[tuple[str, str]]) -> None:
    """Index new messages in the speaker's index if it exists; a missing one is built when first used."""
    path = index_path(messages_file)
    if not path.exists():
        return
    with _lock(path):
        try:
            with closing(Memory(path)) as memory:
                memory.add(items)
        except sqlite3.OperationalError as exc:  # locked: it catches up at the next recall
            log.warning("memory index %s could not be updated (%s); it catches up when next used", path.name, exc)
        except sqlite3.DatabaseError as exc:  # damaged: rebuilt at the next recall
            log.warning("memory index %s could not be updated (%s); it will be rebuilt", path.name, exc)
            path.unlink(missing_ok=True)


def delete_index(messages_file: Path) -> list[Path]:
    """Remove the speaker's index and its journal; the paths removed."""
    removed = []
    with _lock(index_path(messages_file)):
        for path in (index_path(messages_file), index_path(messages_file).with_name(index_path(messages_file).name + "-journal")):
            if path.exists():
                path.unlink()
                removed.append(path)
    return removed


# --- a speaker's memory, from the store -----------------------------------------------------------


def triples(samples: Iterable[Sample]) -> list[tuple[str, str, Turn | None]]:
    """What memory holds of samples: each one's id, the speaker's reply and the turn it answered."""
    return [(s.id, s.reply, s.context[-1] if s.context else None) for s in samples]


def speaker_memory(data_dir: Path, speaker: str, wait: float = store.LOCK_SECONDS) -> Memory | None:
    """The speaker's index, in step with their stored messages; None when nothing is stored."""
    summary = store.summary(data_dir, speaker, wait)
    if summary is None:
        return None

    def stored() -> list[tuple[str, str]]:
        found = store.load_speaker(data_dir, speaker, wait)
        return triples(found.messages) if found else []

    return open_index(store.speaker_file(data_dir, speaker), stored, summary.messages)


def conversation_texts(turns: list[Turn]) -> list[str]:
    """A conversation as a memory query: its texts, newest first."""
    return [t.content for t in reversed(turns)]


def k_for(option: bool | int | None, default: int) -> int:
    """How many messages a request recalls: its `memory` (false: none, a number: that many), else the default."""
    if option is None or option is True:
        return default
    return int(option)


def recall(data_dir: Path, speaker: str, turns: list[Turn], k: int, wait: float = store.LOCK_SECONDS) -> list[Recalled]:
    """The speaker's k earlier messages most relevant to the conversation, never one already in it."""
    if k <= 0:
        return []
    try:
        memory = speaker_memory(data_dir, speaker, wait)
        if memory is None:
            return []
        with memory:
            return memory.recall(conversation_texts(turns), k, exclude_texts=[t.content for t in turns])
    except sqlite3.Error as exc:  # the reply goes on without memory rather than fail
        log.warning("memory of a speaker could not be read (%s); replying without it", type(exc).__name__)
        return []


def search(data_dir: Path, speaker: str, text: str, limit: int,
           wait: float = store.LOCK_SECONDS) -> tuple[list[Recalled], int] | None:
    """What would be recalled for `text`, and how many messages the memory holds; None when nothing is stored."""
    memory = speaker_memory(data_dir, speaker, wait)
    if memory is None:
        return None
    with memory:
        return memory.recall([text], limit), memory.count()


def size(data_dir: Path, speaker: str, wait: float = store.LOCK_SECONDS) -> int:
    """How many messages the speaker's memory holds (built if missing)."""
    memory = speaker_memory(data_dir, speaker, wait)
    if memory is None:
        return 0
    with memory:
        return memory.count()


def with_memory(samples: list[Sample], pool: list[Sample], speaker: str, k: int) -> list[Sample]:
    """Training samples as generation will see them: each one's context led by the k messages of
    `pool` (the training split) most relevant to it, as the speaker's own earlier turns; never the
    sample itself, a near duplicate of its reply, or a line already in its context."""
    if k <= 0 or not samples:
        return samples
    out = []
    with Memory(":memory:") as memory:
        memory.add(triples(pool))
        for sample in samples:
            found = memory.recall(conversation_texts(sample.context), k, exclude_ids={sample.id},
                                  exclude_texts=[sample.reply, *(t.content for t in sample.context)])
            out.append(sample.model_copy(update={"context": recalled_turns(found, speaker) + list(sample.context)}))
    return out


def recalled_turns(found: list[Recalled], speaker: str) -> list[Turn]:
    """Recalled messages as the earlier exchanges of the person's chat: each one after the turn it
    answered, least relevant first (the most relevant nearest the conversation). On the persona's
    fact-recall bench this form gave more replies with the fact than the person's lines alone
    (bench/README.md, "Memory")."""
    return [turn for r in reversed(found) for turn in ([r.answered] if r.answered else []) + [Turn(speaker=speaker, content=r.text)]]


def add_samples(data_dir: Path, speaker: str, samples: list[Sample], wait: float = store.LOCK_SECONDS) -> None:
    """Keep the speaker's index in step with an upload (ids already indexed are skipped); the first
    upload, or one after the index was lost, builds it from everything stored."""
    messages_file = store.speaker_file(data_dir, speaker)
    with _lock(index_path(messages_file)):
        try:
            if index_path(messages_file).exists():
                add_to_index(messages_file, triples(samples))
            elif built := speaker_memory(data_dir, speaker, wait):
                built.close()
        except (sqlite3.Error, OSError) as exc:  # the messages are stored; the index catches up when next used
            log.warning("memory index %s not updated (%s)", index_path(messages_file).name, type(exc).__name__)


def size_if_built(data_dir: Path, speaker: str) -> int | None:
    """How many messages the speaker's index holds, without building it; None when it has none."""
    path = index_path(store.speaker_file(data_dir, speaker))
    if not path.exists():
        return None
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)) as db:
            return db.execute("SELECT value FROM meta WHERE key = 'count'").fetchone()[0]
    except (sqlite3.DatabaseError, TypeError):  # damaged or half-made: rebuilt at the next recall
        return None


def delete(data_dir: Path, speaker: str) -> list[Path]:
    """Remove the speaker's index (it holds their messages); the paths removed."""
    return delete_index(store.speaker_file(data_dir, speaker))


def clean_orphans(data_dir: Path) -> list[Path]:
    """At start-up: remove indexes whose messages file is gone (a delete interrupted between the two)."""
    removed = []
    for path in data_dir.glob(f".*{SUFFIX}") if data_dir.is_dir() else []:
        if not path.with_name(path.name[1 : -len(SUFFIX)]).exists():
            removed += delete_index(path.with_name(path.name[1 : -len(SUFFIX)]))
    return removed
