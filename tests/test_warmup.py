"""Start-up warms the base model in the background (issue 15, defect 10): while the default model is
being provisioned, requests that need it answer 503 with Retry-After at once instead of provisioning
inside the request; /health says where it stands. Provisioning is slowed at its boundary
(base_model.provision_default_model), the rest is real."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import SAMPLE_DIALOG, upload, wait_until

from config import DEFAULT_BASE_MODEL, get_settings
from lm import base_model

HELD_S = 20  # the double holds provisioning at most this long: a request that waited for it takes as long


@pytest.fixture
def provisioning(env, monkeypatch, tiny_gemma):
    """A TestClient whose default base model provisions only when `release` is set (the tiny model's files)."""
    from fastapi.testclient import TestClient

    from main import app

    monkeypatch.setenv("BASE_MODEL", DEFAULT_BASE_MODEL)
    get_settings.cache_clear()
    release, calls = threading.Event(), []

    def slow_provision(models_dir):
        calls.append(threading.current_thread().name)
        release.wait(HELD_S)
        target = models_dir / base_model.DEFAULT_MODEL_DIRNAME
        if not target.exists():
            shutil.copytree(tiny_gemma, target)
        return target

    monkeypatch.setattr(base_model, "provision_default_model", slow_provision)
    with TestClient(app) as client:
        yield client, release, calls
    release.set()


def test_requests_answer_503_while_the_model_provisions_then_work(provisioning):
    client, release, calls = provisioning
    wait_until(lambda: calls, 30, "provisioning to start at start-up")
    assert client.get("/health").json()["model"] == "provisioning"
    upload(client, "User1", SAMPLE_DIALOG)  # storing data needs no model
    adapter = Path(get_settings().OUTPUT_DIR) / "User1"  # an adapter trained before this start (its info is what counts)
    adapter.mkdir(parents=True)
    (adapter / "training_info.json").write_text('{"speaker": "User1"}', encoding="utf-8")

    started = time.perf_counter()
    for r in (client.get("/speakers/User1/dataset"),
              client.post("/generate", json={"speaker": "User1", "prompt": "hi"})):
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json() == {"detail": f"the base model {DEFAULT_BASE_MODEL!r} is being provisioned (the first start "
                                      "takes about a minute); retry after the Retry-After seconds"}
    r = client.post("/v1/chat/completions", json={"model": "User1", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error", r.text
    waited = time.perf_counter() - started
    assert waited < 0.25 * HELD_S, f"the refusals took {waited:.1f} s: they waited for provisioning"

    release.set()
    wait_until(lambda: client.get("/health").json()["model"] == "ready", 60, "the model to be ready")
    r = client.get("/speakers/User1/dataset")
    assert r.status_code == 200, r.text
    assert r.json()["data"]
    assert len(calls) == 1  # provisioned once, at start-up, not again by the request


def test_a_failed_provisioning_is_reported(env, monkeypatch):
    from fastapi.testclient import TestClient

    from main import app

    monkeypatch.setenv("BASE_MODEL", DEFAULT_BASE_MODEL)
    get_settings.cache_clear()

    def broken(models_dir):
        raise OSError("No space left on device")

    monkeypatch.setattr(base_model, "provision_default_model", broken)
    with TestClient(app) as client:
        health = wait_until(lambda: (h := client.get("/health").json())["model"] != "provisioning" and h, 30, "failure")
        assert health["model"] == "failed: OSError: No space left on device"
        upload(client, "User1", SAMPLE_DIALOG)
        r = client.get("/speakers/User1/dataset")  # tries again, and says why it cannot
        assert r.status_code == 500 and "No space left on device" in r.json()["detail"], r.text
