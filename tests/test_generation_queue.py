"""Generation has its own bounded queue (issue 15, defect 7): long generations neither starve the job
and data endpoints nor pile up without bound. The engine is slowed at its boundary (this test is about
queueing, not about replies): each generation sleeps GEN_S."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import wait_until

from config import get_settings
from lm.infer import Generation, PersonaEngine

GEN_S = 1.5
QUEUE = 6


@pytest.fixture
def slow_client(env, monkeypatch):
    from fastapi.testclient import TestClient

    from lm import adapters, evals
    from main import app

    monkeypatch.setenv("GENERATION_WORKERS", "1")
    monkeypatch.setenv("GENERATION_QUEUE", str(QUEUE))
    get_settings.cache_clear()

    def slow_generate(self, speaker, messages, decoding):
        time.sleep(GEN_S)
        return Generation("hi", 3, 1, "stop")

    def slow_stream(self, speaker, messages, decoding):
        time.sleep(GEN_S)
        yield "hi"
        yield Generation("hi", 3, 1, "stop")

    monkeypatch.setattr(adapters, "info", lambda output_root, speaker: {"speaker": speaker})  # Ann has an adapter
    monkeypatch.setattr(PersonaEngine, "generate", slow_generate)
    monkeypatch.setattr(PersonaEngine, "stream", slow_stream)
    monkeypatch.setattr(evals, "evaluate_speaker", lambda settings, speaker, engine: time.sleep(GEN_S) or {"speaker": speaker})
    with TestClient(app) as c:
        yield c


def timed(call):
    started = time.perf_counter()
    r = call()
    return time.perf_counter() - started, r


def test_full_generation_queue_answers_503_and_reads_stay_fast(slow_client):
    client = slow_client
    answers = []
    gen = lambda: answers.append(client.post("/generate", json={"speaker": "Ann", "prompt": "hi"}))  # noqa: E731
    threads = [threading.Thread(target=gen) for _ in range(QUEUE + 1)]  # one running, QUEUE waiting
    for t in threads:
        t.start()
    gate = client.app.state.generation
    wait_until(lambda: gate.admitted == QUEUE + 1, 30, "every generation admitted")

    reads = [timed(lambda: client.get(path)) for path in ("/jobs", "/speakers", "/jobs/0123abcd/events?stream=false",
                                                          "/health")]
    assert [r.status_code for _, r in reads] == [200, 200, 404, 200]
    slowest = max(seconds for seconds, _ in reads)
    print(f"\nslowest read {slowest * 1000:.0f} ms while {QUEUE + 1} generations of {GEN_S} s were admitted")
    assert slowest < 0.2 * GEN_S, f"a read took {slowest:.2f} s, {slowest / GEN_S:.0%} of one generation"

    refused = [
        client.post("/generate", json={"speaker": "Ann", "prompt": "hi"}),
        client.post("/speakers/Ann/evaluate"),
        client.post("/v1/chat/completions", json={"model": "Ann", "messages": [{"role": "user", "content": "hi"}]}),
        client.post("/v1/chat/completions", json={"model": "Ann", "stream": True,
                                                  "messages": [{"role": "user", "content": "hi"}]}),
    ]
    for r in refused:
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) >= 1
    detail = (f"generation is busy: 1 running and {QUEUE} waiting (GENERATION_WORKERS=1, GENERATION_QUEUE={QUEUE}); "
              "retry after the Retry-After seconds")
    assert refused[0].json() == {"detail": detail}
    assert refused[1].json() == {"detail": detail}
    assert refused[2].json()["error"] == {"message": detail, "type": "server_error", "param": None, "code": None}
    assert refused[3].json()["error"]["message"] == detail

    for t in threads:
        t.join(60)
    assert [r.status_code for r in answers] == [200] * (QUEUE + 1)
    assert gate.admitted == 0
    for r in (client.post("/speakers/Ann/evaluate"),
              client.post("/v1/chat/completions", json={"model": "Ann", "stream": True,
                                                        "messages": [{"role": "user", "content": "hi"}]})):
        assert r.status_code == 200, r.text  # the slots are free again, streams included
    assert gate.admitted == 0


def test_a_stream_whose_client_left_before_the_first_chunk_gives_its_slot_back(slow_client):
    """The client is gone when the answer starts: sending its first message fails, so the stream's body
    is never read and its own `finally` never runs; the slot must come back anyway."""
    import anyio

    gate = slow_client.app.state.generation
    body = b'{"model": "Ann", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80), "state": {}}
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message["type"])
        raise OSError("the client went away")

    async def call():
        try:
            await slow_client.app(scope, receive, send)
        except Exception:  # noqa: BLE001 - the server's side of a gone client is not what this test is about
            pass

    anyio.run(call)
    assert sent == ["http.response.start"]
    assert gate.admitted == 0, "the stream kept its generation slot"
    r = slow_client.post("/generate", json={"speaker": "Ann", "prompt": "hi"})
    assert r.status_code == 200, r.text
