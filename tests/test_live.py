"""A real uvicorn server on loopback: the end-to-end script, concurrent uploads, and SIGKILL."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import ROOT, LiveServer
from registry import INTERRUPTED


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


def test_concurrent_uploads_all_land(live_server, env):
    speakers = ["Ann", "Bob", "Олена"]

    async def one(client, i):
        speaker = speakers[i % len(speakers)]
        dialog = [{"speaker": "Other", "content": f"question {i}"}, {"speaker": speaker, "content": f"answer {i}"}]
        return await client.post("/upload-text", json={"dialog": dialog, "speaker": speaker})

    async def burst():
        async with httpx.AsyncClient(base_url=live_server.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(30)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 30
    for k, speaker in enumerate(speakers):
        data = json.loads((Path(env["DATA_DIR"]) / f"{speaker}_messages.json").read_text(encoding="utf-8"))
        assert sorted(m["reply"] for m in data["messages"]) == sorted(f"answer {i}" for i in range(k, 30, 3))


def test_sigkill_during_training_then_restart(env, tmp_path):
    dialog = [{"speaker": "B", "content": "ping"}, {"speaker": "User1", "content": "pong"}]
    server = LiveServer(env, tmp_path / "server1.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        assert http.post("/upload-text", json={"dialog": dialog, "speaker": "User1"}).status_code == 200
        assert http.post("/train", json={"speaker": "User1", "wait": True}).status_code == 200
        adapter = Path(env["OUTPUT_DIR"]) / "User1"
        before = {p.name: p.read_bytes() for p in adapter.iterdir()}
        job = http.post("/train", json={"speaker": "User1", "max_steps": 10**6}).json()
        deadline = time.monotonic() + 60
        while http.get(job["url"]).json()["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # a few steps in, the temporary adapter folder exists
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
    finally:
        server.stop()

    server = LiveServer(env, tmp_path / "server2.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        dead = http.get(job["url"]).json()
        assert (dead["status"], dead["error"]) == ("failed", INTERRUPTED)
        assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
        assert sorted(p.name for p in adapter.parent.iterdir()) == ["User1"]
        r = http.post("/train", json={"speaker": "User1", "wait": True})
        assert r.status_code == 200, r.text
    finally:
        server.stop()
