"""Jobs on a Ray cluster (EXECUTOR=ray, jobs/cluster.py), against a real local cluster started once per
session (`ray start --head --num-cpus=2 --num-gpus=1`, token auth on) and real uvicorn servers: the
same adapter as the local runner, live events, cancel, the server killed and restarted mid-job, a
worker killed mid-job and resumed, an export, two trainings at once; and a cluster that cannot be
reached. The report lines' format and the worker's environment are tested without Ray."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from conftest import LiveServer, finished, free_port, read_sse, upload, wait_for_job, wait_until
from processes import catch_at_checkpoint, worker_of
from ray_fixtures import need_ray, ray_env, resources_given, submissions

from config import Settings
from jobs import report
from models import JobProgress

LONG = 10**6  # max_steps of a job that runs until it is cancelled


# --- without Ray ---------------------------------------------------------------------------------------


def test_report_lines_are_found_between_library_output_and_recorded_once(tmp_path):
    from jobs.registry import JobRegistry
    from models import ExportConfig

    out = io.StringIO()
    registry = JobRegistry(tmp_path / "jobs.sqlite3")
    job = registry.create("A", ExportConfig(export="merged"), kind="export_merged")
    worker = report.StdoutReport(job, out)
    worker.update_progress(job.job_id, JobProgress(step=1, total_steps=2))
    worker.add_event(job.job_id, "log", {"level": "INFO", "message": "hello"})
    worker.mark_succeeded(job.job_id, {"model_path": "x"})
    text = "Loading weights  50%|#####\r" + out.getvalue().replace("\n@@", "@@", 1) + "a library's line\n"
    registry.mark_running(job.job_id)
    for _ in range(2):  # a log read twice (the server restarted) records each line once
        lines = report.Lines()
        for at in range(0, len(text), 7):  # chunks that end mid-line
            for line in lines.feed(text[at:at + 7]):
                report.record(registry, job.job_id, line)
    done = registry.get(job.job_id)
    assert done.status.value == "succeeded" and done.result == {"model_path": "x"} and done.progress.step == 1
    assert [e.type for e in registry.events(job.job_id)] == ["status", "status", "progress", "log", "status"]


def test_the_worker_gets_the_servers_settings_but_no_secret(tmp_path, monkeypatch):
    from jobs.cluster import worker_env
    from models import JobPublic

    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=None, API_KEY="k3y", DATA_DIR="rel/data", ALLOWED_SPEAKERS="A,B", EVALUATE_AFTER_TRAINING=False,
                        TRAIN_NICE=3, EXECUTOR="ray")
    job = JobPublic(job_id="j", speaker="A", kind="export_merged", status="queued", url="/jobs/j",
                    created_at="2026-01-01T00:00:00Z", config={"export": "merged"})
    env = worker_env(settings, job)
    assert "API_KEY" not in env and "k3y" not in json.dumps(env) and "EXECUTOR" not in env
    assert env["DATA_DIR"] == str(tmp_path / "rel" / "data")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    again = Settings(_env_file=None)
    paths = {name for name, value in settings if isinstance(value, Path)}
    assert {name: getattr(again, name) for name in paths} == {name: getattr(settings, name).resolve() for name in paths}
    assert again.model_dump(exclude={"API_KEY", "EXECUTOR", *paths}) == settings.model_dump(exclude={"API_KEY", "EXECUTOR", *paths})
    assert again.ALLOWED_SPEAKERS == ["A", "B"] and again.EVALUATE_AFTER_TRAINING is False


def test_an_unset_train_gpus_asks_the_cluster_and_a_set_one_is_kept():
    from jobs.cluster import gpus_text, train_gpus

    assert Settings(_env_file=None).TRAIN_GPUS is None
    assert train_gpus(None, lambda: 2.0) == (1, "TRAIN_GPUS unset; the cluster has 2")
    assert train_gpus(None, lambda: 0.0) == (0, "TRAIN_GPUS unset; the cluster has none")  # no job waits forever
    never = lambda: pytest.fail("the cluster was asked though TRAIN_GPUS is set")  # noqa: E731
    assert train_gpus(0.5, never) == (0.5, "TRAIN_GPUS=0.5") and train_gpus(0.0, never) == (0, "TRAIN_GPUS=0")
    assert gpus_text(*train_gpus(None, lambda: 0.0)) == "asked the cluster for 0 GPUs (TRAIN_GPUS unset; the cluster has none)"
    assert gpus_text(1, "TRAIN_GPUS unset; the cluster has 1") == "asked the cluster for 1 GPU (TRAIN_GPUS unset; the cluster has 1)"


def test_rays_words_for_a_lost_node_are_one_line_that_names_the_node():
    from jobs.cluster import ray_reason

    message = ("Job supervisor actor died: The actor died unexpectedly before finishing this task.\n\tclass_name: JobSupervisor\n"
               "\tactor_id: c81c82ec5a640b70e90bac3001000000\n\tpid: 22294\n\tname: _ray_internal_job_actor_t2\n\tnamespace: "
               "SUPERVISOR_ACTOR_RAY_NAMESPACE\n\tip: 192.0.2.2\nThe actor died because its node has died. Node Id: 0569\n\tthe "
               "actor's node was terminated unexpectedly: health check failed due to missing too many heartbeats")  # Ray 2.60's
    assert ray_reason(message) == ("Job supervisor actor died: The actor died unexpectedly before finishing this task; ip: 192.0.2.2; "
                                   "The actor died because its node has died. Node Id: 0569; the actor's node was terminated "
                                   "unexpectedly: health check failed due to missing too many heartbeats")
    assert ray_reason("Job entrypoint failed, last available logs (truncated to 20,000 chars):\nTraceback") == "Job entrypoint failed"


# --- a real cluster ------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_a_training_on_ray_streams_its_events_and_makes_the_local_runners_adapter(env, tmp_path, ray_cluster):
    from jobs.cluster import cluster_gpus

    assert cluster_gpus(ray_cluster.address) == 1
    server = LiveServer(ray_env(env, ray_cluster, TRAIN_GPUS=None), tmp_path / "server.log")  # 1: the cluster has one
    try:
        http = httpx.Client(base_url=server.url, timeout=120)
        upload(http)
        job = http.post("/train", json={"speaker": "User1", "epochs": 3, "batch_tokens": 1}).json()
        with http.stream("GET", f"/jobs/{job['job_id']}/events") as r:
            events = read_sse(r)  # ends with the job
        statuses = [json.loads(e["data"])["status"] for e in events if e["event"] == "status"]
        assert statuses == ["queued", "running", "succeeded"]
        steps = [json.loads(e["data"])["step"] for e in events if e["event"] == "progress"]
        assert steps == list(range(1, 7))
        asked = "asked the cluster for 1 GPU (TRAIN_GPUS unset; the cluster has 1)"
        assert json.loads(next(e for e in events if e["event"] == "log")["data"])["message"] == asked
        done = http.get(job["url"]).json()
        assert done["result"]["steps"] == 6 and done["progress"]["step"] == 6
        sid = f"persona-lora-{job['job_id']}-1"
        assert submissions(ray_cluster, job["job_id"]) == [sid]
        assert resources_given(ray_cluster, sid) == {"CPU": 1, "GPU": 1}
        log = Path(env["DATA_DIR"]) / "logs" / f"{job['job_id']}.log"  # kept once Ray says the job ended
        text = wait_until(lambda: log.is_file() and "@@persona-lora" in log.read_text() and log.read_text(), 30, "the job's log")
        assert text.startswith(asked + "\n")
    finally:
        server.stop()
    ray_adapter = Path(env["OUTPUT_DIR"]) / "User1"
    local_env = {**env, "DATA_DIR": str(tmp_path / "local-data"), "OUTPUT_DIR": str(tmp_path / "local-out")}
    server = LiveServer(local_env, tmp_path / "local.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=300)
        upload(http)
        r = http.post("/train", json={"speaker": "User1", "epochs": 3, "batch_tokens": 1, "wait": True})
        assert r.status_code == 200, r.text
    finally:
        server.stop()
    local_adapter = tmp_path / "local-out" / "User1"
    assert sorted(p.name for p in ray_adapter.iterdir()) == sorted(p.name for p in local_adapter.iterdir())
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (ray_adapter, local_adapter))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
    info = lambda d: json.loads((d / "training_info.json").read_text())  # noqa: E731
    assert info(ray_adapter)["config"] == info(local_adapter)["config"]
    assert not list(Path(env["OUTPUT_DIR"]).glob(".tmp-*"))
    assert ray_cluster.env["RAY_AUTH_TOKEN"] not in (tmp_path / "server.log").read_text()


@pytest.mark.ray
@pytest.mark.slow
def test_cancel_on_ray_keeps_the_adapter_and_a_killed_worker_fails_and_resumes(env, tmp_path, ray_cluster):
    server = LiveServer(ray_env(env, ray_cluster, CHECKPOINT_STEPS="2"), tmp_path / "server.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=300)
        upload(http, "A")
        assert http.post("/train", json={"speaker": "A", "max_steps": 2, "wait": True}).status_code == 200
        adapter = Path(env["OUTPUT_DIR"]) / "A"
        before = {p.name: p.read_bytes() for p in adapter.iterdir()}

        running = http.post("/train", json={"speaker": "A", "max_steps": LONG}).json()
        wait_for_job(http, running["job_id"], lambda j: j["status"] == "running" and j["progress"], timeout=120)
        assert http.post(f"{running['url']}/cancel").status_code == 200
        done = wait_for_job(http, running["job_id"], finished, timeout=60)
        assert done["status"] == "cancelled" and done["error"] is None
        assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
        assert not list(Path(env["OUTPUT_DIR"]).glob(".tmp-*"))

        job = http.post("/train", json={"speaker": "A", "epochs": 20, "batch_tokens": 1}).json()  # 40 steps
        worker = wait_until(lambda: worker_of(job["job_id"]), 120, "the worker process")
        catch_at_checkpoint(worker, env["OUTPUT_DIR"], job["job_id"], signal.SIGKILL)  # killed after step 2
        failed = wait_for_job(http, job["job_id"], finished, timeout=60)
        assert failed["status"] == "failed", failed
        assert failed["error"].startswith("the training process exited with status -9 (killed by SIGKILL)"), failed["error"]
        assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before and Path(failed["checkpoint"]).is_dir()
        assert not list(Path(env["OUTPUT_DIR"]).glob(".tmp-*"))

        r = http.post(f"{job['url']}/resume")
        assert r.status_code == 202, r.text
        resumed = wait_for_job(http, job["job_id"], finished, timeout=180)
        assert resumed["status"] == "succeeded", resumed["error"]
        assert resumed["result"]["steps"] == 40
        events = http.get(f"{job['url']}/events", params={"stream": "false"}).json()["data"]
        assert any("resuming from" in e["data"].get("message", "") for e in events)
        assert submissions(ray_cluster, job["job_id"]) == [f"persona-lora-{job['job_id']}-{n}" for n in (1, 2)]
    finally:
        server.stop()


@pytest.mark.ray
@pytest.mark.slow
def test_the_server_killed_mid_job_follows_it_again_and_it_finishes_once(env, tmp_path, ray_cluster):
    settings = ray_env(env, ray_cluster)
    server = LiveServer(settings, tmp_path / "server.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        upload(http)
        job = http.post("/train", json={"speaker": "User1", "epochs": 15, "batch_tokens": 1}).json()  # 30 steps
        wait_for_job(http, job["job_id"], lambda j: (j["progress"] or {}).get("step", 0) >= 1, timeout=120)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
    finally:
        server.stop()
    assert worker_of(job["job_id"]) is not None  # the training runs on without the server
    server = LiveServer(settings, tmp_path / "server2.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        done = wait_for_job(http, job["job_id"], finished, timeout=180)
        assert done["status"] == "succeeded", done["error"]
        assert done["result"]["steps"] == 30
        events = http.get(f"{job['url']}/events", params={"stream": "false"}).json()["data"]
        statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
        assert statuses == ["queued", "running", "succeeded"]
        steps = [e["data"]["step"] for e in events if e["type"] == "progress"]
        assert steps == sorted(set(steps)) and steps[-1] == 30  # each line recorded once
        assert submissions(ray_cluster, job["job_id"]) == [f"persona-lora-{job['job_id']}-1"]
    finally:
        server.stop()


@pytest.mark.ray
@pytest.mark.slow
def test_two_trainings_run_at_once_on_ray_and_an_export_runs_there(env, tmp_path, ray_cluster):
    server = LiveServer(ray_env(env, ray_cluster), tmp_path / "server.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        for s in ("A", "B"):
            upload(http, s)
        ids = [http.post("/train", json={"speaker": s, "epochs": 10, "batch_tokens": 1}).json()["job_id"] for s in "AB"]
        jobs = [wait_for_job(http, i, finished, timeout=240) for i in ids]
        assert [j["status"] for j in jobs] == ["succeeded"] * 2, [j["error"] for j in jobs]
        a, b = jobs
        assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]  # they overlapped
        assert [resources_given(ray_cluster, f"persona-lora-{i}-1") for i in ids] == [{"CPU": 1, "GPU": 0.5}] * 2
        events = http.get(f"/jobs/{ids[0]}/events", params={"stream": "false"}).json()["data"]
        assert "asked the cluster for 0.5 GPUs (TRAIN_GPUS=0.5)" in [e["data"].get("message") for e in events]

        r = http.post("/speakers/A/exports/merged")
        assert r.status_code == 202, r.text
        export = wait_for_job(http, r.json()["job_id"], finished, timeout=180)
        assert export["status"] == "succeeded", export["error"]
        assert "model.safetensors" in export["result"]["files"]
        assert resources_given(ray_cluster, f"persona-lora-{export['job_id']}-1") == {"CPU": 1}
        assert (Path(export["result"]["path"]) / "model.safetensors").is_file()
        assert http.get("/speakers/A/exports/merged").status_code == 200
    finally:
        server.stop()


@pytest.mark.ray  # after the cluster's tests, as the next: Ray reads its auth mode once, at its import
def test_the_gpus_of_an_unreachable_cluster_are_a_connection_error():
    need_ray()
    from jobs.cluster import cluster_gpus

    with pytest.raises(ConnectionError, match="Failed to make request"):
        cluster_gpus(f"http://127.0.0.1:{free_port()}")


@pytest.mark.ray
def test_an_unreachable_cluster_answers_503_and_queues_nothing(env, monkeypatch):
    need_ray()
    from fastapi.testclient import TestClient

    from config import get_settings
    from main import app

    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("EXECUTOR", "ray")
    monkeypatch.setenv("RAY_ADDRESS", address)
    get_settings.cache_clear()
    with TestClient(app) as client:
        upload(client)
        r = client.post("/train", json={"speaker": "User1"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json() == {"detail": f"the Ray cluster at {address} (RAY_ADDRESS) cannot be reached (ConnectionError); "
                                      "nothing was queued. Retry after the Retry-After seconds, or start the cluster "
                                      "(README, 'Beyond one machine')"}
        assert client.get("/jobs").json()["count"] == 0
        assert client.get("/health").status_code == 200
