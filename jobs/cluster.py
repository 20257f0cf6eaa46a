"""Jobs on a Ray cluster (EXECUTOR=ray), through Ray's Jobs API: each attempt of a job is a Ray job
whose entrypoint is the local runner's own child command with `--report stdout`, submitted with a
`submission_id` made of our job id and attempt (submitting it again changes nothing), the GPUs it
needs, and the service's settings as its environment.

The worker never opens the registry (SQLite must not be shared over a network filesystem): it prints
its progress and outcome as report lines (jobs.report), which a thread here follows through
`tail_job_logs` and records, the same calls the local child makes. A Ray job outlives the server
that submitted it: at the next start the running ones are followed again by their submission_id.
Files are shared by path: DATA_DIR, OUTPUT_DIR, MODELS_DIR and EXPORTS_DIR (and this code, and
Python) must be at the same paths on every node, e.g. on NFS. Knows nothing of HTTP.

Ray is an optional install (requirements-ray.txt), imported only here.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from pydantic import SecretStr

from config import Settings
from errors import ServiceUnavailable
from jobs import report
from jobs.registry import JobRegistry
from jobs.runner import ROOT, STOP_GRACE_S, Exit, JobRunner, job_command, job_log_path
from models import JobPublic

log = logging.getLogger("persona_lora.jobs")

POLL_S = 1.0  # how often a running job's status and cancel flag are read
UNREACHABLE_RETRY_S = 5  # a queued job waiting for an unreachable cluster tries again this often
LOST_AFTER_S = 300  # a running job whose cluster stays unreachable this long is failed (a head restarted without
#                     GCS fault tolerance forgets its jobs; five minutes covers a head pod's restart)
NOT_SENT = ("API_KEY", "EXECUTOR", "RAY_ADDRESS")  # settings a worker has no use for; API_KEY is a secret
INSTALL = "EXECUTOR=ray needs Ray, which is not installed: pip install -r requirements-ray.txt"


def open_runner(registry: JobRegistry, settings: Settings) -> JobRunner:
    """The executor EXECUTOR names: jobs.runner's local children, or jobs on a Ray cluster."""
    return RayRunner(registry, settings) if settings.EXECUTOR == "ray" else JobRunner(registry, settings)


def submission_id(job_id: str, attempt: int) -> str:
    return f"persona-lora-{job_id}-{attempt}"


def connect(address: str):
    """A Jobs API client; OSError (ConnectionError) when the cluster cannot be reached. Ray finds the
    cluster's token itself (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH); this module never sees it."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise RuntimeError(INSTALL) from None
    return JobSubmissionClient(address)


def cluster_gpus(address: str) -> float:
    """The GPUs of the cluster's live nodes, from its dashboard's state API (the Jobs API has no call
    for it, and `ray.cluster_resources()` needs a driver connected to the cluster). ConnectionError
    when the dashboard cannot be reached."""
    from ray.util.state import list_nodes
    from ray.util.state.exception import ServerUnavailable

    try:  # every node, the dead too: with a filter on state Ray 2.60 counts the dead as truncated output and raises
        nodes = list_nodes(address=address, limit=10_000, detail=True)
    except ServerUnavailable as exc:
        raise ConnectionError(str(exc).split(". ")[0]) from exc
    return sum(node.resources_total.get("GPU", 0) for node in nodes if node.state == "ALIVE")


def train_gpus(setting: float | None, cluster: Callable[[], float]) -> tuple[float, str]:
    """The GPUs a training asks for, and why: TRAIN_GPUS when it is set (the cluster is not asked);
    unset, 1 when `cluster()` counts a GPU, else 0 (a job asking a CPU-only cluster for one would wait
    forever)."""
    if setting is not None:
        return setting, f"TRAIN_GPUS={setting:g}"
    has = cluster()
    return (1 if has >= 1 else 0), f"TRAIN_GPUS unset; the cluster has {f'{has:g}' if has else 'none'}"


def gpus_text(gpus: float, why: str) -> str:
    return f"asked the cluster for {gpus:g} GPU{'' if gpus == 1 else 's'} ({why})"


def ray_reason(message: str) -> str:
    """Ray's words for how a job ended, on one line: its message without the log Ray quotes and without
    the lines that name Ray's internals (an actor's class, id, pid and namespace), so that what is
    left says what died and why (a lost node: its id and Ray's reason)."""
    lines = [line.strip().rstrip(".") for line in message.split(", last available logs")[0].splitlines()]
    kept = [line for line in lines if line and not re.match(r"(class_name|actor_id|pid|name|namespace): ", line)]
    return "; ".join(kept)[:500]


def worker_env(settings: Settings, job: JobPublic) -> dict[str, str]:
    """The worker's environment: the server's settings as variables (folders made absolute: a Ray
    job runs in a directory of its own), the job's record, the project on PYTHONPATH; no secrets
    (Ray shows a job's environment to whoever can read its dashboard)."""
    env = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if name in NOT_SENT or value is None or isinstance(value, SecretStr):
            continue
        if isinstance(value, Path):
            value = value.resolve()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list):
            value = ",".join(value)
        env[name] = str(value)
    return {**env, report.JOB_ENV: job.model_dump_json(), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
            "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S)}  # Ray's SIGKILL after SIGTERM, as the local runner's


def entrypoint(job: JobPublic, processes: int) -> str:
    """The local child's command, reporting on stdout; `exec`, so that Ray's exit status is the
    child's own (-9 for a kill, not the shell's 137). The same Python path on every node (one image)."""
    return "exec " + shlex.join([*job_command(job.job_id, processes if job.kind == "train" else 1), "--report", "stdout"])


class RayRunner(JobRunner):
    """The JobRunner whose jobs run on a Ray cluster: TRAIN_WORKERS of them submitted at a time, each
    followed by a thread of the runner's pool (and one that reads its log)."""

    def __init__(self, registry: JobRegistry, settings: Settings):
        try:
            import ray.job_submission  # noqa: F401  (fail at start-up, saying what to install)
        except ImportError:
            raise RuntimeError(INSTALL) from None
        super().__init__(registry, settings)
        self.address = settings.RAY_ADDRESS

    def recover(self) -> None:
        """At start-up: running jobs are followed again on the cluster (they ran on without us), then
        queued ones are submitted."""
        for job_id in self.registry.running():
            self._pool.submit(self._run, job_id, self._reattach)
        for job_id in self.registry.recover(keep_running=True):
            self.submit(job_id)

    def check_available(self) -> None:
        try:
            connect(self.address)
        except OSError as exc:
            raise ServiceUnavailable(self._unreachable(exc) + "; nothing was queued. Retry after the Retry-After "
                                     "seconds, or start the cluster (README, 'Beyond one machine')", UNREACHABLE_RETRY_S)

    def _unreachable(self, exc: BaseException) -> str:
        return f"the Ray cluster at {self.address} (RAY_ADDRESS) cannot be reached ({type(exc).__name__})"

    def _supervise(self, job_id: str) -> None:
        reached = self._wait_for_cluster(job_id)
        if reached is None or not self._until_written(job_id, lambda: self.registry.mark_running(job_id)):
            return  # shutting down, or cancelled while queued
        client, gpus = reached
        job = self.registry.get(job_id)
        sid = submission_id(job_id, self.registry.attempts(job_id))
        if job.kind == "train":
            self._note(job_id, gpus_text(*gpus))
        try:
            client.submit_job(
                entrypoint=entrypoint(job, self.settings.TRAIN_PROCESSES), submission_id=sid,
                entrypoint_num_cpus=1,  # the cluster's CPU slots bound how many run at once
                entrypoint_num_gpus=gpus[0],
                runtime_env={"env_vars": worker_env(self.settings, job)},
            )
        except RuntimeError as exc:
            if "already exists" not in str(exc):  # a submission made before a crash: follow it
                raise
        log.info("job %s: submitted to the Ray cluster as %s", job_id, sid)
        self._finish(job, self._follow(client, job, sid))

    def _reattach(self, job_id: str) -> None:
        job = self.registry.get(job_id)
        sid = submission_id(job_id, self.registry.attempts(job_id))
        client = self._reach(job_id, time.monotonic())
        if client is None:
            return
        try:
            client.get_job_info(sid)
        except RuntimeError:
            self._finish(job, Exit(None, note=f"its Ray job {sid} is not on the cluster at {self.address}: did the "
                                              "cluster restart? Resume the job or train again"))
            return
        log.info("job %s: following its Ray job %s again", job_id, sid)
        self._finish(job, self._follow(client, job, sid))

    def _wait_for_cluster(self, job_id: str):
        """A client and the GPUs the job asks for, with why, once the cluster answers (a training asks
        the cluster how many it has when TRAIN_GPUS is unset; an export asks for none); None if the
        server stops or the job leaves the queue first (a queued job waits for an unreachable cluster
        rather than fail)."""
        warned = False
        while True:
            state = self.registry.state(job_id)
            if not state or state[0] != "queued":
                return None
            try:
                client = connect(self.address)
                if self.registry.get(job_id).kind != "train":
                    return client, (0, "an export")
                return client, train_gpus(self.settings.TRAIN_GPUS, lambda: cluster_gpus(self.address))
            except OSError as exc:
                if not warned:
                    log.warning("job %s: %s; it stays queued, retrying every %d s", job_id, self._unreachable(exc),
                                UNREACHABLE_RETRY_S)
                    warned = True
            if self.stop.wait(UNREACHABLE_RETRY_S):
                return None

    def _reach(self, job_id: str, since: float):
        """A client, retried while the cluster is unreachable for up to LOST_AFTER_S after `since`;
        None if the server stops first. Raises the last error after that."""
        while True:
            try:
                return connect(self.address)
            except OSError:
                if time.monotonic() - since > LOST_AFTER_S:
                    raise
            if self.stop.wait(UNREACHABLE_RETRY_S):
                return None

    def _follow(self, client, job: JobPublic, sid: str) -> Exit | None:
        """Follow the Ray job to its end: its report lines recorded as they come, a cancel passed on
        as stop_job (SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S), the whole log kept at the
        end. None when the server stops first: the job runs on, and the next start follows it."""
        job_id = job.job_id
        tail = Tail(client, sid, lambda reports: self._record_lines(job_id, reports))
        tail.start()
        cancelled, lost_since, told = False, None, False
        while True:
            if self.stop.wait(POLL_S):
                return None
            if not cancelled and self._cancel_requested(job_id):
                try:
                    client.stop_job(sid)
                    cancelled = True
                except OSError as exc:  # asked again at the next poll: the job must not run on unsupervised
                    if not told:
                        log.warning("job %s: the cancel cannot reach the cluster yet (%s); it is passed on once it answers",
                                    job_id, self._unreachable(exc))
                        told = True
            try:
                info = client.get_job_info(sid)
            except OSError as exc:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > LOST_AFTER_S:
                    return Exit(None, note=f"{self._unreachable(exc)} for {LOST_AFTER_S} s while the job ran")
                continue
            lost_since = None
            if info.status.is_terminal():
                break
            if tail.ended_for(UNREACHABLE_RETRY_S):  # its connection broke (the cluster unreachable a moment)
                log.info("job %s: following its log again", job_id)
                tail.start()
        tail.join(timeout=10)
        logs = self._whole_log(client, job_id, sid, tail.text)
        self._record_lines(job_id, report.Lines().feed(logs + "\n"))  # anything the tail missed, once
        self._keep_log(job_id, logs)
        note = None
        if info.status.value == "STOPPED" and not cancelled:
            note = "stopped on the Ray cluster, not by this service"
        elif info.status.value == "FAILED" and info.error_type != "JOB_ENTRYPOINT_COMMAND_ERROR":
            note = f"Ray: {ray_reason(info.message or info.error_type or '')}"
        return Exit(info.driver_exit_code, cancelled, note=note)

    def _whole_log(self, client, job_id: str, sid: str, tailed: str) -> str:
        """The job's whole log from Ray; as far as its tail read it when Ray has it no more (the node
        that ran the job was lost, and its log with it)."""
        try:
            return client.get_job_logs(sid)
        except (RuntimeError, OSError) as exc:  # Ray's error quotes the dashboard's traceback: its last words say why
            why = next((line.strip() for line in reversed(str(exc).splitlines()) if len(line.strip()) > 3), type(exc).__name__)
            log.warning("job %s: the cluster cannot give its whole log (%s); it is kept as far as it was followed",
                        job_id, why[:200])
            return tailed

    def _record_lines(self, job_id: str, reports) -> None:
        for line in reports:
            self._until_written(job_id, lambda: report.record(self.registry, job_id, line))

    def _note(self, job_id: str, message: str) -> None:
        """A line of this server's about the job: in its log, as a `log` event and in the job's log."""
        log.info("job %s: %s", job_id, message)
        self._until_written(job_id, lambda: self.registry.add_event(job_id, "log", {"level": "INFO", "message": message}))
        self._keep_log(job_id, message + "\n")

    def _keep_log(self, job_id: str, logs: str) -> None:
        """Text in the job's log, where the local runner keeps it (each attempt appended)."""
        path = job_log_path(self.settings, job_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(logs)
        except OSError as exc:
            log.warning("job %s: its log could not be kept in %s (%s)", job_id, path, exc)


class Tail:
    """A Ray job's log as Ray streams it (`tail_job_logs`), on a thread with an event loop of its own:
    each chunk's report lines handed to `record`, and the text kept (`text`, once a tail ended).
    Started again after its connection broke, it reads the log from the start (each line is recorded
    once: its `seq`)."""

    def __init__(self, client, sid: str, record: Callable[[Iterator[dict]], None]):
        self.client, self.sid, self.record = client, sid, record
        self.thread: threading.Thread | None = None
        self.ended_at: float | None = None
        self.text = ""  # the most of the log one tail read

    def start(self) -> None:
        self.ended_at = None
        self.thread = threading.Thread(target=self._run, name=f"tail-{self.sid[-10:]}", daemon=True)
        self.thread.start()

    def ended_for(self, seconds: float) -> bool:
        return self.ended_at is not None and time.monotonic() - self.ended_at > seconds

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        lines, read = report.Lines(), []

        async def follow() -> None:
            async for chunk in self.client.tail_job_logs(self.sid):
                read.append(chunk)
                self.record(lines.feed(chunk))

        try:
            asyncio.run(follow())
        except Exception as exc:  # the end is read from the whole log (RayRunner._follow)
            log.info("%s: following its log stopped (%s: %s)", self.sid, type(exc).__name__, str(exc)[:200])
        finally:
            if sum(map(len, read)) > len(self.text):
                self.text = "".join(read)
            self.ended_at = time.monotonic()
