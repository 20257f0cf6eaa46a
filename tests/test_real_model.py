"""The real default base model (gemma-3-270m from its PyPI package), end to end. Marked: minutes on a CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT, LiveServer

import train
from config import DEFAULT_BASE_MODEL
from lm import base_model, chat_format

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory) -> Path:
    """Provision twice at once: one does the work, both get the same complete folder."""
    models_dir = tmp_path_factory.mktemp("models")
    results, errors = [], []

    def go():
        try:
            results.append(base_model.provision_default_model(models_dir))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results[0] == results[1] == models_dir / base_model.DEFAULT_MODEL_DIRNAME
    assert sorted(p.name for p in models_dir.iterdir() if not p.name.endswith(".lock")) == [base_model.DEFAULT_MODEL_DIRNAME]
    config = json.loads((results[0] / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["vocab_size"] == 262144
    return models_dir


def test_default_model_trains_end_to_end_through_the_service(provisioned, env, tmp_path):
    server = LiveServer({**env, "BASE_MODEL": DEFAULT_BASE_MODEL, "MODELS_DIR": str(provisioned)}, tmp_path / "server.log")
    try:
        run = subprocess.run(
            [sys.executable, "test.py", "--base-url", server.url, "--timeout", "900"],
            cwd=ROOT, capture_output=True, text=True, timeout=1800,
        )
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "server.log").read_text()[-5000:]
    info = json.loads((Path(env["OUTPUT_DIR"]) / "User1" / "training_info.json").read_text())
    assert info["base_model"] == DEFAULT_BASE_MODEL
    assert info["chat_template_source"] == chat_format.TRANSCRIPT_SOURCE
    assert info["config"]["load_in_8bit"] is True
    assert info["num_samples_used"] == 2 and info["final_loss"] > 0


def test_default_model_adapter_loads_with_peft(provisioned, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from config import Settings
    from models import TrainRequest, Turn
    from parser import build_samples

    dialog = [Turn(speaker="A", content="Як тебе звати?"), Turn(speaker="B", content="Мене звати Олена.")] * 3
    samples, _ = build_samples(dialog, "B", 4)
    config = train.resolve_config(Settings(DEVICE="cpu"), TrainRequest(speaker="B", max_steps=3))
    out = train.train_lora(samples, "B", config, tmp_path / "out", provisioned)
    base = AutoModelForCausalLM.from_pretrained(str(provisioned / base_model.DEFAULT_MODEL_DIRNAME), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out.model_path))
    assert sorted(model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
    ids = torch.tensor([[2, 21545, 36818]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_sigkill_during_provisioning_then_provision_cleanly(env, tmp_path):
    import signal
    import time

    import httpx
    from conftest import SAMPLE_DIALOG

    models_dir = tmp_path / "fresh-models"
    server_env = {**env, "BASE_MODEL": DEFAULT_BASE_MODEL, "MODELS_DIR": str(models_dir)}
    server = LiveServer(server_env, tmp_path / "server1.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        assert http.post("/upload-text", json={"dialog": SAMPLE_DIALOG, "speaker": "User1"}).status_code == 200
        job = http.post("/train", json={"speaker": "User1"}).json()
        deadline = time.monotonic() + 300
        while not list(models_dir.glob(".tmp-*/gguf/*.gguf")) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # into dequantizing
        assert not (models_dir / base_model.DEFAULT_MODEL_DIRNAME).exists(), "provisioning finished before the kill"
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
    finally:
        server.stop()
    time.sleep(1)  # the training child dies with its server (PR_SET_PDEATHSIG)
    assert list(models_dir.glob(".tmp-*")), "the kill should leave a half-made temporary folder"

    server = LiveServer(server_env, tmp_path / "server2.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=900)
        dead = http.get(job["url"]).json()
        assert (dead["status"], dead["error"]) == ("failed", "interrupted: the server stopped while the job ran")
        r = http.post("/train", json={"speaker": "User1", "wait": True})
        assert r.status_code == 200, r.text
    finally:
        server.stop()
    assert sorted(p.name for p in models_dir.iterdir() if not p.name.endswith(".lock")) == [base_model.DEFAULT_MODEL_DIRNAME]


STYLE_PHRASE = "ось так, друже 🌻"
TOPICS = ["кава", "погода", "робота", "кіно", "музика", "спорт", "книги", "море", "гори", "місто", "село", "кіт",
          "пес", "обід", "сніданок", "вечеря", "свято", "відпустка", "дощ", "сонце"]


def test_default_model_learns_a_speakers_style(provisioned, env, tmp_path, record_property):
    """A speaker who always ends with the same phrase: the adapter's held-out loss falls well below
    the base's, and its generations use the phrase far more often than the base's do."""
    import httpx

    dialog = []
    for i, topic in enumerate(TOPICS * 2):
        dialog += [{"speaker": "Друг", "content": f"Що скажеш про {topic}? ({i})"},
                   {"speaker": "Марко", "content": f"Про {topic} думаю по-своєму, {i % 7 + 1} рази на тиждень — {STYLE_PHRASE}"}]
    # One turn of context: the question alone, so the base cannot copy the phrase from the speaker's earlier turns.
    server = LiveServer({**env, "BASE_MODEL": DEFAULT_BASE_MODEL, "MODELS_DIR": str(provisioned), "EVAL_GENERATIONS": "4",
                         "MAX_CONTEXT_TURNS": "1"},
                        tmp_path / "server.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=1800)
        assert http.post("/upload-text", json={"dialog": dialog, "speaker": "Марко"}).status_code == 200
        r = http.post("/train", json={"speaker": "Марко", "wait": True})  # the defaults, nothing tuned
        assert r.status_code == 200, r.text
        report = http.get("/speakers/Марко/evaluation").json()
    finally:
        server.stop()
    base, adapter = report["held_out"]["base"]["loss"], report["held_out"]["adapter"]["loss"]
    used = {label: sum(STYLE_PHRASE in s[label] for s in report["samples"]) / len(report["samples"])
            for label in ("base", "adapter")}
    numbers = {"held_out_samples": report["held_out_samples"], "base_loss": base, "adapter_loss": adapter,
               "phrase_rate": used, "style_distance": {k: report["style"][k]["distance"] for k in ("base", "adapter")}}
    record_property("style_learning", numbers)
    print(f"\nstyle learning on the default model: {numbers}")
    assert report["held_out_samples"] >= 4
    assert adapter < 0.6 * base
    assert used["adapter"] >= 0.5 and used["adapter"] > used["base"]
    assert report["style"]["adapter"]["distance"] < report["style"]["base"]["distance"]
    generation = report["generation"]["adapter"]
    assert generation["ends_turn"] >= 0.75 and generation["loops"] <= 0.25, report["generation"]
    assert report["end_of_turn"]["adapter"] > report["end_of_turn"]["base"]
