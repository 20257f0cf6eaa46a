"""Training jobs: the SQLite registry (the single source of truth for job state) and the runner that
executes trainings in a thread pool, off the event loop.

The registry knows nothing of HTTP; the runner is the one place where training exceptions are caught
and turned into a message stored with the job, so the server carries on after any failure.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import parser as dialog_parser
from config import Settings, get_settings
from errors import Conflict, NotFound
from models import JobPublic, JobStatus, TrainConfig

log = logging.getLogger("persona_lora.jobs")

ACTIVE = (JobStatus.queued.value, JobStatus.running.value)
INTERRUPTED = "interrupted: the server stopped during training"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    speaker TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    config TEXT NOT NULL,
    result TEXT,
    error TEXT
);
-- At most one queued or running job per speaker, enforced by the database itself.
CREATE UNIQUE INDEX IF NOT EXISTS one_active_job_per_speaker ON jobs(speaker) WHERE status IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class JobRegistry:
    """Jobs in one SQLite file (WAL: readers never wait for the writer). One connection per call,
    so any thread may use it."""

    def __init__(self, db_path: Path):
        self.db_path = db_path
        db_path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _update(self, job_id: str, **fields: Any) -> None:
        cols = ", ".join(f"{name} = ?" for name in fields)
        with closing(self._connect()) as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", [*fields.values(), job_id])

    def create(self, speaker: str, config: TrainConfig) -> JobPublic:
        job_id = uuid.uuid4().hex
        try:
            with closing(self._connect()) as db:
                db.execute(
                    "INSERT INTO jobs (id, speaker, status, created_at, config) VALUES (?, ?, ?, ?, ?)",
                    (job_id, speaker, JobStatus.queued.value, _now(), config.model_dump_json()),
                )
        except sqlite3.IntegrityError:
            active = self.active_for(speaker)
            raise Conflict(
                f"speaker '{speaker}' already has a training job ({active.job_id if active else 'unknown'}, "
                f"{active.status.value if active else 'active'}); wait for it to finish: GET /jobs/"
                f"{active.job_id if active else ''}"
            ) from None
        return self.get(job_id)

    def get(self, job_id: str) -> JobPublic:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job with id '{job_id}'")
        return _to_public(row)

    def active_for(self, speaker: str) -> JobPublic | None:
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE speaker = ? AND status IN (?, ?)", (speaker, *ACTIVE)
            ).fetchone()
        return _to_public(row) if row else None

    def list(
        self, speaker: str | None = None, status: JobStatus | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[JobPublic], int]:
        where, params = [], []
        if speaker is not None:
            where.append("speaker = ?")
            params.append(speaker)
        if status is not None:
            where.append("status = ?")
            params.append(status.value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with closing(self._connect()) as db:
            count = db.execute(f"SELECT COUNT(*) FROM jobs {clause}", params).fetchone()[0]
            rows = db.execute(
                f"SELECT * FROM jobs {clause} ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
                [*params, limit, offset],
            ).fetchall()
        return [_to_public(r) for r in rows], count

    def counts(self) -> dict[str, int]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {status: n for status, n in rows}

    def mark_running(self, job_id: str) -> None:
        self._update(job_id, status=JobStatus.running.value, started_at=_now())

    def mark_succeeded(self, job_id: str, result: dict[str, Any]) -> None:
        self._update(job_id, status=JobStatus.succeeded.value, finished_at=_now(), result=json.dumps(result, ensure_ascii=False))

    def mark_failed(self, job_id: str, error: str) -> None:
        self._update(job_id, status=JobStatus.failed.value, finished_at=_now(), error=error)

    def recover(self) -> list[str]:
        """At start-up: jobs a dead server left running failed; queued ones are returned, oldest
        first, to be run again."""
        with closing(self._connect()) as db:
            db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, error = ? WHERE status = ?",
                (JobStatus.failed.value, _now(), INTERRUPTED, JobStatus.running.value),
            )
            rows = db.execute(
                "SELECT id FROM jobs WHERE status = ? ORDER BY created_at, rowid", (JobStatus.queued.value,)
            ).fetchall()
        return [r["id"] for r in rows]


def _to_public(row: sqlite3.Row) -> JobPublic:
    return JobPublic(
        job_id=row["id"],
        speaker=row["speaker"],
        status=row["status"],
        url=f"/jobs/{row['id']}",
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        config=TrainConfig.model_validate_json(row["config"]),
        result=json.loads(row["result"]) if row["result"] else None,
        error=row["error"],
    )


class JobRunner:
    """Runs queued jobs in submission order, TRAIN_WORKERS at once.

    Each job trains in a child process (`python jobs.py run JOB_ID`) supervised by a thread of this
    pool: model loading and training then never hold the server's GIL (a thread-only design stalled
    /health for over a second while the base model loaded), a crash or the OOM killer takes the child
    and not the server, and all memory goes back to the OS when the job ends. The child writes its
    own outcome to the registry; the supervising thread records a child that died without one.
    """

    def __init__(self, registry: JobRegistry, settings: Settings):
        self.registry = registry
        self.settings = settings
        self.stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=settings.TRAIN_WORKERS, thread_name_prefix="train")

    def submit(self, job_id: str) -> Future:
        return self._pool.submit(self._run, job_id)

    def shutdown(self) -> None:
        """Stop running trainings at their next step (the jobs fail as interrupted) and drop the
        queue; queued jobs stay queued in the database and run after the next start."""
        self.stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, job_id: str) -> None:
        if self.stop.is_set():
            return
        job = self.registry.get(job_id)
        self.registry.mark_running(job_id)
        log.info("job %s (%s): running", job_id, job.speaker)
        log_path = job_log_path(self.settings, job_id)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "DATA_DIR": str(self.settings.DATA_DIR),
            "OUTPUT_DIR": str(self.settings.OUTPUT_DIR),
            "MODELS_DIR": str(self.settings.MODELS_DIR),
            "PYTHONUNBUFFERED": "1",
            "PERSONA_LORA_SERVER_PID": str(os.getpid()),
        }
        with open(log_path, "ab") as log_file:
            child = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "run", job_id],
                env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            )
            while child.poll() is None:
                if self.stop.wait(0.5):
                    child.terminate()  # the child stops at its next step, or at once while still loading
                    try:
                        child.wait(STOP_GRACE_S)
                    except subprocess.TimeoutExpired:
                        child.kill()
                        child.wait()
        job = self.registry.get(job_id)
        if job.status == JobStatus.running:  # the child died without recording an outcome
            if self.stop.is_set():
                message = INTERRUPTED
            else:
                message = f"the training process exited with status {child.returncode}; last log lines:\n{_tail(log_path)}"
            self.registry.mark_failed(job_id, message)
            job = self.registry.get(job_id)
        level = logging.INFO if job.status == JobStatus.succeeded else logging.WARNING
        log.log(level, "job %s (%s): %s%s", job_id, job.speaker, job.status.value, f": {job.error}" if job.error else "")


STOP_GRACE_S = 60  # a step of a large model on a CPU can take this long


def job_log_path(settings: Settings, job_id: str) -> Path:
    return settings.DATA_DIR / "logs" / f"{job_id}.log"


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_job(job_id: str) -> int:
    """The child process: train one job and record its outcome in the registry."""
    import train

    settings = get_settings()
    registry = JobRegistry(settings.db_path)
    job = registry.get(job_id)
    stop, training = threading.Event(), threading.Event()

    def on_sigterm(signum, frame):
        if not training.is_set():
            os._exit(128 + signum)  # nothing worth keeping yet; the supervisor records the interruption
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    _die_with_parent()
    try:
        stored = dialog_parser.load_speaker(settings.DATA_DIR, job.speaker)
        outcome = train.train_lora(
            stored.messages if stored else [], job.speaker, job.config, settings.OUTPUT_DIR, settings.MODELS_DIR,
            stop=stop, callbacks=[train.started_callback(training)],
        )
    except train.TrainingStopped:
        registry.mark_failed(job_id, INTERRUPTED)
        return 3
    except Exception as exc:  # the job is the boundary: report it as a message a user can act on
        log.exception("job %s failed", job_id)
        registry.mark_failed(job_id, describe_failure(exc))
        return 1
    summary = {k: v for k, v in outcome.info.items() if k not in ("loss_history", "config")}
    registry.mark_succeeded(job_id, {"model_path": display_path(outcome.model_path), **summary})
    return 0


def _die_with_parent() -> None:
    """A child whose server was killed must not train on, or later overwrite the adapter."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(os.environ.get("PERSONA_LORA_SERVER_PID", os.getppid())):
        os._exit(1)  # the server died before the line above took effect


def describe_failure(exc: BaseException) -> str:
    """A message a user can act on."""
    import train

    if isinstance(exc, train.TrainingError):
        return str(exc)
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return "out of memory: lower batch_size or max_seq_length, or use a smaller BASE_MODEL"
    return f"{type(exc).__name__}: {exc}"


def display_path(path: Path) -> str:
    """'./data/x.json' for relative paths, as users type them; absolute paths unchanged."""
    text = str(path)
    return text if path.is_absolute() or text.startswith(".") else f"./{text}"


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(sys.argv) != 3 or sys.argv[1] != "run":
        sys.exit("usage: python jobs.py run JOB_ID   (started by the server for each training job)")
    sys.exit(run_job(sys.argv[2]))
