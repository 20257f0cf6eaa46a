from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402
from config import get_settings  # noqa: E402
from jobs import free_port  # noqa: E402
from models import SAMPLE_DIALOG  # noqa: E402,F401  (tests import it from here)



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

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(self.port)],
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
