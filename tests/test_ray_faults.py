"""Faults of jobs on a Ray cluster (EXECUTOR=ray, jobs/cluster.py), on the session's real local cluster
and real uvicorn servers: the network between the server and the cluster cut (a proxy) while one job
runs and one is queued, across a server restart, and mended; a node lost mid-training (a second node
joined to the cluster, every process of it killed at once) and the job resumed on a node that took its
place. The server killed mid-job and a worker killed mid-job are in test_ray.py."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from conftest import LiveServer, finished, training, upload, wait_for_job, wait_until
from ray_fixtures import Proxy, ray_env, submissions

LONG = 10**6  # max_steps of a job that runs until it is cancelled


def statuses(http, job: dict) -> list[str]:
    events = http.get(f"{job['url']}/events", params={"stream": "false"}).json()["data"]
    return [e["data"]["status"] for e in events if e["type"] == "status"]


@pytest.mark.ray
@pytest.mark.slow
def test_queued_jobs_wait_for_an_unreachable_cluster_and_run_once_it_answers(env, tmp_path, ray_cluster):
    proxy = Proxy(ray_cluster.address)  # the server reaches the cluster through it
    settings = ray_env(env, ray_cluster, address=proxy.address, TRAIN_WORKERS="1")
    server = LiveServer(settings, tmp_path / "server.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        for speaker in ("A", "B"):
            upload(http, speaker)
        running = http.post("/train", json={"speaker": "A", "max_steps": LONG}).json()
        queued = http.post("/train", json={"speaker": "B", "max_steps": 2}).json()  # behind it: TRAIN_WORKERS=1
        wait_for_job(http, running["job_id"], training, timeout=120)
        assert http.get(queued["url"]).json()["status"] == "queued"

        proxy.cut()  # a moment: the running job's live log breaks off
        step = http.get(running["url"]).json()["progress"]["step"]
        proxy.mend()
        wait_for_job(http, running["job_id"], lambda j: j["progress"]["step"] > step + 2, timeout=60,
                     what="its progress followed again once the cluster answered")

        proxy.cut()
        assert http.post(f"{running['url']}/cancel").status_code == 200  # passed on once the cluster answers
        log = lambda: (tmp_path / "server.log").read_text()  # noqa: E731
        wait_until(lambda: "the cancel cannot reach the cluster" in log() or http.get(running["url"]).json()["status"] != "running",
                   60, "the cancel tried")
        assert http.get(running["url"]).json()["status"] == "running", http.get(running["url"]).json()["error"]
    finally:
        server.stop()  # the running job runs on; the queued one stays queued in the registry

    server = LiveServer({**settings, "TRAIN_WORKERS": "2"}, tmp_path / "server2.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        log = lambda: (tmp_path / "server2.log").read_text()  # noqa: E731
        waiting = f"job {queued['job_id']}: the Ray cluster at {proxy.address} (RAY_ADDRESS) cannot be reached"
        wait_until(lambda: waiting in log(), 60, "the queued job waiting for the cluster")
        assert "it stays queued" in log()
        assert [http.get(j["url"]).json()["status"] for j in (running, queued)] == ["running", "queued"]

        proxy.mend()
        cancelled = wait_for_job(http, running["job_id"], finished, timeout=120)
        assert cancelled["status"] == "cancelled" and cancelled["error"] is None
        done = wait_for_job(http, queued["job_id"], finished, timeout=180)
        assert done["status"] == "succeeded" and done["result"]["steps"] == 2, done["error"]
        assert statuses(http, queued) == ["queued", "running", "succeeded"]  # submitted once, nothing lost
        assert submissions(ray_cluster, queued["job_id"]) == [f"persona-lora-{queued['job_id']}-1"]
        assert submissions(ray_cluster, running["job_id"]) == [f"persona-lora-{running['job_id']}-1"]
        assert http.get("/jobs").json()["count"] == 2
        assert not list(Path(env["OUTPUT_DIR"]).glob(".tmp-*"))
    finally:
        server.stop()
        proxy.close()


@pytest.mark.ray
@pytest.mark.slow
def test_a_lost_node_fails_its_job_with_the_reason_and_it_resumes_on_another(env, tmp_path, ray_cluster, ray_nodes):
    from jobs.cluster import cluster_gpus

    node = ray_nodes(cpus=1, gpus=2)  # the head has 1 GPU: a training asking for 2 runs on this node
    server = LiveServer(ray_env(env, ray_cluster, TRAIN_GPUS="2", CHECKPOINT_STEPS="2"), tmp_path / "server.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        upload(http, "A")
        job = http.post("/train", json={"speaker": "A", "max_steps": LONG}).json()
        wait_for_job(http, job["job_id"], lambda j: j["checkpoint"] is not None, timeout=120)
        first = f"persona-lora-{job['job_id']}-1"
        assert ray_cluster.client().get_job_info(first).driver_node_id == node.node_id
        node.lose()
        failed = wait_for_job(http, job["job_id"], finished, timeout=180)  # Ray notices in its health checks' time
        assert failed["status"] == "failed"
        assert failed["error"].startswith("the training process ended without an exit status (Ray: Job supervisor actor "
                                          "died"), failed["error"]
        assert f"its node has died. Node Id: {node.node_id}" in failed["error"].splitlines()[0]
        checkpoint = Path(failed["checkpoint"])
        assert (checkpoint / "trainer_state.json").is_file()  # the newest whole one, whatever the last report said
        assert not (Path(env["OUTPUT_DIR"]) / "A").exists() and not list(Path(env["OUTPUT_DIR"]).glob(".tmp-*"))
        assert cluster_gpus(ray_cluster.address) == 1  # the head's: a lost node's do not count

        again = ray_nodes(cpus=1, gpus=2)  # a node takes its place
        assert cluster_gpus(ray_cluster.address) == 3
        r = http.post(f"{job['url']}/resume")
        assert r.status_code == 202, r.text
        step = int(checkpoint.name.removeprefix("checkpoint-"))
        wait_for_job(http, job["job_id"], lambda j: j["status"] == "running" and (j["progress"] or {}).get("step", 0) > step,
                     timeout=180, what="training on after its checkpoint")
        events = http.get(f"{job['url']}/events", params={"stream": "false"}).json()["data"]
        resumed = [e for e in events if e["type"] == "status" and e["data"]["status"] == "running"][-1]["id"]
        assert f"resuming from {checkpoint}" in [e["data"].get("message") for e in events if e["id"] > resumed]
        assert [e["data"]["step"] for e in events if e["id"] > resumed and e["type"] == "progress"][0] == step + 1
        assert submissions(ray_cluster, job["job_id"]) == [first, f"persona-lora-{job['job_id']}-2"]
        assert ray_cluster.client().get_job_info(f"persona-lora-{job['job_id']}-2").driver_node_id == again.node_id
        assert http.post(f"{job['url']}/cancel").status_code == 200
        assert wait_for_job(http, job["job_id"], finished, timeout=120)["status"] == "cancelled"
    finally:
        server.stop()
