"""POST /generate, the OpenAI-compatible API (with the official `openai` client on a live server),
and the evaluation endpoints."""

from __future__ import annotations

import httpx
import pytest
from openai import NotFoundError, OpenAI

from conftest import LiveServer

pytestmark = pytest.mark.slow  # one real uvicorn server, trained once for the module

DIALOG = []
for i in range(12):
    DIALOG += [{"speaker": "Q", "content": f"питання {i}"}, {"speaker": "Ann", "content": f"відповідь {i} 🌻"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gemma):
    from conftest import server_env

    root = tmp_path_factory.mktemp("gen")
    env = server_env(root, tiny_gemma)
    s = LiveServer(env, root / "server.log")
    http = httpx.Client(base_url=s.url, timeout=600)
    assert http.post("/upload-text", json={"dialog": DIALOG, "speaker": "Ann"}).status_code == 200
    r = http.post("/train", json={"speaker": "Ann", "epochs": 3, "learning_rate": 0.01, "wait": True})
    assert r.status_code == 200, r.text
    s.env, s.job = env, r.json()["job"]
    yield s
    s.stop()


def test_generate(server):
    http = httpx.Client(base_url=server.url, timeout=120)
    r = http.post("/generate", json={"speaker": "Ann", "messages": [{"speaker": "Q", "content": "питання 3"}],
                                     "max_new_tokens": 6, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["speaker"] == "Ann" and isinstance(body["reply"], str)
    assert 0 < body["completion_tokens"] <= 6 and body["finish_reason"] in ("stop", "length")
    again = http.post("/generate", json={"speaker": "Ann", "prompt": "питання 3", "max_new_tokens": 6, "seed": 1}).json()
    assert again["reply"] == body["reply"]  # a prompt is one user turn: the same request
    r = http.post("/generate", json={"speaker": "Nobody", "prompt": "hi"})
    assert r.status_code == 404 and "no adapter for speaker 'Nobody'" in r.json()["detail"]
    r = http.post("/generate", json={"speaker": "Ann"})
    assert r.status_code == 422
    r = http.post("/generate", json={"speaker": "Ann", "prompt": "x", "messages": [{"speaker": "Q", "content": "y"}]})
    assert r.status_code == 422


def test_openai_client_plain_and_streaming(server):
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    models = [m.id for m in client.models.list()]
    assert models == [server.env["BASE_MODEL"], "Ann"]
    reply = client.chat.completions.create(model="Ann", messages=[{"role": "user", "content": "питання 3"}],
                                           max_tokens=6, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 6 and reply.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="Ann", messages=[{"role": "user", "content": "питання 3"}],
                                                 max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason  # the same in both modes
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed.strip() == reply.choices[0].message.content
    base = client.chat.completions.create(model=server.env["BASE_MODEL"], messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "питання 3"}], max_tokens=4)
    assert base.model == server.env["BASE_MODEL"]
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="Nobody", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="Nobody", messages=[{"role": "user", "content": "hi"}], stream=True)


def test_stream_wire_format_ends_with_done(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": "Ann", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_evaluation_after_training_and_on_demand(server):
    http = httpx.Client(base_url=server.url, timeout=600)
    result = server.job["result"]
    assert result["num_heldout"] >= 1 and "evaluation" in result
    held = result["evaluation"]["held_out"]
    assert held["base"]["tokens"] == held["adapter"]["tokens"] > 0
    report = http.get("/speakers/Ann/evaluation").json()
    assert report["held_out"] == held and report["samples"][0]["true"].endswith("🌻")
    png = http.get("/speakers/Ann/loss.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    fresh = http.post("/speakers/Ann/evaluate")
    assert fresh.status_code == 200, fresh.text
    # After training the report comes from the trained model in memory (its 8-bit base dequantized on a
    # CPU); on demand from the generation engine (the dense base): the same adapter and tokens, losses
    # equal to the 8-bit rounding.
    assert (report["base_weights"], fresh.json()["base_weights"]) == ("8-bit, dequantized to float32", "float32")
    assert fresh.json()["held_out"]["adapter"]["tokens"] == held["adapter"]["tokens"]
    assert fresh.json()["held_out"]["adapter"]["loss"] == pytest.approx(held["adapter"]["loss"], rel=2e-3)
    assert http.get("/speakers/Nobody/evaluation").status_code == 404
    assert http.get("/speakers/Nobody/loss.png").status_code == 404
    assert http.post("/speakers/Nobody/evaluate").status_code == 404
