"""Training jobs: the SQLite registry (the single source of truth for job state, progress and
events) and the runner that executes trainings, each in a child process, off the event loop.

Statuses: queued → running → succeeded | failed | cancelled. The registry knows nothing of HTTP;
`run_job` (the child) is the one place where training exceptions are caught and turned into a
message stored with the job, and the supervising thread records a child that died without one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import parser as dialog_parser
from config import Settings, get_settings
from errors import Conflict, NotFound, TooManyRequests
from models import JobEvent, JobProgress, JobPublic, JobStatus, Sample, TrainConfig

log = logging.getLogger("persona_lora.jobs")

ACTIVE = (JobStatus.queued.value, JobStatus.running.value)
FINISHED = (JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.cancelled.value)
INTERRUPTED = "interrupted: the server stopped during training"
STOP_GRACE_S = 60  # a step of a large model on a CPU can take this long
CHECKPOINTS = ".checkpoints"  # under OUTPUT_DIR, one folder per job

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
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
-- At most one queued or running job per speaker, enforced by the database itself.
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
_ADDED_COLUMNS = {"progress": "TEXT", "checkpoint": "TEXT", "cancel_requested": "INTEGER NOT NULL DEFAULT 0"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class JobRegistry:
    """Jobs and their events in one SQLite file (WAL: readers never wait for the writer). One
    connection per call, so any thread or process may use it."""

    def __init__(self, db_path: Path):
        self.db_path = db_path
        db_path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            have = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, declaration in _ADDED_COLUMNS.items():  # databases made by earlier versions
                if column not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {declaration}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _set(self, job_id: str, event: tuple[str, dict] | None = None, when: str | None = None, **fields: Any) -> int:
        """Update a job's columns (only while its status is in `when`, if given) and add an event,
        in one transaction. Returns the number of rows changed."""
        cols = ", ".join(f"{name} = ?" for name in fields)
        sql, params = f"UPDATE jobs SET {cols} WHERE id = ?", [*fields.values(), job_id]
        if when:
            sql += f" AND status IN ({', '.join('?' * len(when))})"
            params += list(when)
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            changed = db.execute(sql, params).rowcount
            if changed and event:
                db.execute(
                    "INSERT INTO events (job_id, created_at, type, data) VALUES (?, ?, ?, ?)",
                    (job_id, _now(), event[0], json.dumps(event[1], ensure_ascii=False)),
                )
            db.execute("COMMIT")
        if changed and "status" in fields:
            log.info("job %s: %s%s", job_id, fields["status"], f" ({fields['error']})" if fields.get("error") else "",
                     extra={"state_change": True})
        return changed

    def add_event(self, job_id: str, type_: str, data: dict[str, Any]) -> None:
        with closing(self._connect()) as db:
            db.execute(
                "INSERT INTO events (job_id, created_at, type, data) VALUES (?, ?, ?, ?)",
                (job_id, _now(), type_, json.dumps(data, ensure_ascii=False)),
            )

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?", (job_id, after, limit)
            ).fetchall()
        return [JobEvent(id=r["id"], job_id=r["job_id"], created_at=r["created_at"], type=r["type"],
                         data=json.loads(r["data"])) for r in rows]

    def create(self, speaker: str, config: TrainConfig, max_queued: int | None = None) -> JobPublic:
        job_id = uuid.uuid4().hex
        try:
            with closing(self._connect()) as db:
                db.execute("BEGIN IMMEDIATE")  # the count and the insert are one step
                queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
                if max_queued is not None and queued >= max_queued:
                    db.execute("ROLLBACK")
                    raise TooManyRequests(
                        f"{queued} jobs are already queued (MAX_QUEUED_JOBS={max_queued}); retry when some have finished"
                    )
                db.execute(
                    "INSERT INTO jobs (id, speaker, status, created_at, config) VALUES (?, ?, ?, ?, ?)",
                    (job_id, speaker, JobStatus.queued.value, _now(), config.model_dump_json()),
                )
                db.execute(
                    "INSERT INTO events (job_id, created_at, type, data) VALUES (?, ?, 'status', ?)",
                    (job_id, _now(), json.dumps({"status": "queued"})),
                )
                db.execute("COMMIT")
        except sqlite3.IntegrityError:
            raise self._busy(speaker) from None
        log.info("job %s (%s): queued", job_id, speaker)
        return self.get(job_id)

    def _busy(self, speaker: str) -> Conflict:
        active = self.active_for(speaker)
        if active is None:
            return Conflict(f"speaker '{speaker}' already has a training job; retry in a moment")
        return Conflict(
            f"speaker '{speaker}' already has a training job ({active.job_id}, {active.status.value}); "
            f"wait for it or cancel it: GET /jobs/{active.job_id}"
        )

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

    # --- transitions (each records a status event) ---

    def mark_running(self, job_id: str) -> bool:
        """queued → running; False if the job is no longer queued (cancelled meanwhile)."""
        return bool(self._set(job_id, ("status", {"status": "running"}), when=("queued",),
                              status="running", started_at=_now(), progress=None))

    def mark_succeeded(self, job_id: str, result: dict[str, Any]) -> None:
        self._set(job_id, ("status", {"status": "succeeded", "result": result}), when=ACTIVE, status="succeeded",
                  finished_at=_now(), result=json.dumps(result, ensure_ascii=False), error=None)

    def mark_failed(self, job_id: str, error: str) -> None:
        self._set(job_id, ("error", {"status": "failed", "error": error}), when=ACTIVE, status="failed",
                  finished_at=_now(), error=error)

    def mark_cancelled(self, job_id: str) -> None:
        self._set(job_id, ("status", {"status": "cancelled"}), when=ACTIVE, status="cancelled", finished_at=_now())

    def update_progress(self, job_id: str, progress: JobProgress) -> None:
        data = progress.model_dump()
        self._set(job_id, ("progress", data), when=("running",), progress=json.dumps(data))

    def set_checkpoint(self, job_id: str, path: str) -> None:
        self._set(job_id, ("log", {"message": f"checkpoint saved: {path}"}), checkpoint=path)

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

    def recover(self) -> list[str]:
        """At start-up: jobs a dead server left running failed; queued ones are returned, oldest
        first, to be run again."""
        with closing(self._connect()) as db:
            running = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE status = 'running'")]
        for job_id in running:
            self.mark_failed(job_id, INTERRUPTED)
        with closing(self._connect()) as db:
            rows = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at, rowid").fetchall()
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
        progress=JobProgress.model_validate_json(row["progress"]) if row["progress"] else None,
        result=json.loads(row["result"]) if row["result"] else None,
        error=row["error"],
        checkpoint=row["checkpoint"],
        cancel_requested=bool(row["cancel_requested"]),
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
        if self.stop.is_set() or not self.registry.mark_running(job_id):
            return  # shutting down, or cancelled while queued
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
        cancelled = False
        with open(log_path, "ab") as log_file:
            child = subprocess.Popen(
                job_command(job_id, self.settings.TRAIN_PROCESSES),
                env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            )
            while child.poll() is None:
                if self.stop.wait(0.5) or (cancelled := self.registry.get(job_id).cancel_requested):
                    child.terminate()  # the child stops at its next step, or at once while still loading
                    try:
                        child.wait(STOP_GRACE_S)
                    except subprocess.TimeoutExpired:
                        child.kill()
                        child.wait()
        if self.registry.get(job_id).status == JobStatus.running:  # the child recorded no outcome
            if cancelled:
                self.registry.mark_cancelled(job_id)
            elif self.stop.is_set():
                self.registry.mark_failed(job_id, INTERRUPTED)
            else:
                self.registry.mark_failed(
                    job_id, f"the training process exited with status {child.returncode}; last log lines:\n{_tail(log_path)}"
                )


def job_command(job_id: str, processes: int) -> list[str]:
    """The child's command line: this file, or several copies of it under `accelerate launch`
    (data parallel: one process per GPU, or gloo between CPU processes)."""
    script = [str(Path(__file__).resolve()), "run", job_id]
    if processes <= 1:
        return [sys.executable, *script]
    with socket.socket() as s:  # a free rendezvous port, so two launches never collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), *script]


def job_log_path(settings: Settings, job_id: str) -> Path:
    return settings.DATA_DIR / "logs" / f"{job_id}.log"


def checkpoint_dir(settings: Settings, job_id: str) -> Path:
    return settings.OUTPUT_DIR / CHECKPOINTS / job_id


def delete_checkpoint(settings: Settings, job_id: str) -> Path | None:
    folder = checkpoint_dir(settings, job_id)
    if not folder.is_dir():
        return None
    shutil.rmtree(folder)
    return folder


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _EventLogHandler(logging.Handler):
    """The child's own log lines (INFO and up) become the job's `log` events."""

    def __init__(self, registry: JobRegistry, job_id: str):
        super().__init__(logging.INFO)
        self.registry, self.job_id = registry, job_id

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "state_change", False):  # already a status event
            return
        try:
            self.registry.add_event(self.job_id, "log", {"level": record.levelname, "message": record.getMessage()})
        except Exception:  # a log line must never fail the training
            self.handleError(record)


def _training_samples(settings: Settings, job: JobPublic) -> list[Sample]:
    """The speaker's stored samples; with checkpointing, a snapshot kept beside the checkpoints so a
    resumed run sees the same data in the same order even after new uploads."""
    snapshot = checkpoint_dir(settings, job.job_id) / "samples.json"
    if job.config.checkpoint_steps and snapshot.exists():
        return [Sample.model_validate(s) for s in json.loads(snapshot.read_text(encoding="utf-8"))]
    stored = dialog_parser.load_speaker(settings.DATA_DIR, job.speaker)
    samples = stored.messages if stored else []
    if job.config.checkpoint_steps:
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(json.dumps([s.model_dump(mode="json") for s in samples], ensure_ascii=False), encoding="utf-8")
    return samples


def run_job(job_id: str) -> int:
    """The child process: train one job and record its outcome in the registry."""
    import train

    settings = get_settings()
    registry = JobRegistry(settings.db_path)
    job = registry.get(job_id)
    stop, training = threading.Event(), threading.Event()
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    main_process = train.is_main_process()

    def on_sigterm(signum, frame):
        if distributed or not training.is_set():
            # Nothing worth keeping yet; or several processes, which must stop at the same step: they
            # end now, before the main one writes anything. The supervisor records why.
            os._exit(128 + signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    _die_with_server()
    if settings.TRAIN_NICE:
        os.nice(settings.TRAIN_NICE)  # the server's requests come first when they share the cores
    if main_process:
        logging.getLogger("persona_lora").addHandler(_EventLogHandler(registry, job_id))
    ckpt_dir = checkpoint_dir(settings, job_id)
    resume_from = job.checkpoint if job.checkpoint and Path(job.checkpoint).is_dir() else None
    if resume_from:
        log.info("resuming from %s", resume_from)
    try:
        outcome = train.train_lora(
            _training_samples(settings, job), job.speaker, job.config, settings.OUTPUT_DIR, settings.MODELS_DIR,
            stop=stop,
            callbacks=[
                train.started_callback(training),
                *([train.progress_callback(lambda p: registry.update_progress(job_id, p), settings.PROGRESS_INTERVAL_S),
                   train.checkpoint_callback(lambda path: registry.set_checkpoint(job_id, path))] if main_process else []),
            ],
            checkpoint_dir=ckpt_dir if job.config.checkpoint_steps else None,
            resume_from=resume_from,
            run_name=f"{job.speaker}-{job_id[:8]}",
        )
    except train.TrainingStopped:
        return 3  # the supervisor records cancelled or interrupted
    except Exception as exc:  # the job is the boundary: report it as a message a user can act on
        log.exception("job %s failed", job_id)
        registry.mark_failed(job_id, describe_failure(exc))
        return 1
    if not main_process:
        return 0
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    summary = {k: v for k, v in outcome.info.items() if k not in ("loss_history", "config", "heldout_ids")}
    if settings.EVALUATE_AFTER_TRAINING:
        try:
            import evals

            log.info("evaluating the adapter on %d held-out samples", outcome.info.get("num_heldout", 0))
            summary["evaluation"] = evals.summary(evals.evaluate_speaker(settings, job.speaker))
        except Exception as exc:  # the adapter is good; say why there is no report
            log.exception("evaluation failed")
            summary["evaluation_error"] = describe_failure(exc)
    registry.mark_succeeded(job_id, {"model_path": display_path(outcome.model_path), **summary})
    return 0


def _die_with_server() -> None:
    """A child whose server was killed must not train on, or later overwrite the adapter. The
    kernel ends a direct child with its parent (Linux); a watchdog covers processes started by
    `accelerate launch` and other systems."""
    server = int(os.environ.get("PERSONA_LORA_SERVER_PID", 0))
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if not server:
        return

    def watch() -> None:
        while True:
            try:
                os.kill(server, 0)
            except ProcessLookupError:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, name="server-watchdog", daemon=True).start()


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
