"""A real uvicorn server on loopback: the end-to-end script and SIGKILL during training."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, LiveServer, training, upload, wait_for_job, wait_until

from jobs.registry import INTERRUPTED


@pytest.mark.slow
def test_end_to_end_script_passes(live_server):
    run = subprocess.run(
        [sys.executable, "test.py", "--base-url", live_server.url, "--timeout", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "FAIL" not in run.stdout and run.stdout.strip().endswith(" 0 failed")


def test_end_to_end_script_fails_when_server_is_absent():
    run = subprocess.run(
        [sys.executable, "test.py", "--base-url", "http://127.0.0.1:9"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 1 and "cannot talk to" in run.stdout


@pytest.mark.slow
def test_sigkill_during_training_then_restart(env, tmp_path):
    dialog = [{"speaker": "B", "content": "ping"}, {"speaker": "User1", "content": "pong"}]
    server = LiveServer(env, tmp_path / "server1.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=300)
        upload(http, "User1", dialog)
        assert http.post("/train", json={"speaker": "User1", "wait": True}).status_code == 200
        adapter = Path(env["OUTPUT_DIR"]) / "User1"
        before = {p.name: p.read_bytes() for p in adapter.iterdir()}
        job = http.post("/train", json={"speaker": "User1", "max_steps": 10**6}).json()
        # Kill mid-training: steps done, and the half-written adapter folder there to be cleaned up.
        seen = wait_for_job(http, job["job_id"], training, timeout=120)
        tmp = wait_until(lambda: list(adapter.parent.glob(".tmp-User1-*")), 10, "the temporary adapter folder .tmp-User1-*")
        assert len(tmp) == 1 and seen["progress"]["step"] >= 1
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
    finally:
        server.stop()

    server = LiveServer(env, tmp_path / "server2.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=300)
        dead = http.get(job["url"]).json()
        assert (dead["status"], dead["error"]) == ("failed", INTERRUPTED)
        assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
        assert sorted(p.name for p in adapter.parent.iterdir()) == ["User1"]
        r = http.post("/train", json={"speaker": "User1", "wait": True})
        assert r.status_code == 200, r.text
    finally:
        server.stop()
