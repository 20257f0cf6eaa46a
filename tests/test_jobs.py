"""POST /train and the job endpoints: background runs, waiting, conflicts, failures, recovery."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import SAMPLE_DIALOG
from config import get_settings
from registry import INTERRUPTED, JobRegistry
from models import JobStatus, TrainConfig


def upload(client, speaker="User1"):
    r = client.post("/upload-text", json={"dialog": SAMPLE_DIALOG, "speaker": speaker})
    assert r.status_code == 200, r.text


def poll(client, job_id, until=("succeeded", "failed"), timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s")


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
    done = poll(client, job["job_id"])
    assert done["status"] == "succeeded", done
    assert done["started_at"] and done["finished_at"] and done["error"] is None
    assert done["result"]["model_path"].endswith("/User1")


def test_train_without_messages_is_404(client):
    r = client.post("/train", json={"speaker": "Nobody"})
    assert r.status_code == 404
    assert r.json() == {"detail": "no messages stored for speaker 'Nobody'; upload a dialog with POST /upload-text first"}


@pytest.mark.parametrize(
    "payload, loc",
    [
        ({"speaker": "../x"}, ["body", "speaker"]),
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
        poll(client, job["job_id"], until=("running",))
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


def test_queued_job_left_by_a_dead_server_runs_at_start(env):
    from fastapi.testclient import TestClient

    from main import app

    with TestClient(app) as client:
        upload(client)
    registry = JobRegistry(get_settings().db_path)
    from train import resolve_config
    from models import TrainRequest

    job = registry.create("User1", resolve_config(get_settings(), TrainRequest(speaker="User1")))
    with TestClient(app) as client:
        assert poll(client, job.job_id)["status"] == "succeeded"


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
    assert registry.create("A", _config()).status == JobStatus.queued


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
