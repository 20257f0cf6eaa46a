"""Inspecting and deleting a speaker's data: /speakers, messages, dataset, DELETE."""

from __future__ import annotations

from pathlib import Path

from conftest import finished, training, upload, wait_for_job

from config import get_settings
from lm import chat_format


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
    job = client.get("/jobs").json()["data"][0]
    r = client.delete("/speakers/User1")
    assert r.status_code == 200
    assert r.json() == {"message": "Deleted the data of User1",
                        "deleted": [f"{env['DATA_DIR']}/User1_messages.json", f"{env['DATA_DIR']}/.User1_messages.json.index",
                                    f"{env['DATA_DIR']}/.User1_messages.json.fts",
                                    f"{env['OUTPUT_DIR']}/User1", f"{env['DATA_DIR']}/logs/{job['job_id']}.log"]}
    assert not (Path(env["OUTPUT_DIR"]) / "User1").exists()
    assert list(Path(env["DATA_DIR"]).glob("*User1*")) == []  # pathlib's * matches hidden files: no index, no lock
    assert client.get("/speakers").json()["count"] == 0
    assert client.delete("/speakers/User1").status_code == 404


def test_delete_can_keep_the_adapter(client, env):
    upload(client)
    job = client.post("/train", json={"speaker": "User1", "wait": True}).json()["job"]
    report = Path(env["OUTPUT_DIR"]) / "User1" / "eval.json"  # quotes held-out messages: deleted too
    assert report.is_file()
    r = client.delete("/speakers/User1", params={"keep_adapter": "true"})
    assert r.json()["deleted"] == [f"{env['DATA_DIR']}/User1_messages.json", f"{env['DATA_DIR']}/.User1_messages.json.index",
                                    f"{env['DATA_DIR']}/.User1_messages.json.fts",
                                   str(report), f"{env['DATA_DIR']}/logs/{job['job_id']}.log"]
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
                                    f"{env['DATA_DIR']}/.User1_messages.json.fts",
                                   str(folder), f"{env['DATA_DIR']}/logs/{job['job_id']}.log"]
    assert not folder.exists()


def test_start_up_removes_temporaries_that_killed_writes_left(env):
    from fastapi.testclient import TestClient

    from main import app

    data = Path(env["DATA_DIR"])
    data.mkdir(parents=True)
    stale = [data / ".P1_messages.json.k3j2x9_a.tmp", data / ".Олена_messages.json.abc.tmp"]
    for path in stale:
        path.write_text('{"speaker": "P1", "messages": [{"reply": "secret"', encoding="utf-8")
    other = data / "notes.tmp"
    other.write_text("not ours", encoding="utf-8")
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
    assert [p for p in stale if p.exists()] == [] and other.exists()


def test_delete_removes_every_file_that_holds_the_speakers_messages(client, env):
    secret = "таємне-повідомлення-P1"
    dialog = [{"speaker": "X", "content": f"питання {i}"} if i % 2 == 0 else {"speaker": "P1", "content": f"{secret} {i}"}
              for i in range(40)]
    upload(client, "P1", dialog)
    upload(client, "P2")
    job = client.post("/train", json={"speaker": "P1", "max_steps": 1, "wait": True}).json()["job"]
    data, output = Path(env["DATA_DIR"]), Path(env["OUTPUT_DIR"])
    assert (output / "P1" / "eval.json").is_file() and (data / "logs" / f"{job['job_id']}.log").is_file()
    tmp = data / ".P1_messages.json.killed1.tmp"  # as a write killed mid-way leaves it
    tmp.write_bytes((data / "P1_messages.json").read_bytes())
    other_tmp = data / ".P2_messages.json.killed2.tmp"
    other_tmp.write_text("{}", encoding="utf-8")
    r = client.delete("/speakers/P1", params={"keep_adapter": True})
    assert r.status_code == 200, r.text
    assert sorted(r.json()["deleted"]) == sorted([
        f"{data}/P1_messages.json", f"{data}/.P1_messages.json.index", f"{tmp}", f"{data}/.P1_messages.json.fts", f"{output}/P1/eval.json",
        f"{data}/logs/{job['job_id']}.log"])
    assert (output / "P1" / "training_info.json").is_file()  # the adapter is kept
    holding = [p for root in (data, output) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert holding == [] and other_tmp.exists()


def test_requests_for_unknown_or_deleted_speakers_leave_the_data_folder_unchanged(client, env):
    data = Path(env["DATA_DIR"])
    upload(client, "Zoë Åsa")
    assert client.delete("/speakers/Zoë Åsa").status_code == 200
    before = sorted(p.relative_to(data) for p in data.rglob("*"))  # pathlib's * matches hidden files (locks)
    requests = {
        "messages": lambda name: client.get(f"/speakers/{name}/messages"),
        "dataset": lambda name: client.get(f"/speakers/{name}/dataset"),
        "evaluation": lambda name: client.get(f"/speakers/{name}/evaluation"),
        "train": lambda name: client.post("/train", json={"speaker": name}),
        "delete": lambda name: client.delete(f"/speakers/{name}"),
        "generate": lambda name: client.post("/generate", json={"speaker": name, "prompt": "hi"}),
    }
    for i, (what, send) in enumerate(requests.items()):
        for name in (f"Ghost{i}", "Zoë Åsa"):
            r = send(name)
            assert r.status_code == 404, (what, r.text)
            assert sorted(p.relative_to(data) for p in data.rglob("*")) == before, (what, name)
    assert client.get("/speakers/Ghost0/messages").json() == {"detail": "no messages stored for speaker 'Ghost0'"}
    assert client.delete("/speakers/Ghost0").json() == {"detail": "nothing stored for speaker 'Ghost0'"}


def test_delete_removes_the_half_made_adapters_of_killed_trainings(client, env):
    """A training child killed mid-training leaves `.tmp-B-<hex>/`; killed during its evaluation, the
    whole new adapter with eval.json (which quotes held-out messages). The server's own supervisor
    removes them; these are what a killed server left, with an interrupted delete (`.del-`) and an
    adapter moved aside by an interrupted swap (`.old-`, put back in its place)."""
    output = Path(env["OUTPUT_DIR"])
    for speaker in ("B", "E", "B-x"):
        upload(client, speaker)
    left = {name: output / name for name in (".tmp-B-1a2b3c4d", ".tmp-B-5e6f7a8b", ".del-B-0a1b2c3d", ".old-B-9c0d1e2f",
                                             ".tmp-E-1a2b3c4d", ".tmp-B-x-1a2b3c4d")}
    for folder in left.values():
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        (folder / "eval.json").write_text('{"samples": ["a held-out message"]}', encoding="utf-8")
    (left[".old-B-9c0d1e2f"] / "training_info.json").write_text('{"speaker": "B"}', encoding="utf-8")
    data = env["DATA_DIR"]
    r = client.delete("/speakers/B", params={"keep_adapter": "true"})
    assert r.status_code == 200, r.text
    assert r.json()["deleted"] == [f"{data}/B_messages.json", f"{data}/.B_messages.json.index", f"{data}/.B_messages.json.fts",
                                   *(str(left[name]) for name in (".del-B-0a1b2c3d", ".tmp-B-1a2b3c4d", ".tmp-B-5e6f7a8b")),
                                   f"{output}/B/eval.json"]
    assert sorted(p.name for p in (output / "B").iterdir()) == ["adapter_model.safetensors", "training_info.json"]
    upload(client, "B")
    r = client.delete("/speakers/B")
    assert r.status_code == 200, r.text
    assert r.json()["deleted"] == [f"{data}/B_messages.json", f"{data}/.B_messages.json.index", f"{data}/.B_messages.json.fts", f"{output}/B"]
    assert sorted(p.name for p in output.iterdir()) == [".tmp-B-x-1a2b3c4d", ".tmp-E-1a2b3c4d"]  # other speakers'
