"""A real uvicorn server on loopback: the end-to-end script and SIGKILL during training."""

from __future__ import annotations

import re
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


@pytest.mark.slow
def test_the_log_says_what_happened_and_nothing_else(env, tmp_path):
    """At the default LOG_LEVEL: the job's lines with its figures; no library warnings (bitsandbytes' `kernels`,
    transformers' FutureWarning, both met when the first generation loads the model), no progress bars, no
    line per /health poll. LOG_LEVEL=debug brings the requests back."""
    secret = "таємниця-9c1e"
    dialog = [{"speaker": "B", "content": f"ping {i} {secret}"} if i % 2 == 0 else {"speaker": "User1", "content": f"pong {i}"}
              for i in range(40)]
    server = LiveServer(env, tmp_path / "server.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=300)
        for _ in range(3):
            assert http.get("/health").status_code == 200
        upload(http, "User1", dialog)
        job = http.post("/train", json={"speaker": "User1", "max_steps": 3}).json()
        done = wait_for_job(http, job["job_id"], lambda j: j["status"] in ("succeeded", "failed"), 300, interval=0.5)
        assert done["status"] == "succeeded", done["error"]
        assert done["result"]["warnings"] == done["result"]["evaluation"]["warnings"]  # said beside the numbers
        assert http.post("/generate", json={"speaker": "User1", "prompt": "hi", "max_new_tokens": 2}).status_code == 200
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text(encoding="utf-8")
    assert "FutureWarning" not in log and "kernels" not in log and "Loading weights" not in log and "it/s]" not in log, log
    assert "path=/health" not in log and f"path=/jobs/{job['job_id']}" not in log, log
    assert "method=POST path=/upload-text status=200" in log and "method=POST path=/train status=202" in log
    job_lines = [line.split("persona_lora.jobs: ", 1)[1] for line in log.splitlines() if "persona_lora.jobs: " in line]
    assert job_lines[:2] == [f"job {job['job_id']} (User1): queued", f"job {job['job_id']}: running"], job_lines
    held = done["result"]["evaluation"]["held_out"]
    assert re.fullmatch(rf"job {job['job_id']} \(User1\): succeeded in \d+\.\d s: 3 steps on \d+ samples, training loss "
                        rf"\d+\.\d{{3}}, held-out loss {held['base']['loss']:.3f} \(base\) → {held['adapter']['loss']:.3f}"
                        r"(, sounds like User1: .*?)?(; warning: .*)?", job_lines[2]), job_lines  # the judge's sentence, then warnings
    assert secret not in log

    server = LiveServer({**env, "LOG_LEVEL": "debug"}, tmp_path / "debug.log")
    try:
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()
    assert "DEBUG persona_lora.access: method=GET path=/health status=200" in (tmp_path / "debug.log").read_text(encoding="utf-8")
