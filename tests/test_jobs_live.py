"""Job queue, progress, events, cancel, checkpoints and memory, against a real uvicorn server."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from conftest import LiveServer, finished, read_sse, upload, wait_for_job, wait_until
from processes import catch_at_checkpoint, pending, worker_of

LONG = 10**6  # max_steps of a job that runs until it is cancelled

pytestmark = pytest.mark.slow  # real uvicorn servers and training processes


@pytest.fixture
def http(live_server):
    with httpx.Client(base_url=live_server.url, timeout=600) as client:  # trainings with wait on a loaded box
        yield client


def test_jobs_run_one_at_a_time_in_order(http):
    for s in ("A", "B", "C"):
        upload(http, s)
    ids = [http.post("/train", json={"speaker": s, "epochs": 2}).json()["job_id"] for s in ("A", "B", "C")]
    jobs = [wait_for_job(http, i, finished) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3
    for earlier, later in zip(jobs, jobs[1:]):
        assert earlier["finished_at"] <= later["started_at"]


def test_events_stream_live_and_as_json(env, tmp_path):
    server = LiveServer({**env, "PROGRESS_INTERVAL_S": "0"}, tmp_path / "server.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=120)
        upload(http)
        job = http.post("/train", json={"speaker": "User1", "epochs": 5, "batch_tokens": 1}).json()
        with http.stream("GET", f"/jobs/{job['job_id']}/events") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = read_sse(r)  # returns only because the stream ends with the job
        kinds = [e["event"] for e in events]
        statuses = [json.loads(e["data"])["status"] for e in events if e["event"] == "status"]
        assert statuses == ["queued", "running", "succeeded"]
        steps = [json.loads(e["data"])["step"] for e in events if e["event"] == "progress"]
        assert steps == list(range(1, 11)) and kinds[-1] == "status"
        last = json.loads([e for e in events if e["event"] == "progress"][-1]["data"])
        assert last["total_steps"] == 10 and last["epoch"] == 5 and last["loss"] > 0 and last["tokens_per_second"] > 0
        assert any(e["event"] == "log" for e in events)

        as_json = http.get(f"/jobs/{job['job_id']}/events", params={"stream": "false"}).json()
        assert [str(e["id"]) for e in as_json["data"]] == [e["id"] for e in events]
        resumed = http.get(f"/jobs/{job['job_id']}/events", params={"stream": "false", "after": events[-2]["id"]}).json()
        assert resumed["count"] == 1
        assert http.get(f"/jobs/{job['job_id']}").json()["progress"]["step"] == 10
        assert http.get("/jobs/nope/events").status_code == 404
    finally:
        server.stop()


def test_cancel_queued_and_running_jobs(http, env):
    upload(http, "A")
    upload(http, "B")
    assert http.post("/train", json={"speaker": "A", "wait": True}).status_code == 200
    adapter = Path(env["OUTPUT_DIR"]) / "A"
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}

    running = http.post("/train", json={"speaker": "A", "max_steps": LONG}).json()
    queued = http.post("/train", json={"speaker": "B"}).json()
    wait_for_job(http, running["job_id"], lambda j: j["status"] == "running" and j["progress"])
    r = http.post(f"/jobs/{queued['job_id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = http.post(f"/jobs/{running['job_id']}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    done = wait_for_job(http, running["job_id"], finished)
    assert done["status"] == "cancelled" and done["error"] is None
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    assert http.get(f"/jobs/{queued['job_id']}").json()["started_at"] is None
    r = http.post(f"/jobs/{running['job_id']}/cancel")
    assert r.status_code == 409 and "already cancelled" in r.json()["detail"]
    assert http.post("/jobs/nope/cancel").status_code == 404
    # The server carries on: B can train now.
    assert http.post("/train", json={"speaker": "B", "wait": True}).status_code == 200


def test_checkpoint_resume_matches_an_uninterrupted_run(env, tmp_path):
    server = LiveServer({**env, "CHECKPOINT_STEPS": "4"}, tmp_path / "server.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=300)
        upload(http, "A")
        steps = 40  # 2 samples x 20 epochs, one sample per packed sequence (batch_tokens=1)
        # The same speaker both times: a transcript writes the speakers' names into the tokens.
        straight = http.post("/train", json={"speaker": "A", "epochs": 20, "wait": True, "batch_tokens": 1})
        assert straight.status_code == 200, straight.text
        b = load_file(str(Path(env["OUTPUT_DIR"]) / "A" / "adapter_model.safetensors"))
        job = http.post("/train", json={"speaker": "A", "epochs": 20, "batch_tokens": 1}).json()
        # Held still at its first checkpoint until the cancel reaches it, so that the run cannot end first.
        child = wait_until(lambda: worker_of(job["job_id"]), 120, "the training process")
        catch_at_checkpoint(child, env["OUTPUT_DIR"], job["job_id"], signal.SIGSTOP)
        http.post(f"/jobs/{job['job_id']}/cancel")
        wait_until(lambda: pending(child, signal.SIGTERM), 30, "the supervisor's SIGTERM")
        child.send_signal(signal.SIGCONT)
        stopped = wait_for_job(http, job["job_id"], finished)
        assert stopped["status"] == "cancelled" and Path(stopped["checkpoint"]).is_dir(), stopped
        assert stopped["progress"]["step"] < steps

        r = http.post(f"/jobs/{job['job_id']}/resume")
        assert r.status_code == 202 and r.json()["status"] == "queued"
        done = wait_for_job(http, job["job_id"], finished)
        assert done["status"] == "succeeded", done["error"]
        assert done["result"]["steps"] == steps
        events = http.get(f"/jobs/{job['job_id']}/events", params={"stream": "false"}).json()["data"]
        assert any("resuming from" in e["data"].get("message", "") for e in events)
        assert not (Path(env["OUTPUT_DIR"]) / ".checkpoints" / job["job_id"]).exists()
        # Same data, seed, optimizer state and data order: the resumed adapter equals the straight one.
        a = load_file(str(Path(env["OUTPUT_DIR"]) / "A" / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            assert (a[name] - b[name]).abs().max() < 1e-4, name
        r = http.post(f"/jobs/{job['job_id']}/resume")
        assert r.status_code == 409 and "only failed or cancelled" in r.json()["detail"]
    finally:
        server.stop()


def test_resume_without_checkpoint_is_409(http):
    upload(http)
    job = http.post("/train", json={"speaker": "User1", "max_steps": LONG}).json()
    wait_for_job(http, job["job_id"], lambda j: j["status"] == "running")
    http.post(f"/jobs/{job['job_id']}/cancel")
    wait_for_job(http, job["job_id"], finished)
    r = http.post(f"/jobs/{job['job_id']}/resume")
    assert r.status_code == 409 and "no checkpoint" in r.json()["detail"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_server_memory_does_not_grow_over_five_trainings_and_generations(live_server, http, record_property):
    """Trainings run in child processes; what the server itself holds is the generation engine (the
    base model, the LRU of adapters: a retrained adapter replaces its stale weights), loaded by
    /generate. Its RSS after each retrain-and-generate round stays flat once the base is loaded."""
    upload(http)
    sizes = []
    for _ in range(5):
        assert http.post("/train", json={"speaker": "User1", "wait": True}).status_code == 200
        r = http.post("/generate", json={"speaker": "User1", "prompt": "Привіт!", "max_new_tokens": 8, "seed": 0})
        assert r.status_code == 200, r.text
        sizes.append(rss_mb(live_server.proc.pid))
    record_property("server_rss_mb", sizes)
    print(f"server RSS after each of 5 trainings + generations (MB): {[round(s, 1) for s in sizes]}")
    assert sizes[-1] - sizes[0] < 50, sizes  # the first round loaded the base; later ones reload only the adapter
