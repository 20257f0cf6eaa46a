"""Fault runs: a full disk for a moment during training and during uploads, the server killed during
uploads, a damaged job database. After each: no acknowledged upload lost, no job left `running`, and
the service answering without a restart."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import LiveServer, fill_disk, finished, training, upload, wait_for_job

from jobs.runner import DISK_FULL


@pytest.mark.slow
def test_a_full_disk_during_training_fails_the_job_and_the_service_recovers(env, tmp_path, small_tmpfs):
    env = {**env, "DATA_DIR": str(small_tmpfs / "data"), "PROGRESS_INTERVAL_S": "0.1"}
    server = LiveServer(env, tmp_path / "server.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        upload(http, "S")
        job = http.post("/train", json={"speaker": "S", "max_steps": 10**6}).json()
        wait_for_job(http, job["job_id"], training, timeout=120)
        filler = fill_disk(small_tmpfs)
        full_until = time.monotonic() + 8
        while time.monotonic() < full_until:  # reads answer; writes say the disk is full
            assert http.get("/health").status_code == 200
            assert http.get(job["url"]).status_code == 200
            r = http.post(f"{job['url']}/cancel")
            assert r.status_code in (200, 507), r.text
            if r.status_code == 507:
                assert r.json()["detail"].startswith("disk full: the job registry could not be written")
            time.sleep(0.5)
        filler.unlink()
        ended = wait_for_job(http, job["job_id"], finished, timeout=60, what="the job to end once the disk has room")
        assert ended["status"] in ("failed", "cancelled"), ended
        if ended["status"] == "failed":
            assert ended["error"] == DISK_FULL
        assert [c for c in psutil.Process(server.proc.pid).children() if c.status() == psutil.STATUS_ZOMBIE] == []
        again = http.post("/train", json={"speaker": "S", "max_steps": 10**6})  # no restart needed
        assert again.status_code == 202, again.text
        assert http.post(f"{again.json()['url']}/cancel").status_code == 200
        assert wait_for_job(http, again.json()["job_id"], finished, timeout=120)["status"] == "cancelled"
        assert http.post("/speakers/S/evaluate").status_code == 404  # no adapter; not 409
        assert http.delete("/speakers/S").status_code == 200
    finally:
        server.stop()
    assert "content" not in Path(tmp_path / "server.log").read_text(errors="replace")


def test_a_damaged_job_database_is_moved_aside_at_start(env, caplog):
    from fastapi.testclient import TestClient

    from main import app

    db = Path(env["DATA_DIR"]) / "jobs.sqlite3"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not an SQLite database\n" * 200)
    with TestClient(app) as client:  # starts; before the fix, a raw DatabaseError traceback
        assert client.get("/health").status_code == 200
        assert client.get("/jobs").json() == {"data": [], "count": 0}
        upload(client, "A")
        assert client.post("/train", json={"speaker": "A", "max_steps": 1, "wait": True}).status_code == 200
    aside = list(db.parent.glob("jobs.sqlite3.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not an SQLite database")
    warned = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warned) == 1 and f"moved it aside to {aside[0].name} and started a fresh one" in warned[0]


def test_a_bad_job_row_is_skipped_with_a_warning(client, env, caplog):
    import sqlite3

    upload(client, "A")
    upload(client, "B")
    jobs = [client.post("/train", json={"speaker": s, "max_steps": 1, "wait": True}).json()["job"] for s in "AB"]
    with sqlite3.connect(Path(env["DATA_DIR"]) / "jobs.sqlite3") as db:
        db.execute("UPDATE jobs SET config = '{broken', progress = 'x' WHERE id = ?", (jobs[0]["job_id"],))
    r = client.get("/jobs")
    assert r.status_code == 200, r.text
    assert [j["job_id"] for j in r.json()["data"]] == [jobs[1]["job_id"]]
    assert any(f"job {jobs[0]['job_id']}: its row in jobs.sqlite3 cannot be read (ValidationError); skipped"
               == rec.getMessage() for rec in caplog.records)
    r = client.get(f"/jobs/{jobs[0]['job_id']}")
    assert r.status_code == 500 and r.json()["detail"].startswith(f"job '{jobs[0]['job_id']}' cannot be read: its row")
    assert client.post("/train", json={"speaker": "A", "max_steps": 1, "wait": True}).status_code == 200
    assert client.get("/health").status_code == 200


def test_a_full_disk_during_uploads_loses_no_acknowledged_upload(client, env, monkeypatch, small_tmpfs):
    import json
    import threading

    from config import get_settings

    monkeypatch.setenv("DATA_DIR", str(small_tmpfs / "data"))
    get_settings.cache_clear()
    upload(client, "A")
    answers: list[tuple[int, str]] = []

    def uploader(k: int):
        for i in range(30):
            reply = f"{k}-{i} " + "слово " * 400  # about 5 KB a message: the file grows until the disk is full
            r = client.post("/upload-text", json={"dialog": [{"speaker": "X", "content": "?"},
                                                            {"speaker": "A", "content": reply}], "speaker": "A"})
            answers.append((r.status_code, reply))
            if r.status_code == 507:
                assert r.json()["detail"].endswith("the stored messages are unchanged. Free disk space and retry.")
            time.sleep(0.1)  # 30 uploads over 3 s or more: some while full, some after

    threads = [threading.Thread(target=uploader, args=(k,)) for k in range(3)]
    filler = fill_disk(small_tmpfs)
    for t in threads:
        t.start()
    time.sleep(1.0)  # full for a moment, then room again
    filler.unlink()
    for t in threads:
        t.join(120)
    codes = {code for code, _ in answers}
    assert codes <= {200, 507} and 507 in codes and 200 in codes, codes
    stored = {m["reply"] for m in json.loads((small_tmpfs / "data" / "A_messages.json").read_text("utf-8"))["messages"]}
    assert {reply for code, reply in answers if code == 200} <= stored  # 0 acknowledged uploads lost
    assert list((small_tmpfs / "data").glob(".*.tmp")) == []
    assert client.get("/health").status_code == 200 and upload(client, "A")["total"] == len(stored)


@pytest.mark.slow  # trains the tiny model in a child process, and kills it
def test_a_training_child_killed_mid_training_leaves_no_half_made_adapter(client, env):
    output = Path(env["OUTPUT_DIR"])
    upload(client, "B")
    job = client.post("/train", json={"speaker": "B", "max_steps": 10**6}).json()
    wait_for_job(client, job["job_id"], training, timeout=120)
    assert [p.name[:7] for p in output.glob(".tmp-*")] == [".tmp-B-"]  # the adapter it is writing
    child, = [p for p in psutil.Process().children(recursive=True) if job["job_id"] in p.cmdline()]
    child.kill()  # as the OOM killer does
    ended = wait_for_job(client, job["job_id"], finished, timeout=60)
    assert ended["status"] == "failed" and ended["error"].startswith("the training process exited with status -9")
    assert list(output.glob(".tmp-*")) == []  # removed when the failure was recorded, not at the next start
    assert client.delete("/speakers/B").status_code == 200


def test_a_killed_training_is_resumable_from_its_newest_whole_checkpoint_whatever_it_last_reported(tmp_path):
    """The Trainer rotates the previous checkpoint away before it reports the new one, and a worker's
    last report lines die with its node: the job's folder, not its last report, says where to resume."""
    from config import Settings
    from jobs.registry import JobRegistry
    from jobs.runner import Exit, JobRunner, checkpoint_dir
    from models import TrainConfig

    settings = Settings(_env_file=None, DATA_DIR=tmp_path / "data", OUTPUT_DIR=tmp_path / "out")
    registry = JobRegistry(settings.db_path)
    job = registry.create("A", TrainConfig(base_model="m", load_in_8bit=False, device="cpu", epochs=1, learning_rate=1e-4,
                                           max_steps=None, batch_size=1, max_seq_length=64, seed=0, checkpoint_steps=2))
    registry.mark_running(job.job_id)
    folder = checkpoint_dir(settings, job.job_id)
    registry.set_checkpoint(job.job_id, str(folder / "checkpoint-2"))  # rotated away since
    for step, whole in ((4, True), (6, True), (8, False)):  # 8: killed while it was being written
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        if whole:
            (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    runner = JobRunner(registry, settings)
    try:
        runner._finish(registry.get(job.job_id), Exit(-9))
    finally:
        runner.shutdown()
    failed = registry.get(job.job_id)
    assert failed.status.value == "failed" and failed.checkpoint == str(folder / "checkpoint-6")
    assert registry.resume(job.job_id).status.value == "queued"
