"""POST /generate, the OpenAI-compatible API (with the official `openai` client on a live server),
and the evaluation endpoints."""

from __future__ import annotations

import io
import time
import unicodedata
import zipfile
from pathlib import Path

import httpx
import pytest
from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI

from conftest import LiveServer

pytestmark = pytest.mark.slow  # one real uvicorn server, trained once for the module

NAME = "Zoë"  # not ASCII: the NFD spelling must find it, the download's file name must be RFC 5987-encoded
DIALOG = []
for i in range(12):
    DIALOG += [{"speaker": "Q", "content": f"питання {i}"}, {"speaker": NAME, "content": f"відповідь {i} 🌻"}]
ASK = [{"role": "user", "content": "питання 3"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gemma):
    from conftest import server_env

    root = tmp_path_factory.mktemp("gen")
    env = server_env(root, tiny_gemma)
    s = LiveServer(env, root / "server.log")
    http = httpx.Client(base_url=s.url, timeout=600)
    assert http.post("/upload-text", json={"dialog": DIALOG, "speaker": NAME}).status_code == 200
    r = http.post("/train", json={"speaker": NAME, "epochs": 3, "learning_rate": 0.01, "wait": True})
    assert r.status_code == 200, r.text
    s.env, s.job = env, r.json()["job"]
    yield s
    s.stop()


def test_generate(server):
    http = httpx.Client(base_url=server.url, timeout=120)
    r = http.post("/generate", json={"speaker": NAME, "messages": [{"speaker": "user", "content": "питання 3"}],
                                     "max_new_tokens": 6, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["speaker"] == NAME and isinstance(body["reply"], str)
    assert 0 < body["completion_tokens"] <= 6 and body["finish_reason"] in ("stop", "length")
    again = http.post("/generate", json={"speaker": NAME, "prompt": "питання 3", "max_new_tokens": 6, "seed": 1}).json()
    assert again["reply"] == body["reply"]  # a prompt is one user turn: the same request
    r = http.post("/generate", json={"speaker": "Nobody", "prompt": "hi"})
    assert r.status_code == 404 and "no adapter for speaker 'Nobody'" in r.json()["detail"]
    r = http.post("/generate", json={"speaker": NAME})
    assert r.status_code == 422
    r = http.post("/generate", json={"speaker": NAME, "prompt": "x", "messages": [{"speaker": "Q", "content": "y"}]})
    assert r.status_code == 422


def test_openai_client_plain_and_streaming(server):
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    models = [m.id for m in client.models.list()]
    assert models == [server.env["BASE_MODEL"], NAME]
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "питання 3"}],
                                           max_tokens=6, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 6 and reply.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "питання 3"}],
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
            "model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_evaluation_after_training_and_on_demand(server):
    http = httpx.Client(base_url=server.url, timeout=600)
    result = server.job["result"]
    assert result["num_heldout"] >= 1 and "evaluation" in result
    held = result["evaluation"]["held_out"]
    assert held["base"]["tokens"] == held["adapter"]["tokens"] > 0
    report = http.get(f"/speakers/{NAME}/evaluation").json()
    assert report["held_out"] == held and report["samples"][0]["true"].endswith("🌻")
    png = http.get(f"/speakers/{NAME}/loss.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    fresh = http.post(f"/speakers/{NAME}/evaluate")
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


def _client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_errors_in_openai_shape(server):
    client = _client(server)
    with pytest.raises(NotFoundError) as missing:
        client.chat.completions.create(model="Nobody", messages=ASK)
    assert "no model 'Nobody': train the speaker first" in missing.value.message
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(NotFoundError):  # a name no speaker can have is no model either, not a 500
        client.chat.completions.create(model="0" * 500, messages=ASK)
    with pytest.raises(BadRequestError) as invalid:  # FastAPI's 422 is OpenAI's 400
        client.chat.completions.create(model=NAME, messages=[])
    assert "messages: List should have at least 1 item" in invalid.value.message
    assert invalid.value.type == "invalid_request_error" and invalid.value.param == "messages"
    with pytest.raises(BadRequestError) as image:
        client.chat.completions.create(model=NAME, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert "messages.0.content" in image.value.message
    with pytest.raises(BadRequestError) as many:
        client.chat.completions.create(model=NAME, messages=ASK, n=5)
    assert many.value.param == "n" and "less than or equal to 4" in many.value.message
    http = httpx.Client(base_url=server.url, timeout=60)
    r = http.post("/v1/chat/completions", json={"model": "Nobody", "messages": ASK})
    assert r.status_code == 404 and set(r.json()) == {"error"}
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json() == {"error": {"message": "Not Found", "type": "invalid_request_error",
                                                           "param": None, "code": None}}
    # every other route keeps FastAPI's shape
    assert http.get("/nothing-here").json() == {"detail": "Not Found"}
    assert http.post("/generate", json={"speaker": "Nobody", "prompt": "hi"}).json() == {
        "detail": "no adapter for speaker 'Nobody'; train one with POST /train"}
    assert "detail" in http.post("/generate", json={"speaker": NAME}).json()


def test_openai_401_and_413_in_openai_shape(env, monkeypatch):
    from fastapi.testclient import TestClient

    from config import get_settings
    from main import app

    monkeypatch.setenv("API_KEY", "secret")
    monkeypatch.setenv("MAX_BODY_BYTES", "2000")
    get_settings.cache_clear()
    with TestClient(app) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=http, max_retries=0)
        with pytest.raises(AuthenticationError) as denied:
            client.models.list()
        assert "missing or wrong API key" in denied.value.message and denied.value.code == "invalid_api_key"
        assert http.get("/speakers").json() == {"detail": "missing or wrong API key: send 'Authorization: Bearer <API_KEY>'"}
        key = {"Authorization": "Bearer secret"}
        r = http.post("/v1/chat/completions", headers=key, json={"model": "x", "messages": [{"role": "user", "content": "a" * 3000}]})
        assert r.status_code == 413 and r.json()["error"]["message"].startswith("request body is larger than MAX_BODY_BYTES=2000")
        r = http.post("/upload-text", headers=key, json={"dialog": [{"speaker": "a", "content": "a" * 3000}], "speaker": "a"})
        assert r.status_code == 413 and "detail" in r.json()


def test_openai_request_shapes(server):
    client = _client(server)
    plain = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=6, temperature=0)
    parts = client.chat.completions.create(model=NAME, max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "питання 3"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content  # text parts are the text
    nfd = unicodedata.normalize("NFD", NAME)
    assert nfd != NAME
    same = client.chat.completions.create(model=nfd, messages=ASK, max_tokens=6, temperature=0)
    assert same.choices[0].message.content == plain.choices[0].message.content and same.model == nfd
    tools = client.chat.completions.create(model=NAME, max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": "погода?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "питання 3"}])
    assert tools.choices[0].finish_reason in ("stop", "length") and tools.usage.prompt_tokens > plain.usage.prompt_tokens
    long = client.chat.completions.create(model=NAME, messages=ASK, max_completion_tokens=4096, temperature=0)
    assert 0 < long.usage.completion_tokens <= 1024  # clamped, not refused
    assert long.usage.total_tokens == long.usage.prompt_tokens + long.usage.completion_tokens


def test_openai_stop_ends_the_reply_in_both_modes(server):
    client = _client(server)
    full = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=12, temperature=0).choices[0].message.content
    assert len(full) >= 3, full
    stop = full[1:3]  # greedy: with a stop string the reply is the same text, ended before the stop
    expected = full[: full.find(stop)].strip()
    cut = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=12, temperature=0, stop=stop)
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=NAME, messages=ASK, max_tokens=12, temperature=0,
                                                 stop=[stop, "never"], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    # Its first token is not the end of the turn (the reply has text): one token is a reply cut by the limit.
    short = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=1, temperature=0)
    assert short.usage.completion_tokens == 1 and short.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=NAME, messages=ASK, max_tokens=1, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_seed_n_and_usage(server):
    client = _client(server)
    ask = dict(model=NAME, messages=ASK, max_tokens=8, temperature=1.5, top_p=1.0)
    one = [client.chat.completions.create(**ask, seed=s).choices[0].message.content for s in (5, 6)]
    assert client.chat.completions.create(**ask, seed=5).choices[0].message.content == one[0]  # seed honoured
    both = client.chat.completions.create(**ask, seed=5, n=2)
    assert [c.index for c in both.choices] == [0, 1] and [c.message.content for c in both.choices] == one
    chunks = list(client.chat.completions.create(**ask, seed=5, n=2, stream=True, stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in (0, 1)]
    assert [s.strip() for s in streamed] == one
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == both.usage.model_dump()
    assert both.usage.completion_tokens == sum(
        client.chat.completions.create(**ask, seed=s).usage.completion_tokens for s in (5, 6))
    plain = list(client.chat.completions.create(**ask, seed=5, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason in ("stop", "length")


def test_langchain_openai_client(server):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=NAME, temperature=0, max_tokens=6, max_retries=0)
    reply = chat.invoke("питання 3")
    expected = _client(server).chat.completions.create(model=NAME, messages=ASK, max_tokens=6, temperature=0)
    assert reply.content == expected.choices[0].message.content
    assert reply.response_metadata["finish_reason"] == expected.choices[0].finish_reason
    assert "".join(piece.content for piece in chat.stream("питання 3")).strip() == reply.content


def test_adapter_download_loads_with_peft(server, tiny_gemma, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    http = httpx.Client(base_url=server.url, timeout=120)
    r = http.get(f"/speakers/{NAME}/adapter")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["content-disposition"] == "attachment; filename*=utf-8''Zo%C3%AB-adapter.zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "unzipped")
    assert {"adapter_config.json", "adapter_model.safetensors", "training_info.json", "tokenizer.json"} <= names
    assert not names & {"eval.json", "loss.png"}  # the evaluation quotes people's messages: not shipped
    ids = torch.tensor([[2, 10, 20, 30, 40, 50]])
    logits = []
    for place in (tmp_path / "unzipped", f"{server.env['OUTPUT_DIR']}/{NAME}"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gemma), place).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
            with model.disable_adapter():
                base = model(input_ids=ids).logits
    assert torch.equal(logits[0], logits[1]) and not torch.allclose(logits[0], base)  # the trained adapter, whole
    missing = http.get("/speakers/Nobody/adapter")
    assert missing.status_code == 404 and missing.json() == {
        "detail": "no adapter for speaker 'Nobody'; train one with POST /train"}


def test_a_prompt_beyond_the_models_context_keeps_its_latest_turns(server):
    """Issue 29, defect 6: 32 messages of 1,000 characters (about 27,000 tokens) to a model of 1,024
    positions: the prompt is bound to the context less the reply's room, and usage says so."""
    positions, room = 1024, 16
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": (f"turn {i} " + "слово " * 200)[:1000]}
            for i in range(32)]
    http = httpx.Client(base_url=server.url, timeout=120)
    started = time.monotonic()
    r = http.post("/v1/chat/completions", json={"model": NAME, "messages": long, "max_tokens": room, "seed": 1})
    bound_s = time.monotonic() - started
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert 0 < usage["prompt_tokens"] <= positions - room, usage
    assert usage["total_tokens"] <= positions
    turns = [{"speaker": NAME if m["role"] == "assistant" else "Q", "content": m["content"]} for m in long]
    r = http.post("/generate", json={"speaker": NAME, "messages": turns, "max_new_tokens": room, "seed": 1})
    assert r.status_code == 200, r.text
    assert 0 < r.json()["prompt_tokens"] <= positions - room
    r = http.post("/v1/chat/completions", json={"model": NAME, "messages": long[-1:], "max_tokens": room, "stream": True,
                                                "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    print(f"a {len(long)}-message prompt bound to {usage['prompt_tokens']} tokens, answered in {bound_s:.2f} s")


def damaged_copy(server, name: str, damage) -> str:
    """A copy of the trained adapter as speaker `name`'s, damaged by `damage(folder)`."""
    import shutil

    out = Path(server.env["OUTPUT_DIR"])
    shutil.copytree(out / NAME, out / name)
    damage(out / name)
    return name


def test_a_damaged_adapter_says_which_and_what_to_do(server):
    """Issue 29, defect 11: a truncated adapter_model.safetensors, a missing adapter_config.json."""
    def truncate(folder: Path) -> None:
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])

    truncated = damaged_copy(server, "Cut", truncate)
    unconfigured = damaged_copy(server, "NoConfig", lambda folder: (folder / "adapter_config.json").unlink())
    http = httpx.Client(base_url=server.url, timeout=120)

    def detail(speaker: str, error: str) -> str:
        return (f"the adapter of speaker '{speaker}' is damaged and cannot be loaded ({error} reading output_lora/"
                f"{speaker}); train it again with POST /train, which replaces it, or delete that folder")

    r = http.post("/generate", json={"speaker": truncated, "prompt": "hi", "max_new_tokens": 2})
    assert (r.status_code, r.json()) == (500, {"detail": detail(truncated, "SafetensorError")})
    r = http.post("/generate", json={"speaker": unconfigured, "prompt": "hi", "max_new_tokens": 2})
    assert (r.status_code, r.json()) == (500, {"detail": detail(unconfigured, "ValueError")})
    for stream in (False, True):
        r = http.post("/v1/chat/completions", json={"model": truncated, "messages": ASK, "max_tokens": 2, "stream": stream})
        assert (r.status_code, r.json()) == (500, {"error": {"message": detail(truncated, "SafetensorError"),
                                                             "type": "server_error", "param": None, "code": None}})
    r = http.post("/generate", json={"speaker": NAME, "prompt": "питання 3", "max_new_tokens": 2})
    assert r.status_code == 200, r.text  # the engine goes on with the others
    r = http.post("/generate", json={"speaker": truncated, "prompt": "hi", "max_new_tokens": 2})
    assert r.status_code == 500  # and a damaged one stays refused, not half-loaded
    responses = http.get("/openapi.json").json()["paths"]
    assert "damaged" in responses["/generate"]["post"]["responses"]["500"]["description"]
    assert "damaged" in responses["/v1/chat/completions"]["post"]["responses"]["500"]["description"]
