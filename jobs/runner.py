"""The job runner: executes queued jobs (trainings and exports) in submission order, each in a
supervised child process, off the event loop; and the child's side (`python -m jobs.runner run JOB_ID`),
which trains and evaluates, or makes an export (lm/export.py), and records the outcome.

`run_job` (the child) is the one place where a job's exceptions are caught and turned into a
message stored with the job; the supervising thread records a child that died without one. Knows
nothing of HTTP; job state lives in the registry.
"""

from __future__ import annotations

import errno
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import store
from config import Settings, get_settings
from errors import InsufficientStorage, StorageError, TrainingError
from jobs.registry import INTERRUPTED, JobRegistry
from jobs.report import StdoutReport
from lm import adapters
from lm import callbacks as run_callbacks
from lm import export as model_export
from models import JobProgress, JobPublic, JobStatus, Sample

log = logging.getLogger("persona_lora.jobs")

ROOT = Path(__file__).resolve().parents[1]  # the project: the child imports its modules from here
STOP_GRACE_S = 60  # a step of a large model on a CPU can take this long
CHECKPOINTS = ".checkpoints"  # under OUTPUT_DIR, one folder per job
RETRY_S = 2.0  # how often a supervisor retries recording an outcome the registry could not take
DISK_FULL_EXIT = 75  # the child's exit status when the disk was too full to record its own failure (EX_TEMPFAIL)
DISK_FULL = "disk full: training stopped because DATA_DIR or OUTPUT_DIR had no space left; free space and train again"


class JobRunner:
    """Runs queued jobs in submission order, TRAIN_WORKERS at once.

    Each job trains in a child process (`python -m jobs.runner run JOB_ID`) supervised by a thread of this
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

    def recover(self) -> None:
        """At start-up: jobs a dead server left running failed (their children died with it); queued
        ones run again, oldest first."""
        for job_id in self.registry.recover():
            self.submit(job_id)

    def check_available(self) -> None:
        """Raise ServiceUnavailable when jobs cannot be started now (a local child always can)."""

    def shutdown(self) -> None:
        """Stop running trainings at their next step (the jobs fail as interrupted) and drop the
        queue; queued jobs stay queued in the database and run after the next start."""
        self.stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, job_id: str, supervise=None) -> None:
        """Supervise one job (with `supervise(job_id)`, by default `_supervise`). Never ends silently:
        whatever goes wrong here is logged, and the job ends failed with the reason (retried until the
        registry can be written, e.g. after a full disk)."""
        try:
            (supervise or self._supervise)(job_id)
        except Exception as exc:
            log.exception("job %s: its supervisor failed", job_id)
            reason = f"the job's supervisor failed ({describe_failure(exc)}); train again"
            self._until_written(job_id, lambda: self.registry.mark_failed(job_id, reason))

    def _until_written(self, job_id: str, write):
        """`write()`'s result, retried every few seconds while the disk is full or unwritable; None if
        the server stops first (the next start fails a job left running)."""
        warned = False
        while True:
            try:
                return write()
            except (StorageError, sqlite3.OperationalError) as exc:
                if not warned:
                    log.warning("job %s: the registry cannot be written (%s); retrying until it can", job_id, exc)
                    warned = True
            if self.stop.wait(RETRY_S):
                return None

    def _supervise(self, job_id: str) -> None:
        if self.stop.is_set() or not self._until_written(job_id, lambda: self.registry.mark_running(job_id)):
            return  # shutting down, or cancelled while queued
        job = self.registry.get(job_id)
        self._finish(job, self._execute(job))

    def _execute(self, job: JobPublic) -> Exit | None:
        """Run the job's child process to its end; how it ended (None: it runs on without us, and the
        next start follows it again: only a cluster's jobs do)."""
        job_id, log_path = job.job_id, job_log_path(self.settings, job.job_id)
        env = {
            **os.environ,
            "DATA_DIR": str(self.settings.DATA_DIR),
            "OUTPUT_DIR": str(self.settings.OUTPUT_DIR),
            "MODELS_DIR": str(self.settings.MODELS_DIR),
            "EXPORTS_DIR": str(self.settings.EXPORTS_DIR),
            "PYTHONUNBUFFERED": "1",
            "PERSONA_LORA_SERVER_PID": str(os.getpid()),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),  # for `-m jobs.runner`
        }
        cancelled = False
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = open(log_path, "ab")
        except OSError:  # a full or read-only disk: train without a log rather than not at all
            log_file = subprocess.DEVNULL
        try:
            child = subprocess.Popen(
                job_command(job_id, self.settings.TRAIN_PROCESSES if job.kind == "train" else 1),
                env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            )
            try:
                while child.poll() is None:
                    if self.stop.wait(0.5) or (cancelled := self._cancel_requested(job_id)):
                        child.terminate()  # the child stops at its next step, or at once while still loading
                        try:
                            child.wait(STOP_GRACE_S)
                        except subprocess.TimeoutExpired:
                            child.kill()
                            child.wait()
            finally:
                if child.poll() is None:  # this thread failed: the child must not train on unsupervised
                    child.kill()
                    child.wait()
        finally:
            if log_file is not subprocess.DEVNULL:
                log_file.close()
        return Exit(child.returncode, cancelled, interrupted=self.stop.is_set())

    def _finish(self, job: JobPublic, ended: Exit | None) -> None:
        """Record how the job's process ended, if it recorded nothing itself, and remove what a job that
        did not succeed left half-made."""
        if ended is None:
            return
        job_id = job.job_id
        self._until_written(job_id, lambda: self._record_exit(job_id, ended, job_log_path(self.settings, job_id), job.kind))
        finished = self.registry.get(job_id)
        log.info("job %s (%s): %s", job_id, job.speaker, outcome(finished))
        if finished.status == JobStatus.succeeded:
            return
        if job.kind == "train":  # a child killed mid-training or mid-evaluation leaves its `.tmp-` adapter
            adapters.discard_partial(self.settings.OUTPUT_DIR, job.speaker)
            last = last_checkpoint(self.settings, job_id)
            if last is not None and str(last) != finished.checkpoint:
                self._until_written(job_id, lambda: self.registry.set_checkpoint(job_id, str(last)))
        else:
            model_export.discard_partial(self.settings.EXPORTS_DIR, job.speaker, job.config.export)

    def _cancel_requested(self, job_id: str) -> bool:
        try:
            state = self.registry.state(job_id)
        except (StorageError, sqlite3.OperationalError):
            return False  # asked again in half a second
        return bool(state and state[1])

    def _record_exit(self, job_id: str, ended: Exit, log_path: Path, kind: str) -> None:
        """The outcome of a child that recorded none itself."""
        state = self.registry.state(job_id)
        if not state or state[0] != JobStatus.running.value:
            return
        if ended.cancelled:
            self.registry.mark_cancelled(job_id)
        elif ended.interrupted:
            self.registry.mark_failed(job_id, INTERRUPTED)
        elif ended.returncode == DISK_FULL_EXIT:
            self.registry.mark_failed(job_id, DISK_FULL)
        else:
            self.registry.mark_failed(
                job_id, f"the {'training' if kind == 'train' else 'export'} process {ended.how}; "
                        f"last log lines:\n{_tail(log_path)}")


@dataclass(frozen=True)
class Exit:
    """How a job's process ended: its exit status (negative: the signal that killed it, as subprocess
    has it), whether it was stopped on a cancel or because the server stopped, and what the
    system that ran it said of the end (a cluster's reason: a node that died)."""

    returncode: int | None
    cancelled: bool = False
    interrupted: bool = False
    note: str | None = None

    @property
    def how(self) -> str:
        code = self.returncode
        text = f"exited with status {code}" if code is not None else "ended without an exit status"
        if code is not None and code < 0:
            text += f" (killed by {signal.Signals(-code).name})" if -code in signal.valid_signals() else ""
        return text + (f" ({self.note})" if self.note else "")


def outcome(job: JobPublic) -> str:
    """A finished job in one line of the server's log: its status and duration, a training's figures
    and warnings, a failure's reason (its first line: the rest quotes the child's log)."""
    took = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else None
    text = f"{job.status.value}" + (f" in {took:.1f} s" if took is not None else "")
    if job.status == JobStatus.failed:
        return f"{text}: {(job.error or 'no reason recorded').splitlines()[0][:300]}"
    result = job.result or {}
    if job.status != JobStatus.succeeded or job.kind != "train":
        return text + (f": {result['path']}" if result.get("path") else "")
    held = (result.get("evaluation") or {}).get("held_out") or {}
    loss = lambda who: (held.get(who) or {}).get("loss")  # noqa: E731
    figures = [f"{result.get('steps')} steps on {result.get('num_samples_used')} samples",
               f"training loss {result['train_loss']:.3f}" if result.get("train_loss") is not None else None,
               f"held-out loss {loss('base'):.3f} (base) → {loss('adapter'):.3f}" if loss("base") and loss("adapter") else None,
               ((result.get("evaluation") or {}).get("judge") or {}).get("text")]
    return f"{text}: " + ", ".join(f for f in figures if f) + "".join(f"; warning: {w}" for w in result.get("warnings", []))


def job_command(job_id: str, processes: int) -> list[str]:
    """The child's command line: this module, or several copies of it under `accelerate launch`
    (data parallel: one process per GPU, or gloo between CPU processes). It runs as a module
    (`-m`), with the project's root on PYTHONPATH (`child_env`), in the server's working directory,
    so that relative DATA_DIR and OUTPUT_DIR mean the same folders."""
    if processes <= 1:
        return [sys.executable, "-m", "jobs.runner", "run", job_id]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "--module", "jobs.runner", "run", job_id]  # a free rendezvous port: two launches never collide


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_log_path(settings: Settings, job_id: str) -> Path:
    return settings.DATA_DIR / "logs" / f"{job_id}.log"


def checkpoint_dir(settings: Settings, job_id: str) -> Path:
    return settings.OUTPUT_DIR / CHECKPOINTS / job_id


def last_checkpoint(settings: Settings, job_id: str) -> Path | None:
    """The job's newest whole checkpoint (the Trainer writes trainer_state.json last into each), where
    a resume starts: the job's last report may name one since rotated away (the Trainer removes the old
    one before it reports the new), or none of the last ones (a worker's last lines die with its node)."""
    whole = [p for p in checkpoint_dir(settings, job_id).glob("checkpoint-*")
             if p.name.removeprefix("checkpoint-").isdigit() and (p / "trainer_state.json").is_file()]
    return max(whole, key=lambda p: int(p.name.removeprefix("checkpoint-")), default=None)


def delete_checkpoint(settings: Settings, job_id: str) -> Path | None:
    folder = checkpoint_dir(settings, job_id)
    if not folder.is_dir():
        return None
    shutil.rmtree(folder)
    return folder


def delete_job_files(settings: Settings, job_id: str) -> list[Path]:
    """Remove the job's checkpoint folder (it holds a snapshot of the samples) and its log; the paths removed."""
    removed = [folder] if (folder := delete_checkpoint(settings, job_id)) else []
    log_path = job_log_path(settings, job_id)
    if log_path.is_file():
        log_path.unlink()
        removed.append(log_path)
    return removed


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _EventLogHandler(logging.Handler):
    """The child's own log lines (INFO and up) become the job's `log` events."""

    def __init__(self, registry: JobRegistry | StdoutReport, job_id: str):
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
    stored = store.load_speaker(settings.DATA_DIR, job.speaker)
    samples = stored.messages if stored else []
    if job.config.checkpoint_steps:
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(json.dumps([s.model_dump(mode="json") for s in samples], ensure_ascii=False), encoding="utf-8")
    return samples


def run_job(job_id: str, report: str = "registry") -> int:
    """The child process: train one job, evaluate the trained model, and record the outcome; or make
    an export job's export. With `report="stdout"` (a worker on a cluster, jobs.cluster), the job's
    record comes from the environment and every record is a line on stdout (jobs.report), so the
    worker never opens the registry."""
    settings = get_settings()
    registry = StdoutReport.from_env() if report == "stdout" else JobRegistry(settings.db_path)
    job = registry.get(job_id)
    if job.kind != "train":
        return run_export(job, registry, settings)

    import train
    from lm import evals
    from lm.base_model import is_main_process

    stop, training = threading.Event(), threading.Event()
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    main_process = is_main_process()

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
    evaluate = evals.after_training(settings, job.speaker, job.config) if settings.EVALUATE_AFTER_TRAINING else None
    try:
        outcome = train.train_lora(
            _training_samples(settings, job), job.speaker, job.config, settings.OUTPUT_DIR, settings.MODELS_DIR,
            stop=stop,
            callbacks=[
                run_callbacks.started_callback(training),
                *([run_callbacks.progress_callback(lambda p: registry.update_progress(job_id, p), settings.PROGRESS_INTERVAL_S),
                   run_callbacks.checkpoint_callback(lambda path: registry.set_checkpoint(job_id, path))] if main_process else []),
            ],
            checkpoint_dir=ckpt_dir if job.config.checkpoint_steps else None,
            resume_from=resume_from,
            run_name=f"{job.speaker}-{job_id[:8]}",
            evaluate=evaluate if main_process else None,
        )
    except train.TrainingStopped:
        return 3  # the supervisor records cancelled or interrupted
    except Exception as exc:  # the job is the boundary: report it as a message a user can act on
        log.exception("job %s failed", job_id)
        try:
            registry.mark_failed(job_id, describe_failure(exc))
        except InsufficientStorage:
            return DISK_FULL_EXIT  # the supervisor records it once the disk has room
        return 1
    if not main_process:
        return 0
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    summary = {k: v for k, v in outcome.info.items() if k not in ("loss_history", "config", "heldout_ids")}
    if outcome.evaluation is not None:
        summary["evaluation"] = evals.summary(outcome.evaluation)
        summary["warnings"] = outcome.evaluation.get("warnings", [])  # in words, beside the numbers
    if outcome.evaluation_error is not None:
        summary["evaluation_error"] = outcome.evaluation_error
    registry.mark_succeeded(job_id, {"model_path": display_path(outcome.model_path), **summary})
    return 0


def run_export(job: JobPublic, registry: JobRegistry | StdoutReport, settings: Settings) -> int:
    """The child process of an export job: make the export, reporting each stage as progress, and
    record the outcome. SIGTERM (cancel) ends it at once; the supervisor removes what it left."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))
    _die_with_server()
    if settings.TRAIN_NICE:
        os.nice(settings.TRAIN_NICE)
    logging.getLogger("persona_lora").addHandler(_EventLogHandler(registry, job.job_id))
    kind = job.config.export

    def progress(step: int, stages: int, name: str) -> None:
        registry.update_progress(job.job_id, JobProgress(step=step, total_steps=stages, stage=name))

    try:
        folder = model_export.export(settings, job.speaker, kind, job.config.dtype, progress)
    except Exception as exc:
        log.exception("job %s failed", job.job_id)
        reason = str(exc) if isinstance(exc, (FileNotFoundError, ValueError)) else describe_failure(exc)
        try:
            registry.mark_failed(job.job_id, f"the {kind} export failed: {reason}")
        except InsufficientStorage:
            return DISK_FULL_EXIT
        return 1
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    registry.mark_succeeded(job.job_id, {"export": kind, "path": display_path(folder), "files": files,
                                         "url": f"/speakers/{job.speaker}/exports/{kind}"})
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
    if isinstance(exc, TrainingError):
        return str(exc)
    if isinstance(exc, InsufficientStorage) or getattr(exc, "errno", None) == errno.ENOSPC:
        return DISK_FULL
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return "out of memory: lower batch_size or max_seq_length, or use a smaller BASE_MODEL"
    return f"{type(exc).__name__}: {exc}"


def display_path(path: Path) -> str:
    """'./data/x.json' for relative paths, as users type them; absolute paths unchanged."""
    text = str(path)
    return text if path.is_absolute() or text.startswith(".") else f"./{text}"


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:]
    if len(args) not in (2, 4) or args[0] != "run" or (len(args) == 4 and args[2:] != ["--report", "stdout"]):
        sys.exit("usage: python -m jobs.runner run JOB_ID [--report stdout]   (started by the server for each job; "
                 "--report stdout on a cluster, with the job in $PERSONA_LORA_JOB)")
    sys.exit(run_job(args[1], "stdout" if len(args) == 4 else "registry"))
