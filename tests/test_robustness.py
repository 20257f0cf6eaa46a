"""Robustness: malformed text, damaged files, bad headers, errors that keep the connection healthy,
and data that must not outlive a delete or reach the log."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import httpx
import pytest
from conftest import read_sse, upload, wait_until

from config import get_settings

CUT_EMOJI = rb"x\ud83d"  # the first half of 😀, as JavaScript sends a string cut in the middle of an emoji
SURROGATE_BODIES = [
    ("/upload-text", rb'{"dialog":[{"speaker":"A","content":"' + CUT_EMOJI + rb'"}],"speaker":"A"}',
     ["body", "dialog", 0, "content"]),
    ("/generate", rb'{"speaker":"A","prompt":"' + CUT_EMOJI + rb'"}', ["body", "prompt"]),
    ("/v1/chat/completions", rb'{"model":"A","messages":[{"role":"user","content":"' + CUT_EMOJI + rb'"}]}',
     ["body", "messages", 0, "content"]),
    ("/train", rb'{"speaker":"A\ud83d"}', ["body", "speaker"]),
]


@pytest.mark.parametrize("path,body,loc", SURROGATE_BODIES, ids=[p for p, _, _ in SURROGATE_BODIES])
def test_a_lone_surrogate_is_a_422_naming_its_field_and_stores_nothing(client, env, path, body, loc):
    r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    msg = ("contains an invalid character: an unpaired UTF-16 surrogate (U+D83D at index 1), such as half "
           "of an emoji cut in two; send whole characters")
    if path.startswith("/v1/"):  # OpenAI's invalid request: 400 with its error object, the field as `param`
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"].startswith(".".join(str(p) for p in loc[1:])) and msg in error["message"], error
    else:
        assert r.status_code == 422, r.text
        assert r.json() == {"detail": [{"type": "string_unicode", "loc": loc, "msg": msg}]}
    assert list(Path(env["DATA_DIR"]).glob("*messages*")) == []
    assert client.get("/jobs").json()["count"] == 0


PLANTED = "planted-Zq7w-5ecret"  # a unique string that must appear in no log line (ASCII: the same when URL-encoded)


def test_the_server_log_never_holds_message_text(live_server, env):
    good = [{"speaker": "Other", "content": f"{PLANTED} питання"}, {"speaker": "A", "content": f"{PLANTED} відповідь"}]
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        answers = [
            http.post("/upload-text", json={"dialog": good, "speaker": "A"}).status_code,
            http.post("/upload-text", json={"dialog": [{"speaker": "A", "content": 5}, {"speaker": PLANTED, "content": PLANTED}],
                                            "speaker": "A"}).status_code,
            http.post("/upload-text", json={"dialog": good, "speaker": "A", PLANTED: PLANTED}).status_code,
            http.post("/upload-text", content=f'{{"dialog":[{{"speaker":"A","content":"{PLANTED}\\ud83d"}}],"speaker":"A"}}'
                      .encode(), headers={"Content-Type": "application/json"}).status_code,
            http.post("/upload-text", content=f'{{"dialog": "{PLANTED}'.encode(), headers={"Content-Type": "application/json"}).status_code,
            http.post("/generate", json={"speaker": "A", "prompt": PLANTED, "temperature": PLANTED}).status_code,
            http.post("/generate", json={"speaker": "A", "prompt": PLANTED}).status_code,
            http.post("/v1/chat/completions", json={"model": "A", "messages": [{"role": "user", "content": PLANTED}]}).status_code,
            http.get("/speakers/A/messages", params={"limit": PLANTED}).status_code,
            http.get("/jobs", params={"speaker": "A", "note": PLANTED}).status_code,
        ]
    assert answers == [200, 422, 200, 422, 422, 422, 404, 404, 422, 422]
    log = live_server.log_path.read_text(encoding="utf-8", errors="replace")
    assert "path=/upload-text status=422" in log  # the log was written, with the access lines
    assert PLANTED not in log


@pytest.fixture
def in_process_server(env):
    """The app under a real uvicorn in a thread of the test, so a test can monkeypatch it; uvicorn's
    own loggers left to propagate (log_config=None), so caplog sees what it would write."""
    import uvicorn

    from jobs.runner import free_port
    from main import app

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 60, "uvicorn to start")
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(30)


def test_an_unexpected_error_closes_the_connection_and_logs_no_message_text(in_process_server, monkeypatch, caplog):
    import parser as dialog_parser

    def broken(dialog, speaker, max_context_turns):
        raise ValueError(f"cannot handle {dialog[0].content!r}")  # a bug whose message quotes the request

    monkeypatch.setattr(dialog_parser, "build_samples", broken)
    with caplog.at_level(logging.INFO), httpx.Client(
        base_url=in_process_server, timeout=30) as http:
        r = http.post("/upload-text", json={"dialog": [{"speaker": "A", "content": PLANTED}], "speaker": "A"})
        assert r.status_code == 500
        assert r.json() == {"detail": "internal error (ValueError); see the server log"}
        assert r.headers["connection"] == "close"
        assert http.get("/health").status_code == 200  # the pooled client opened a new connection, no reset
    assert "ValueError" in caplog.text and "build_samples" in caplog.text  # the traceback: where, of what type
    assert "method=POST path=/upload-text status=500" in caplog.text
    assert PLANTED not in caplog.text


def test_a_bad_last_event_id_is_ignored_and_the_stream_works(client):
    upload(client)
    job = client.post("/train", json={"speaker": "User1", "wait": True, "max_steps": 1}).json()["job"]
    everything = client.get(f"/jobs/{job['job_id']}/events", params={"stream": False}).json()["data"]
    for bad in [b"\xb2", b"9" * 5000, str(2**63).encode(), str(2**64 + 5).encode(), b"-1", b"1e3", b"\xd9\xa3"]:
        with client.stream("GET", f"/jobs/{job['job_id']}/events", headers={"Last-Event-ID": bad}) as r:
            assert r.status_code == 200, (bad, r.read())
            assert [int(e["id"]) for e in read_sse(r)] == [e["id"] for e in everything], bad
    with client.stream("GET", f"/jobs/{job['job_id']}/events", headers={"Last-Event-ID": str(everything[0]["id"])}) as r:
        assert [int(e["id"]) for e in read_sse(r)] == [e["id"] for e in everything[1:]]


def test_a_damaged_messages_file_affects_only_its_speaker(client, env):
    upload(client, "A")
    upload(client, "Bad")
    assert client.post("/train", json={"speaker": "A", "wait": True, "max_steps": 1}).status_code == 200
    damaged = Path(env["DATA_DIR"]) / "Bad_messages.json"
    damaged.write_bytes(damaged.read_bytes()[:100])  # cut short, as by a full disk or a copy that stopped
    r = client.get("/speakers")
    assert r.status_code == 200, r.text
    listed = {s["speaker"]: s for s in r.json()["data"]}
    assert listed["A"]["messages"] == 2 and listed["A"]["adapter"] is True and listed["A"]["error"] is None
    error = listed["Bad"].pop("error")
    assert listed["Bad"] == {"speaker": "Bad", "messages": 0, "last_upload": None, "adapter": False, "trained_at": None,
                             "memory": None}
    assert error.startswith("Bad_messages.json is not a valid messages file (1 problems, first: Invalid JSON: EOF")
    assert error.endswith("; nothing was changed. Repair or move it, then retry.")
    assert client.post("/speakers/A/evaluate").status_code == 200
    r = client.get("/speakers/Bad/messages")
    assert r.status_code == 500 and env["DATA_DIR"] not in r.json()["detail"]
    assert r.json()["detail"].startswith("Bad_messages.json is not a valid messages file")


def test_delete_during_evaluate_is_a_409_and_a_succeeded_job_shows_no_checkpoint(client, env, monkeypatch):
    import store
    from lm import adapters

    monkeypatch.setenv("CHECKPOINT_STEPS", "1")
    get_settings.cache_clear()
    upload(client)
    r = client.post("/train", json={"speaker": "User1", "wait": True, "max_steps": 2, "batch_tokens": 1})
    assert r.status_code == 200, r.text
    job = r.json()["job"]
    assert job["checkpoint"] is None and not (Path(env["OUTPUT_DIR"]) / ".checkpoints" / job["job_id"]).exists()
    load = store.load_speaker

    def deleted_meanwhile(data_dir, speaker, *args):  # DELETE /speakers/User1 lands after evaluate checked the adapter
        adapters.delete(Path(env["OUTPUT_DIR"]), speaker)
        return load(data_dir, speaker, *args)

    monkeypatch.setattr(store, "load_speaker", deleted_meanwhile)
    r = client.post("/speakers/User1/evaluate")
    assert r.status_code == 409, r.text
    assert r.json() == {"detail": "the adapter of speaker 'User1' was deleted or replaced during the evaluation; "
                                  "evaluate again (train first if it was deleted)"}


def test_a_wrong_method_lists_every_method_of_the_path(client):
    """One path, two routes (GET downloads an export, POST makes it): a 405's Allow names both, as
    Schemathesis' stateful run found Starlette's did not (it named the first route's only)."""
    r = client.request("OPTIONS", "/speakers/User1/exports/merged")
    assert (r.status_code, r.headers["allow"]) == (405, "GET, POST, HEAD")
    r = client.put("/jobs/abc")
    assert (r.status_code, r.headers["allow"]) == (405, "GET, HEAD")


def test_generating_for_a_speaker_without_an_adapter_is_404_while_the_base_warms(client, monkeypatch):
    """No adapter is the user's to fix, whatever the base model is doing: 404, never a 503 to retry."""
    monkeypatch.setattr(client.app.state.warmup, "state", "provisioning")
    assert client.post("/generate", json={"speaker": "Nobody", "prompt": "hi"}).status_code == 404
    assert client.post("/speakers/Nobody/evaluate").status_code == 404
    r = client.post("/v1/chat/completions", json={"model": "Nobody", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
