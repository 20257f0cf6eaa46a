"""The job registry: training and export jobs and their events in one SQLite file, the single source
of truth for job state, progress and events (WAL: readers never wait for the writer).

Statuses: queued → running → succeeded | failed | cancelled; each transition records a status
event in the same transaction. Knows nothing of HTTP, processes or training: any thread or process
may open it and move a job along.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import uuid
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from errors import (
    Conflict,
    InsufficientStorage,
    NotFound,
    ServiceUnavailable,
    StorageError,
    TooManyRequests,
)
from models import (
    ExportConfig,
    JobEvent,
    JobKind,
    JobProgress,
    JobPublic,
    JobStatus,
    TrainConfig,
)

log = logging.getLogger("persona_lora.jobs")

ACTIVE = (JobStatus.queued.value, JobStatus.running.value)
FINISHED = (JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.cancelled.value)
INTERRUPTED = "interrupted: the server stopped while the job ran"
BUSY_TIMEOUT_S = 30.0  # a write waits this long for another writer; ours hold the lock for milliseconds
BUSY_RETRY_S = 5


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    speaker TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    config TEXT NOT NULL,
    progress TEXT,
    result TEXT,
    error TEXT,
    checkpoint TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'train',
    reported INTEGER NOT NULL DEFAULT 0 -- the last line a cluster worker reported and we recorded (jobs.report)
);
-- At most one queued or running job per speaker (a training and an export of the same adapter never overlap), enforced by the database itself.
CREATE UNIQUE INDEX IF NOT EXISTS one_active_job_per_speaker ON jobs(speaker) WHERE status IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events(job_id, id);
"""
# Columns added after the first release, with their declarations, for upgrading old databases.
_ADDED_COLUMNS = {"progress": "TEXT", "checkpoint": "TEXT", "cancel_requested": "INTEGER NOT NULL DEFAULT 0",
                  "kind": "TEXT NOT NULL DEFAULT 'train'", "reported": "INTEGER NOT NULL DEFAULT 0"}
# What each kind of job is called in messages.
KIND_NAMES = {"train": "training", "export_merged": "merged-model export", "export_gguf": "GGUF export"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _insert_event(db: sqlite3.Connection, job_id: str, type_: str, data: dict[str, Any]) -> None:
    db.execute("INSERT INTO events (job_id, created_at, type, data) VALUES (?, ?, ?, ?)",
               (job_id, _now(), type_, json.dumps(data, ensure_ascii=False)))


class JobRegistry:
    """Jobs and their events in one SQLite file (WAL: readers never wait for the writer). One
    connection per call, so any thread or process may use it.

    One more connection stays open for the registry's life, unused: it keeps the `-wal` and `-shm`
    files in place, so reads still work on a full disk (a first connection must create `-shm`, which
    fails there with 'disk I/O error'). A write the disk has no room for raises InsufficientStorage.
    """

    def __init__(self, db_path: Path, replace_damaged: bool = False, busy_timeout: float = BUSY_TIMEOUT_S):
        """With `replace_damaged` (the server at start-up), a file SQLite cannot read is moved aside
        with a timestamp and a fresh registry starts; without, StorageError says which file and what to do.
        A write waits up to `busy_timeout` s for another writer (another process, say), then raises
        ServiceUnavailable (503, retry later)."""
        self.db_path, self.busy_timeout = db_path, busy_timeout
        db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._keeper = self._open()
        except sqlite3.DatabaseError as exc:
            if not _damaged(exc):
                raise
            if not replace_damaged:
                raise StorageError(f"the job registry {db_path} is damaged ({exc}); restart the server to move it "
                                   "aside and start a fresh one") from None
            aside = db_path.with_name(f"{db_path.name}.damaged-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
            for suffix in ("", "-wal", "-shm"):
                if (part := Path(f"{db_path}{suffix}")).exists():
                    part.replace(f"{aside}{suffix}")
            log.error("the job registry %s is damaged (%s): moved it aside to %s and started a fresh one; the jobs it "
                      "held are no longer listed (open the old file with the sqlite3 shell's .recover to get them back)",
                      db_path, exc, aside.name)
            self._keeper = self._open()

    def _open(self) -> sqlite3.Connection:
        """Check the file, create or upgrade the schema; the connection that stays open."""
        db = self._connect()
        try:
            db.execute("PRAGMA journal_mode=WAL")
            problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {problem}")
            db.executescript(_SCHEMA)
            have = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, declaration in _ADDED_COLUMNS.items():  # databases made by earlier versions
                if column not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {declaration}")
        except BaseException:
            db.close()
            raise
        return db

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection for one call; a full disk becomes InsufficientStorage (507), other disk
        errors StorageError, both saying what to do."""
        try:
            with closing(self._connect()) as db:
                yield db
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_FULL", "SQLITE_IOERR")):
                raise self._storage_error(exc) from exc
            if getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
                raise ServiceUnavailable(
                    f"the job registry ({self.db_path.name}) stayed locked by another connection for "
                    f"{self.busy_timeout:g} s; nothing changed. Retry after the Retry-After seconds; if it stays "
                    "locked, look for another process holding the file", BUSY_RETRY_S) from exc
            raise

    def _storage_error(self, exc: sqlite3.OperationalError) -> StorageError:
        try:
            full = exc.sqlite_errorname == "SQLITE_FULL" or shutil.disk_usage(self.db_path.parent).free < 1 << 20
        except OSError:
            full = False
        if full:
            return InsufficientStorage(f"disk full: the job registry could not be written ({exc}); nothing changed. "
                                       "Free disk space in DATA_DIR and retry.")
        return StorageError(f"the job registry could not be written ({exc}); nothing changed. Check that DATA_DIR "
                            "is writable.")

    def state(self, job_id: str) -> tuple[str, bool] | None:
        """The job's status and whether a cancel was asked for, read from two columns only (a row whose
        other columns are damaged still answers); None for an unknown job."""
        with self._db() as db:
            row = db.execute("SELECT status, cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return (row["status"], bool(row["cancel_requested"])) if row else None

    def _set(self, job_id: str, event: tuple[str, dict] | None = None, when: str | None = None,
             seq: int | None = None, **fields: Any) -> int:
        """Update a job's columns (only while its status is in `when`, if given) and add an event,
        in one transaction. With `seq` (the number of a line a cluster worker reported), only once:
        a line at or before the last one recorded changes nothing, so a log read again after a
        restart adds no event twice. Returns the number of rows changed."""
        if seq is not None:
            fields["reported"] = seq
        cols = ", ".join(f"{name} = ?" for name in fields)
        sql, params = f"UPDATE jobs SET {cols} WHERE id = ?", [*fields.values(), job_id]
        if when:
            sql += f" AND status IN ({', '.join('?' * len(when))})"
            params += list(when)
        if seq is not None:
            sql += " AND reported < ?"
            params.append(seq)
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            changed = db.execute(sql, params).rowcount
            if changed and event:
                _insert_event(db, job_id, *event)
            db.execute("COMMIT")
        if changed and "status" in fields:
            log.info("job %s: %s%s", job_id, fields["status"], f" ({fields['error']})" if fields.get("error") else "",
                     extra={"state_change": True})
        return changed

    def add_event(self, job_id: str, type_: str, data: dict[str, Any], seq: int | None = None) -> None:
        if seq is not None:
            self._set(job_id, (type_, data), seq=seq)
            return
        with self._db() as db:
            _insert_event(db, job_id, type_, data)

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        with self._db() as db:
            rows = db.execute(
                "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?", (job_id, after, limit)
            ).fetchall()
        events = []
        for r in rows:
            try:
                events.append(JobEvent(id=r["id"], job_id=r["job_id"], created_at=r["created_at"], type=r["type"],
                                       data=json.loads(r["data"])))
            except (ValueError, TypeError) as exc:
                log.warning("job %s: event %s in %s cannot be read (%s); skipped", job_id, r["id"], self.db_path.name,
                            type(exc).__name__)
        return events

    def create(self, speaker: str, config: TrainConfig | ExportConfig, max_queued: int | None = None,
               kind: JobKind = "train") -> JobPublic:
        job_id = uuid.uuid4().hex
        try:
            with self._db() as db:
                db.execute("BEGIN IMMEDIATE")  # the count and the insert are one step
                queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
                if max_queued is not None and queued >= max_queued:
                    db.execute("ROLLBACK")
                    raise TooManyRequests(
                        f"{queued} jobs are already queued (MAX_QUEUED_JOBS={max_queued}); retry when some have finished"
                    )
                db.execute(
                    "INSERT INTO jobs (id, speaker, status, created_at, config, kind) VALUES (?, ?, ?, ?, ?, ?)",
                    (job_id, speaker, JobStatus.queued.value, _now(), config.model_dump_json(), kind),
                )
                _insert_event(db, job_id, "status", {"status": "queued"})
                db.execute("COMMIT")
        except sqlite3.IntegrityError:
            raise self._busy(speaker) from None
        log.info("job %s (%s): queued", job_id, speaker)
        return self.get(job_id)

    def _busy(self, speaker: str) -> Conflict:
        active = self.active_for(speaker)
        if active is None:
            return Conflict(f"speaker '{speaker}' already has a job; retry in a moment")
        return Conflict(
            f"speaker '{speaker}' already has a {KIND_NAMES[active.kind]} job ({active.job_id}, {active.status.value}); "
            f"wait for it or cancel it: GET /jobs/{active.job_id}"
        )

    def get(self, job_id: str) -> JobPublic:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job with id '{job_id}'")
        if (job := self._readable(row)) is None:
            raise StorageError(f"job '{job_id}' cannot be read: its row in the job registry ({self.db_path.name}) is "
                               "damaged. GET /jobs lists the others; delete the row, or move the file aside and restart")
        return job

    def active_for(self, speaker: str) -> JobPublic | None:
        with self._db() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE speaker = ? AND status IN (?, ?)", (speaker, *ACTIVE)
            ).fetchone()
        return self._readable(row) if row else None

    def list(
        self, speaker: str | None = None, status: JobStatus | None = None, limit: int = 50, offset: int = 0,
        kind: JobKind | None = None,
    ) -> tuple[list[JobPublic], int]:
        where, params = [], []
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        if speaker is not None:
            where.append("speaker = ?")
            params.append(speaker)
        if status is not None:
            where.append("status = ?")
            params.append(status.value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._db() as db:
            count = db.execute(f"SELECT COUNT(*) FROM jobs {clause}", params).fetchone()[0]
            rows = db.execute(
                f"SELECT * FROM jobs {clause} ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
                [*params, limit, offset],
            ).fetchall()
        return [job for r in rows if (job := self._readable(r))], count

    def counts(self) -> dict[str, int]:
        with self._db() as db:
            rows = db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status: n for status, n in rows}

    # --- transitions (each records a status event) ---

    def mark_running(self, job_id: str) -> bool:
        """queued → running; False if the job is no longer queued (cancelled meanwhile)."""
        return bool(self._set(job_id, ("status", {"status": "running"}), when=("queued",),
                              status="running", started_at=_now(), progress=None, reported=0))

    def attempts(self, job_id: str) -> int:
        """How many times the job has started running (1 for a first run, 2 after one resume...)."""
        with self._db() as db:
            return db.execute("SELECT COUNT(*) FROM events WHERE job_id = ? AND type = 'status' AND "
                              "json_extract(data, '$.status') = 'running'", (job_id,)).fetchone()[0]

    def mark_succeeded(self, job_id: str, result: dict[str, Any], seq: int | None = None) -> None:
        self._set(job_id, ("status", {"status": "succeeded", "result": result}), when=ACTIVE, seq=seq, status="succeeded",
                  finished_at=_now(), result=json.dumps(result, ensure_ascii=False), error=None,
                  checkpoint=None)  # a succeeded job's checkpoints are removed: nothing to resume from

    def mark_failed(self, job_id: str, error: str, seq: int | None = None) -> None:
        self._set(job_id, ("error", {"status": "failed", "error": error}), when=ACTIVE, seq=seq, status="failed",
                  finished_at=_now(), error=error)

    def mark_cancelled(self, job_id: str) -> None:
        self._set(job_id, ("status", {"status": "cancelled"}), when=ACTIVE, status="cancelled", finished_at=_now())

    def update_progress(self, job_id: str, progress: JobProgress, seq: int | None = None) -> None:
        data = progress.model_dump()
        self._set(job_id, ("progress", data), when=("running",), seq=seq, progress=json.dumps(data))

    def set_checkpoint(self, job_id: str, path: str, seq: int | None = None) -> None:
        self._set(job_id, ("log", {"message": f"checkpoint saved: {path}"}), seq=seq, checkpoint=path)

    def clear_checkpoint(self, job_id: str) -> None:
        self._set(job_id, ("log", {"message": "checkpoint deleted"}), checkpoint=None)

    def cancel(self, job_id: str) -> JobPublic:
        """A queued job is cancelled at once; a running one is asked to stop at its next step."""
        job = self.get(job_id)
        if job.status == JobStatus.queued and self._set(job_id, ("status", {"status": "cancelled"}), when=("queued",),
                                                        status="cancelled", finished_at=_now()):
            return self.get(job_id)
        if self._set(job_id, ("log", {"message": "cancel requested"}), when=("running",), cancel_requested=1):
            return self.get(job_id)
        job = self.get(job_id)
        raise Conflict(f"job '{job_id}' is already {job.status.value}; only queued or running jobs can be cancelled")

    def resume(self, job_id: str) -> JobPublic:
        """Queue a failed or cancelled job again, to continue from its last checkpoint."""
        job = self.get(job_id)
        if job.kind != "train":
            raise Conflict(f"job '{job_id}' is a {KIND_NAMES[job.kind]}, which starts over rather than resumes: "
                           f"POST /speakers/{job.speaker}/exports/{job.config.export} again")
        if job.status.value not in ("failed", "cancelled"):
            raise Conflict(f"job '{job_id}' is {job.status.value}; only failed or cancelled jobs can be resumed")
        if not job.checkpoint or not Path(job.checkpoint).is_dir():
            raise Conflict(
                f"job '{job_id}' has no checkpoint to resume from; set CHECKPOINT_STEPS to save them, or start a new "
                f"training with POST /train"
            )
        try:
            changed = self._set(job_id, ("status", {"status": "queued", "resume_from": job.checkpoint}),
                                when=("failed", "cancelled"), status="queued", finished_at=None, error=None,
                                cancel_requested=0)
        except sqlite3.IntegrityError:
            raise self._busy(job.speaker) from None
        if not changed:
            raise Conflict(f"job '{job_id}' changed state meanwhile; look at GET /jobs/{job_id}")
        return self.get(job_id)

    def running(self) -> list[str]:
        """The running jobs, oldest first."""
        with self._db() as db:
            return [r["id"] for r in db.execute("SELECT id FROM jobs WHERE status = 'running' ORDER BY created_at, rowid")]

    def recover(self, keep_running: bool = False) -> list[str]:
        """At start-up: jobs a dead server left running failed (unless `keep_running`: jobs on a
        cluster outlive the server, which follows them again); queued ones are returned, oldest
        first, to be run again."""
        for job_id in [] if keep_running else self.running():
            self.mark_failed(job_id, INTERRUPTED)
        with self._db() as db:
            rows = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at, rowid").fetchall()
        return [r["id"] for r in rows]

    def _readable(self, row: sqlite3.Row) -> JobPublic | None:
        """The row as a job; None, with a warning naming the job and the problem's kind (never the
        row's values), for a row damaged by hand or by a disk."""
        try:
            return _to_public(row)
        except (ValueError, TypeError, KeyError, IndexError) as exc:  # pydantic's ValidationError is a ValueError
            log.warning("job %s: its row in %s cannot be read (%s); skipped", row["id"], self.db_path.name,
                        type(exc).__name__)
            return None


def _damaged(exc: sqlite3.DatabaseError) -> bool:
    """SQLite's 'file is not a database' or 'database disk image is malformed', or a failed quick_check;
    not a busy, locked or full database."""
    return getattr(exc, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or str(exc).startswith("quick_check")


def _to_public(row: sqlite3.Row) -> JobPublic:
    kind = row["kind"]
    return JobPublic(
        job_id=row["id"],
        speaker=row["speaker"],
        kind=kind,
        status=row["status"],
        url=f"/jobs/{row['id']}",
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        config=(TrainConfig if kind == "train" else ExportConfig).model_validate_json(row["config"]),
        progress=JobProgress.model_validate_json(row["progress"]) if row["progress"] else None,
        result=json.loads(row["result"]) if row["result"] else None,
        error=row["error"],
        checkpoint=row["checkpoint"],
        cancel_requested=bool(row["cancel_requested"]),
    )
