from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

from config import get_settings  # noqa: E402
from jobs.runner import free_port  # noqa: E402
from models import SAMPLE_DIALOG  # noqa: E402,F401  (tests import it from here)
from ray_fixtures import ray_cluster, ray_nodes  # noqa: E402,F401  (one Ray cluster for every file's tests)

TERMINAL = ("succeeded", "failed", "cancelled")


# --- helpers for talking to a server: `http` is a FastAPI TestClient or an httpx.Client --------------


def upload(http, speaker: str = "User1", dialog: list[dict] | None = None) -> dict:
    """Store `dialog` for `speaker` and assert it was accepted. Without a dialog: the sample dialog,
    with User1's turns spoken by `speaker` when the sample has no turn of theirs."""
    if dialog is None:
        names = {t["speaker"] for t in SAMPLE_DIALOG}
        dialog = SAMPLE_DIALOG if speaker in names else [
            {**t, "speaker": speaker if t["speaker"] == "User1" else t["speaker"]} for t in SAMPLE_DIALOG]
    r = http.post("/upload-text", json={"dialog": dialog, "speaker": speaker})
    assert r.status_code == 200, r.text
    return r.json()


def finished(job: dict) -> bool:
    return job["status"] in TERMINAL


def training(job: dict) -> bool:
    """Running, with at least one step done (the model loaded, the temporary adapter folder made)."""
    return job["status"] == "running" and (job["progress"] or {}).get("step", 0) >= 1


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """The first truthy value of `predicate()`; fails the test, naming `what`, after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_for_job(http, job_id: str, predicate, timeout: float = 180, what: str | None = None,
                 interval: float = 0.1) -> dict:
    """The job's JSON once `predicate(job)` holds; fails the test with the last JSON seen on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        r = http.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if predicate(job):
            return job
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for job {job_id}: {what or predicate.__name__}; "
                        f"last seen: {json.dumps(job, ensure_ascii=False)}")
        time.sleep(interval)


def read_sse(response) -> list[dict]:
    """The Server-Sent Events of a streamed response, each as {"event": ..., "id": ..., "data": ...}."""
    events, current = [], {}
    for line in response.iter_lines():
        if line == "":
            if current:
                events.append(current)
            current = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            current[key] = value
    return events


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    return tiny.save_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny.save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return tiny.save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


def server_env(root: Path, base_model: Path) -> dict[str, str]:
    """Settings of a test's server: its own data, output and model folders under root."""
    return {
        "DATA_DIR": str(root / "data"),
        "OUTPUT_DIR": str(root / "output_lora"),
        "MODELS_DIR": str(root / "models"),
        "EXPORTS_DIR": str(root / "exports"),
        "BASE_MODEL": str(base_model),
        "DEVICE": "cpu",
    }


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_gemma) -> dict[str, str]:
    """Settings for one test, in the environment: the tiny model as base, folders under tmp_path."""
    values = server_env(tmp_path, tiny_gemma)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("ALLOWED_SPEAKERS", raising=False)
    get_settings.cache_clear()
    yield values
    get_settings.cache_clear()


@pytest.fixture
def client(env):
    from fastapi.testclient import TestClient

    from main import app

    with TestClient(app) as c:
        yield c


class LiveServer:
    """A real uvicorn process on loopback, started in the repo root with the given environment."""

    def __init__(self, env: dict[str, str], log_path: Path, command: tuple[str, ...] = ("-m", "uvicorn", "main:app")):
        """`command`: the server's arguments to python before --host and --port (uvicorn's own command by
        default; ("main.py",) for the service's entry, api/server.py)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, *command, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start: {log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def live_server(env, tmp_path):
    server = LiveServer(env, tmp_path / "server.log")
    yield server
    server.stop()


@contextmanager
def tmpfs(mount: Path, size: str):
    """A real filesystem of `size` (tmpfs) at `mount`, where the machine lets us mount one (root);
    the test is skipped elsewhere."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): a full disk needs a small real filesystem")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB filesystem at tmp_path/disk."""
    with tmpfs(tmp_path / "disk", "8m") as mount:
        yield mount


def fill_disk(disk: Path) -> Path:
    """Fill `disk` to its last block; the filler file, to unlink when the disk should have room again."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"x" * size)
            except OSError:
                pass
    return filler
