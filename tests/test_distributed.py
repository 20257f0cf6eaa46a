"""Data-parallel training: train.py under `accelerate launch` and `torchrun` (two CPU processes,
gloo), and the service running its jobs that way (TRAIN_PROCESSES=2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, LiveServer, finished, training, wait_for_job
from safetensors.torch import load_file

import parser as dialog_parser
import store
from models import Turn

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]

pytestmark = pytest.mark.slow  # real uvicorn servers and training processes


@pytest.fixture
def stored(env):
    dialog = [Turn(speaker="A" if i % 2 else "B", content=f"повідомлення {i} " * (1 + i % 3)) for i in range(16)]
    samples, _ = dialog_parser.build_samples(dialog, "A", 4)
    store.append_samples(Path(env["DATA_DIR"]), "A", samples)
    return len(samples)


def run_train(env, output: Path, launcher: list[str], batch_size: int) -> dict:
    # --batch-tokens 1: a packed sequence per sample, so batches of 8 and 2x4 hold the same samples
    args = ["train.py", "--speaker", "A", "--batch-size", str(batch_size), "--batch-tokens", "1", "--epochs", "3",
            "--lora-dropout", "0", "--learning-rate", "0.01"]
    run = subprocess.run([*launcher, *args], cwd=ROOT, env={**os.environ, **env, "OUTPUT_DIR": str(output)},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summaries = [line for line in run.stdout.splitlines() if '"message": "Training completed' in line]
    assert len(summaries) == 1, "only the main process reports"
    return json.loads((output / "A" / "training_info.json").read_text())


@pytest.mark.parametrize("launcher", [LAUNCH, TORCHRUN], ids=["accelerate", "torchrun"])
def test_two_processes_train_the_same_adapter_as_one(env, stored, tmp_path, launcher):
    one = run_train(env, tmp_path / "one", [sys.executable], batch_size=8)
    two = run_train(env, tmp_path / "two", launcher, batch_size=4)  # the same global batch of 8
    assert one["steps"] == two["steps"] == 3
    a = load_file(str(tmp_path / "one" / "A" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "A" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(a[k].abs().max().item() for k in a) > 1e-3  # training moved the weights
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["A"]


def test_service_runs_jobs_with_two_processes(env, stored, tmp_path):
    server = LiveServer({**env, "TRAIN_PROCESSES": "2", "PROGRESS_INTERVAL_S": "0"}, tmp_path / "server.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=600)
        r = http.post("/train", json={"speaker": "A", "epochs": 2, "wait": True, "batch_tokens": 1})
        assert r.status_code == 200, r.text
        job = r.json()["job"]
        assert job["result"]["steps"] == 8  # 8 samples x 2 epochs over 2 processes at batch 1
        events = http.get(f"{job['url']}/events", params={"stream": "false"}).json()["data"]
        steps = [e["data"]["step"] for e in events if e["type"] == "progress"]
        assert steps == list(range(1, 9))  # reported once, by the main process
        assert sorted(p.name for p in (Path(env["OUTPUT_DIR"])).iterdir()) == ["A"]

        long = http.post("/train", json={"speaker": "A", "max_steps": 10**6}).json()
        wait_for_job(http, long["job_id"], training, timeout=120)
        assert http.post(f"{long['url']}/cancel").status_code == 200
        assert wait_for_job(http, long["job_id"], finished, timeout=120)["status"] == "cancelled"
        assert http.post("/train", json={"speaker": "A", "wait": True}).status_code == 200  # nothing left hanging
    finally:
        server.stop()


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_killed_training_process_fails_the_job_with_status_and_log(env, stored, tmp_path, processes):
    import psutil

    server = LiveServer({**env, "TRAIN_PROCESSES": processes}, tmp_path / "server.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=600)
        job = http.post("/train", json={"speaker": "A", "max_steps": 10**6}).json()
        wait_for_job(http, job["job_id"], training, timeout=120)
        children = [c for c in psutil.Process(server.proc.pid).children() if "jobs.runner" in " ".join(c.cmdline())]
        assert len(children) == 1, psutil.Process(server.proc.pid).children()  # the job's process (or its launcher)
        children[0].kill()
        failed = wait_for_job(http, job["job_id"], finished, timeout=120)
        assert failed["status"] == "failed"
        assert failed["error"].startswith("the training process exited with status -9 (killed by SIGKILL); last log lines:\n")
        assert len(failed["error"].splitlines()) > 2
        assert not (Path(env["OUTPUT_DIR"]) / "A").exists()
        assert http.get("/health").status_code == 200
    finally:
        server.stop()


def test_load_failure_under_accelerate_is_reported(env, stored, tmp_path):
    server = LiveServer({**env, "TRAIN_PROCESSES": "2", "BASE_MODEL": str(tmp_path / "missing")}, tmp_path / "server.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=600)
        r = http.post("/train", json={"speaker": "A", "wait": True})
        assert r.status_code == 500
        assert "could not load base model" in r.json()["detail"]
    finally:
        server.stop()
