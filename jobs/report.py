"""A job's progress and outcome as lines of text, for a worker that cannot open the registry (a job
on a Ray cluster: SQLite must not be shared over a network filesystem).

The worker's side, `StdoutReport`, answers the calls the child makes on the registry (`get`,
`update_progress`, `set_checkpoint`, `add_event`, `mark_failed`, `mark_succeeded`) by printing one
line each: `PREFIX` and a JSON object with a sequence number. The server's side, `Lines` and
`record`, finds those lines in the job's log, wherever library output put them, and makes the same
calls on the registry, each line once (`seq`). Knows nothing of Ray or of processes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Any, Iterator, TextIO

from jobs.registry import JobRegistry
from models import JobProgress, JobPublic

log = logging.getLogger("persona_lora.jobs")

PREFIX = "@@persona-lora "  # starts every report line; library output never does
JOB_ENV = "PERSONA_LORA_JOB"  # the job's record (JobPublic JSON), given to a worker that cannot read the registry


class StdoutReport:
    """The registry, as the child sees it, reporting to stdout instead: one line per call."""

    def __init__(self, job: JobPublic, stream: TextIO | None = None):
        self.job, self.stream, self.seq, self._lock = job, stream or sys.stdout, 0, threading.Lock()

    @classmethod
    def from_env(cls) -> StdoutReport:
        return cls(JobPublic.model_validate_json(os.environ[JOB_ENV]))

    def get(self, job_id: str) -> JobPublic:
        return self.job

    def _emit(self, op: str, **data: Any) -> None:
        with self._lock:  # the progress callback and the log handler may report from different threads
            self.seq += 1
            line = json.dumps({"seq": self.seq, "op": op, **data}, ensure_ascii=False)
            # A newline first: a progress bar may have left the line unfinished.
            self.stream.write(f"\n{PREFIX}{line}\n")
            self.stream.flush()

    def update_progress(self, job_id: str, progress: JobProgress) -> None:
        self._emit("progress", progress=progress.model_dump())

    def set_checkpoint(self, job_id: str, path: str) -> None:
        self._emit("checkpoint", path=path)

    def add_event(self, job_id: str, type_: str, data: dict[str, Any]) -> None:
        self._emit("event", type=type_, data=data)

    def mark_failed(self, job_id: str, error: str) -> None:
        self._emit("failed", error=error)

    def mark_succeeded(self, job_id: str, result: dict[str, Any]) -> None:
        self._emit("succeeded", result=result)


class Lines:
    """Report lines from a log that arrives in chunks (a chunk may end mid-line)."""

    def __init__(self):
        self._rest = ""

    def feed(self, chunk: str) -> Iterator[dict[str, Any]]:
        lines = (self._rest + chunk).split("\n")
        self._rest = lines.pop()
        for line in lines:
            if (report := parse(line)) is not None:
                yield report


def parse(line: str) -> dict[str, Any] | None:
    """The report on this line; None for any other line (a library's log, a progress bar)."""
    at = line.find(PREFIX)
    if at < 0:
        return None
    try:
        report = json.loads(line[at + len(PREFIX):])
    except ValueError:
        log.warning("a report line of a job's log cannot be read; skipped: %.200s", line)
        return None
    return report if isinstance(report, dict) and isinstance(report.get("seq"), int) else None


def record(registry: JobRegistry, job_id: str, report: dict[str, Any]) -> None:
    """Make the worker's call on the registry (once per `seq`, however often the line is read)."""
    op, seq = report.get("op"), report["seq"]
    if op == "progress":
        registry.update_progress(job_id, JobProgress.model_validate(report["progress"]), seq=seq)
    elif op == "checkpoint":
        registry.set_checkpoint(job_id, report["path"], seq=seq)
    elif op == "event":
        registry.add_event(job_id, report["type"], report["data"], seq=seq)
    elif op == "failed":
        registry.mark_failed(job_id, report["error"], seq=seq)
    elif op == "succeeded":
        registry.mark_succeeded(job_id, report["result"], seq=seq)
    else:
        log.warning("job %s: a report of unknown kind %r; skipped", job_id, op)
