"""POST /train and the job endpoints: background runs, waiting, conflicts, failures, recovery."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest
from conftest import finished, read_sse, upload, wait_for_job

from config import get_settings
from jobs.registry import INTERRUPTED, JobRegistry
from models import JobStatus, TrainConfig


def test_train_with_wait_answers_when_done(client, env):
    upload(client)
    r = client.post("/train", json={"speaker": "User1", "wait": True, "epochs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["message"] == "Training completed successfully for User1"
    assert body["model_path"] == f"{env['OUTPUT_DIR']}/User1"
    assert body["job"]["status"] == "succeeded"
    assert body["job"]["config"]["epochs"] == 2
    assert body["job"]["config"]["batch_tokens"] == 1024  # the BATCH_TOKENS default: packed
    assert body["job"]["result"]["steps"] == 4  # 2 samples are too few to pack (MIN_STEPS_PER_EPOCH)
    assert (Path(env["OUTPUT_DIR"]) / "User1" / "training_info.json").exists()


def test_train_without_wait_is_a_job_to_poll(client, env):
    upload(client)
    r = client.post("/train", json={"speaker": "User1"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running")
    assert job["url"] == f"/jobs/{job['job_id']}" == r.headers["location"]
    done = wait_for_job(client, job["job_id"], finished, timeout=120)
    assert done["status"] == "succeeded", done
    assert done["started_at"] and done["finished_at"] and done["error"] is None
    assert done["result"]["model_path"].endswith("/User1")


def test_train_without_messages_is_404(client):
    r = client.post("/train", json={"speaker": "Nobody"})
    assert r.status_code == 404
    assert r.json() == {"detail": "no messages stored for speaker 'Nobody'; upload a dialog with POST /upload-text or an export with POST /upload-file first"}


@pytest.mark.parametrize(
    "payload, loc",
    [
        ({"speaker": "bad\u0000name"}, ["body", "speaker"]),
        ({"speaker": "\u200e \u202c"}, ["body", "speaker"]),  # only invisible marks: empty once trimmed
        ({"speaker": "User1", "epochs": 0}, ["body", "epochs"]),
        ({"speaker": "User1", "batch_size": 0}, ["body", "batch_size"]),
        ({"speaker": "User1", "batch_size": 100000}, ["body", "batch_size"]),
        ({"speaker": "User1", "learning_rate": -1}, ["body", "learning_rate"]),
        ({"speaker": "User1", "max_seq_length": 8}, ["body", "max_seq_length"]),
        ({"speaker": "User1", "max_steps": 0}, ["body", "max_steps"]),
        ({}, ["body", "speaker"]),
    ],
)
def test_train_validation(client, payload, loc):
    r = client.post("/train", json=payload)
    assert r.status_code == 422
    assert any(p["loc"] == loc for p in r.json()["detail"]), r.json()


def test_conflict_while_running_health_answers_and_shutdown_interrupts(env):
    from fastapi.testclient import TestClient

    from main import app

    with TestClient(app) as client:
        upload(client)
        job = client.post("/train", json={"speaker": "User1", "max_steps": 10**6}).json()
        wait_for_job(client, job["job_id"], lambda j: j["status"] == "running", timeout=120, what="running")
        r = client.post("/train", json={"speaker": "User1"})
        assert r.status_code == 409
        assert r.json()["detail"].startswith(f"speaker 'User1' already has a training job ({job['job_id']}, running)")
        for _ in range(10):
            health = client.get("/health")
            assert health.status_code == 200 and health.json()["jobs_running"] == 1
        assert client.get(f"/jobs/{job['job_id']}").json()["status"] == "running"
    # Leaving the block shut the server down: the training stopped at its next step.
    stopped = JobRegistry(get_settings().db_path).get(job["job_id"])
    assert (stopped.status, stopped.error) == (JobStatus.failed, INTERRUPTED)
    assert not (Path(env["OUTPUT_DIR"]) / "User1").exists()
    assert list(Path(env["OUTPUT_DIR"]).iterdir()) == []


def test_failure_is_reported_and_next_job_runs(client, env, monkeypatch, tiny_gpt2):
    upload(client)
    monkeypatch.setenv("BASE_MODEL", str(tiny_gpt2))
    get_settings.cache_clear()
    r = client.post("/train", json={"speaker": "User1", "wait": True})
    assert r.status_code == 500
    detail = r.json()["detail"]
    assert detail.startswith("Training failed for User1 (job ")
    assert "has no q_proj or v_proj modules" in detail
    failed = client.get("/jobs", params={"status": "failed"}).json()
    assert failed["count"] == 1 and "q_proj" in failed["data"][0]["error"]

    monkeypatch.setenv("BASE_MODEL", env["BASE_MODEL"])
    get_settings.cache_clear()
    r = client.post("/train", json={"speaker": "User1", "wait": True})
    assert r.status_code == 200, r.text


def test_jobs_listing_and_unknown_job(client, env):
    upload(client, "User1")
    upload(client, "User2")
    ids = [client.post("/train", json={"speaker": s, "wait": True}).json()["job"]["job_id"] for s in ("User1", "User2")]
    listing = client.get("/jobs").json()
    assert listing["count"] == 2 and [j["job_id"] for j in listing["data"]] == ids[::-1]
    only = client.get("/jobs", params={"speaker": "User1"}).json()
    assert [j["job_id"] for j in only["data"]] == ids[:1]
    assert client.get("/jobs", params={"limit": 1, "offset": 1}).json()["data"][0]["job_id"] == ids[0]
    assert client.get("/jobs", params={"status": "nonsense"}).status_code == 422
    typo = client.get("/jobs", params={"speeker": "User1"})
    assert typo.status_code == 422 and typo.json()["detail"][0]["type"] == "extra_forbidden"
    r = client.get("/jobs/nope")
    assert r.status_code == 404 and r.json() == {"detail": "no job with id 'nope'"}


def _config() -> TrainConfig:
    return TrainConfig(base_model="m", load_in_8bit=True, device="cpu", epochs=1, learning_rate=1e-4,
                       max_steps=None, batch_size=1, max_seq_length=64, seed=0)


def test_registry_recovery_after_crash(tmp_path):
    registry = JobRegistry(tmp_path / "jobs.sqlite3")
    crashed = registry.create("A", _config())
    registry.mark_running(crashed.job_id)
    waiting = registry.create("B", _config())
    done = registry.create("C", _config())
    registry.mark_succeeded(done.job_id, {"model_path": "x"})

    reopened = JobRegistry(tmp_path / "jobs.sqlite3")
    assert reopened.recover() == [waiting.job_id]
    assert (reopened.get(crashed.job_id).status, reopened.get(crashed.job_id).error) == (JobStatus.failed, INTERRUPTED)
    assert reopened.get(waiting.job_id).status == JobStatus.queued
    assert reopened.get(done.job_id).status == JobStatus.succeeded


def test_train_on_a_registry_locked_past_its_busy_timeout_is_a_503(client, env):
    """Issue 29, defect 5: another connection holds the job database (BEGIN EXCLUSIVE) longer than a
    write waits: /train answers 503 with Retry-After, reads still answer, and nothing was queued."""
    import sqlite3

    upload(client, "User1")
    client.app.state.registry.busy_timeout = 0.2
    locker = sqlite3.connect(get_settings().db_path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        r = client.post("/train", json={"speaker": "User1"})
        health = client.get("/health")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert (r.status_code, r.headers["retry-after"]) == (503, "5")
    assert r.json() == {"detail": "the job registry (jobs.sqlite3) stayed locked by another connection for 0.2 s; "
                                  "nothing changed. Retry after the Retry-After seconds; if it stays locked, look for "
                                  "another process holding the file"}
    assert health.status_code == 200 and health.json()["jobs_queued"] == 0  # WAL: reads do not wait for the lock
    assert client.get("/jobs").json()["count"] == 0
    assert client.post("/train", json={"speaker": "User1", "max_steps": 1}).status_code == 202  # released: it works


def test_queued_job_left_by_a_dead_server_runs_at_start(env):
    from fastapi.testclient import TestClient

    from main import app

    with TestClient(app) as client:
        upload(client)
    registry = JobRegistry(get_settings().db_path)
    from models import TrainRequest
    from train import resolve_config

    job = registry.create("User1", resolve_config(get_settings(), TrainRequest(speaker="User1")))
    with TestClient(app) as client:
        assert wait_for_job(client, job.job_id, finished, timeout=120)["status"] == "succeeded"


def test_database_of_the_first_release_is_upgraded(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, speaker TEXT NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL,"
        " started_at TEXT, finished_at TEXT, config TEXT NOT NULL, result TEXT, error TEXT);"
    )
    db.execute("INSERT INTO jobs VALUES ('old', 'A', 'succeeded', '2026-01-01T00:00:00+00:00', NULL, NULL, ?, NULL, NULL)",
               (_config().model_dump_json(),))
    db.commit()
    db.close()
    registry = JobRegistry(tmp_path / "jobs.sqlite3")
    old = registry.get("old")
    assert (old.status, old.progress, old.checkpoint, old.cancel_requested) == (JobStatus.succeeded, None, None, False)
    assert old.kind == "train"  # every job before exports became jobs was a training
    assert registry.create("A", _config()).status == JobStatus.queued


def events_of(client, job_id: str, kind: str) -> list[dict]:
    events = client.get(f"/jobs/{job_id}/events", params={"stream": "false"}).json()["data"]
    return [e["data"] for e in events if e["type"] == kind]


def test_progress_is_throttled_to_the_first_and_last_step(client, monkeypatch):
    monkeypatch.setenv("PROGRESS_INTERVAL_S", "3600")
    get_settings.cache_clear()
    upload(client)
    r = client.post("/train", json={"speaker": "User1", "epochs": 10, "batch_tokens": 1, "wait": True})
    assert r.status_code == 200, r.text
    job = r.json()["job"]
    assert job["result"]["steps"] == 20  # 2 samples x 10 epochs, one per step
    assert [p["step"] for p in events_of(client, job["job_id"], "progress")] == [1, 20]
    assert job["progress"]["step"] == 20


def test_event_stream_resumes_after_last_event_id(client):
    upload(client)
    job = client.post("/train", json={"speaker": "User1", "wait": True}).json()["job"]
    ids = [e["id"] for e in client.get(f"/jobs/{job['job_id']}/events", params={"stream": "false"}).json()["data"]]
    assert len(ids) > 3
    with client.stream("GET", f"/jobs/{job['job_id']}/events", headers={"Last-Event-ID": str(ids[1])}) as r:
        assert r.status_code == 200
        resumed = read_sse(r)  # the job has finished: the stream ends after its events
    assert [int(e["id"]) for e in resumed] == ids[2:]


@pytest.mark.slow  # a whole training child that fails late
@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="needs wandb not to be installed")
def test_tracker_without_its_package_fails_the_job_naming_the_package(client, env, monkeypatch):
    monkeypatch.setenv("REPORT_TO", "wandb")
    get_settings.cache_clear()
    upload(client)
    r = client.post("/train", json={"speaker": "User1", "wait": True})
    assert r.status_code == 500
    assert "requires wandb to be installed. Run `pip install wandb`" in r.json()["detail"], r.json()
    assert list(Path(env["OUTPUT_DIR"]).iterdir()) == []  # no adapter, no temporary folder left behind


@pytest.mark.slow  # 60 steps with a checkpoint every 2, then a resume
def test_resumed_job_trains_on_its_sample_snapshot(client, env, monkeypatch):
    monkeypatch.setenv("CHECKPOINT_STEPS", "2")
    get_settings.cache_clear()
    upload(client)  # User1's 2 samples
    job = client.post("/train", json={"speaker": "User1", "epochs": 30, "batch_tokens": 1}).json()  # 60 steps
    wait_for_job(client, job["job_id"], lambda j: j["checkpoint"] is not None or finished(j), timeout=120,
                 what="a checkpoint")
    assert client.post(f"/jobs/{job['job_id']}/cancel").status_code in (200, 409)
    stopped = wait_for_job(client, job["job_id"], finished, timeout=120)
    assert stopped["status"] == "cancelled", stopped
    snapshot = Path(env["OUTPUT_DIR"]) / ".checkpoints" / job["job_id"] / "samples.json"
    replies = ["Привіт! Як справи?", "Підемо кави вип'ємо?"]
    assert [s["reply"] for s in json.loads(snapshot.read_text(encoding="utf-8"))] == replies

    more = [turn for i in range(10) for turn in ({"speaker": "X", "content": f"питання {i}"},
                                                 {"speaker": "User1", "content": f"відповідь {i}"})]
    upload(client, "User1", more)
    assert client.get("/speakers/User1/messages").json()["count"] == 12
    assert client.post(f"/jobs/{job['job_id']}/resume").status_code == 202
    done = wait_for_job(client, job["job_id"], finished, timeout=600)  # 2 s a step on a loaded 2-core box
    assert done["status"] == "succeeded", done["error"]
    assert (done["result"]["num_samples"], done["result"]["steps"]) == (2, 60)  # the snapshot, not the 12 now stored


def test_one_log_line_per_job_state_change(client, env, caplog):
    upload(client)
    with caplog.at_level(logging.INFO):
        job = client.post("/train", json={"speaker": "User1", "wait": True}).json()["job"]
    change = re.compile(rf"job {job['job_id']}(?: \(User1\))?: (\w+)")
    server = [m[1] for r in caplog.records if r.name == "persona_lora.jobs" and (m := change.fullmatch(r.getMessage()))]
    assert server == ["queued", "running"]  # the server queues and starts the job ...
    child_log = (Path(env["DATA_DIR"]) / "logs" / f"{job['job_id']}.log").read_text(encoding="utf-8")
    child = [m[1] for line in child_log.splitlines() if (m := re.search(rf"persona_lora\.jobs: {change.pattern}$", line))]
    assert child == ["succeeded"]  # ... and the training process records its outcome, once


def test_any_display_name_trains_answers_and_is_listed(client, env):
    """A name with an emoji family and '+' (not a safe file name) gets an encoded folder; the real name
    is what every answer shows."""
    from urllib.parse import quote

    from config import storage_name

    name = "Мама 👨\u200d👩\u200d👧 +380"
    dialog = [{"speaker": "Син", "content": f"питання {i}"} if i % 2 == 0 else {"speaker": name, "content": f"відповідь {i}"}
              for i in range(6)]
    assert client.post("/upload-text", json={"dialog": dialog, "speaker": name}).status_code == 200
    r = client.post("/train", json={"speaker": name, "wait": True, "max_steps": 2})
    assert r.status_code == 200, r.text
    folder = Path(env["OUTPUT_DIR"]) / storage_name(name)
    assert storage_name(name).startswith("~") and (folder / "adapter_model.safetensors").is_file()
    assert r.json()["model_path"] == f"{env['OUTPUT_DIR']}/{storage_name(name)}"
    assert client.post("/generate", json={"speaker": name, "prompt": "питання", "max_new_tokens": 2}).status_code == 200
    assert name in [m["id"] for m in client.get("/v1/models").json()["data"]]
    speakers = client.get("/speakers").json()["data"]
    assert [(s["speaker"], s["adapter"]) for s in speakers] == [(name, True)]
    r = client.delete(f"/speakers/{quote(name)}")
    assert r.status_code == 200 and not folder.exists()


def test_a_path_like_name_is_only_a_name(client, env):
    """'../x' is a display name like any other: it trains nothing (nothing stored), and its file would
    be the encoded form inside DATA_DIR."""
    from config import storage_name

    r = client.post("/train", json={"speaker": "../x"})
    assert r.status_code == 404 and "no messages stored for speaker '../x'" in r.json()["detail"]
    assert storage_name("../x").startswith("~") and "/" not in storage_name("../x")
