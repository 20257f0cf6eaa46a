"""Inspecting and deleting a speaker's data: /speakers, messages, dataset, DELETE."""

from __future__ import annotations

from pathlib import Path

import chat_format

from conftest import finished, training, upload, wait_for_job
from config import get_settings


def test_speakers_listing_with_adapter_state(client):
    upload(client, "User1")
    upload(client, "User2")
    assert client.get("/speakers").json()["data"][0]["adapter"] is False
    assert client.post("/train", json={"speaker": "User1", "wait": True}).status_code == 200
    listing = client.get("/speakers").json()
    assert listing["count"] == 2
    one, two = listing["data"]
    assert (one["speaker"], one["messages"], one["adapter"]) == ("User1", 2, True)
    assert one["trained_at"] and one["last_upload"]
    assert (two["speaker"], two["messages"], two["adapter"], two["trained_at"]) == ("User2", 1, False, None)


def test_messages_are_paginated(client):
    dialog = [{"speaker": "A" if i % 2 else "B", "content": f"m{i}"} for i in range(20)]
    upload(client, "A", dialog)
    page = client.get("/speakers/A/messages", params={"limit": 3, "offset": 2}).json()
    assert page["count"] == 10 and [m["reply"] for m in page["data"]] == ["m5", "m7", "m9"]
    assert page["data"][0]["context"][-1] == {"speaker": "B", "content": "m4"}
    assert client.get("/speakers/Nobody/messages").status_code == 404
    assert client.get("/speakers/..%2Fx/messages").status_code in (404, 422)


def test_dataset_shows_what_the_model_sees(client):
    upload(client)
    body = client.get("/speakers/User1/dataset", params={"limit": 5}).json()
    assert body["chat_template_source"] == chat_format.TRANSCRIPT_SOURCE and body["count"] == 2
    second = body["data"][1]
    assert second["completion"] == " Підемо кави вип'ємо?\n"  # the persona's line and its end
    assert second["prompt"] == "<bos>User1: Привіт! Як справи?\nUser2: Все добре, дякую.\nUser1:"
    assert second["marked"] == second["prompt"] + "⟦" + second["completion"] + "⟧"
    assert 0 < second["supervised_tokens"] < second["tokens"]
    assert len(client.get("/speakers/User1/dataset", params={"limit": 1}).json()["data"]) == 1


def test_delete_removes_messages_and_adapter(client, env):
    upload(client)
    assert client.post("/train", json={"speaker": "User1", "wait": True}).status_code == 200
    r = client.delete("/speakers/User1")
    assert r.status_code == 200
    assert r.json() == {"message": "Deleted the data of User1",
                        "deleted": [f"{env['DATA_DIR']}/User1_messages.json", f"{env['DATA_DIR']}/.User1_messages.json.index",
                                    f"{env['OUTPUT_DIR']}/User1"]}
    assert not (Path(env["OUTPUT_DIR"]) / "User1").exists()
    assert list(Path(env["DATA_DIR"]).glob("*User1*")) == []  # pathlib's * matches hidden files: no index, no lock
    assert client.get("/speakers").json()["count"] == 0
    assert client.delete("/speakers/User1").status_code == 404


def test_delete_can_keep_the_adapter(client, env):
    upload(client)
    assert client.post("/train", json={"speaker": "User1", "wait": True}).status_code == 200
    r = client.delete("/speakers/User1", params={"keep_adapter": "true"})
    assert r.json()["deleted"] == [f"{env['DATA_DIR']}/User1_messages.json", f"{env['DATA_DIR']}/.User1_messages.json.index"]
    assert (Path(env["OUTPUT_DIR"]) / "User1" / "adapter_model.safetensors").exists()


def test_delete_refused_while_training(client, env):
    upload(client)
    job = client.post("/train", json={"speaker": "User1", "max_steps": 10**6}).json()
    wait_for_job(client, job["job_id"], training, timeout=120)  # refused while it trains, not only while queued
    r = client.delete("/speakers/User1")
    assert r.status_code == 409 and job["job_id"] in r.json()["detail"]
    assert (Path(env["DATA_DIR"]) / "User1_messages.json").exists()
    client.post(f"/jobs/{job['job_id']}/cancel")


def test_delete_removes_the_speakers_checkpoints(client, env, monkeypatch):
    monkeypatch.setenv("CHECKPOINT_STEPS", "2")
    get_settings.cache_clear()
    upload(client)
    job = client.post("/train", json={"speaker": "User1", "max_steps": 10**6, "batch_tokens": 1}).json()
    wait_for_job(client, job["job_id"], lambda j: j["checkpoint"] is not None, timeout=120, what="a checkpoint")
    assert client.post(f"/jobs/{job['job_id']}/cancel").status_code == 200
    stopped = wait_for_job(client, job["job_id"], finished, timeout=120)
    folder = Path(env["OUTPUT_DIR"]) / ".checkpoints" / job["job_id"]
    assert stopped["status"] == "cancelled" and Path(stopped["checkpoint"]).parent == folder
    assert (folder / "samples.json").is_file() and Path(stopped["checkpoint"]).is_dir()
    r = client.delete("/speakers/User1")
    assert r.status_code == 200, r.text
    assert r.json()["deleted"] == [f"{env['DATA_DIR']}/User1_messages.json", f"{env['DATA_DIR']}/.User1_messages.json.index",
                                   str(folder)]
    assert not folder.exists()
