"""A job's training process seen from outside, for the tests that stop, cancel or kill it at a
chosen point rather than race it: found by its job id, caught at its first whole checkpoint on disk,
and asked whether a signal waits for it. Knows nothing of the service's API or of Ray."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest


def worker_of(job_id: str) -> psutil.Process | None:
    """The job's training process (`python -m jobs.runner <job id>`), on this machine."""
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "jobs.runner" in cmd and job_id in cmd:
            return p
    return None


def whole_checkpoint(output_dir: str | Path, job_id: str) -> Path | None:
    """The job's first checkpoint that is whole on disk (the Trainer writes trainer_state.json last)."""
    done = sorted(Path(output_dir).glob(f".checkpoints/{job_id}/checkpoint-*/trainer_state.json"))
    return done[0].parent if done else None


def catch_at_checkpoint(proc: psutil.Process, output_dir: str | Path, job_id: str, sig: int,
                        timeout: float = 120) -> Path:
    """Send `sig` to the job's process the moment its first checkpoint is whole on disk (polled every
    few milliseconds: the server learns of it later, and a tiny model's run can end in that time).
    Fails the test when the process ends first."""
    deadline = time.monotonic() + timeout
    while not (ckpt := whole_checkpoint(output_dir, job_id)):
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE or time.monotonic() > deadline:
            pytest.fail(f"job {job_id}'s process ended or made no checkpoint within {timeout} s")
        time.sleep(0.002)
    proc.send_signal(sig)
    return ckpt


def pending(proc: psutil.Process, sig: int) -> bool:
    """Whether `sig` was sent to the (stopped) process and waits for it to continue."""
    masks = [line.split()[1] for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
             if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(int(mask, 16) >> (sig - 1) & 1 for mask in masks)

