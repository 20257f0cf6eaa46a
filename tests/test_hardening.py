"""Access control, queue limits, logging, concurrency and crash safety."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import SAMPLE_DIALOG, LiveServer, upload, wait_for_job
from config import get_settings


def test_api_key_guards_every_endpoint_but_health(client, env, monkeypatch):
    monkeypatch.setenv("API_KEY", "s3cret-key")
    get_settings.cache_clear()
    body = {"dialog": SAMPLE_DIALOG, "speaker": "User1"}
    calls = [
        ("post", "/upload-text", {"json": body}),
        ("post", "/train", {"json": {"speaker": "User1"}}),
        ("get", "/jobs", {}),
        ("get", "/jobs/x", {}),
        ("get", "/jobs/x/events", {}),
        ("post", "/jobs/x/cancel", {}),
        ("post", "/jobs/x/resume", {}),
    ]
    for method, path, kwargs in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0LWtleQ=="},
                        {"Authorization": "Bearer s3cret-key-and-more"}):
            r = getattr(client, method)(path, headers=headers, **kwargs)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json() == {"detail": "missing or wrong API key: send 'Authorization: Bearer <API_KEY>'"}
            assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/health").status_code == 200
    assert list(Path(env["DATA_DIR"]).glob("*_messages.json")) == []  # no refused upload was stored
    good = {"Authorization": "Bearer s3cret-key"}
    r = client.post("/upload-text", json=body, headers=good)
    assert r.status_code == 200 and (r.json()["added"], r.json()["total"]) == (2, 2)  # nothing stored before it
    assert client.get("/jobs/x", headers=good).status_code == 404
    assert sorted(p.name for p in Path(env["DATA_DIR"]).glob("*_messages.json")) == ["User1_messages.json"]
    assert client.get("/jobs", headers=good).json()["count"] == 0  # no refused /train made a job
    schema = client.get("/openapi.json").json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert schema["paths"]["/upload-text"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/health"]["get"]


OPEN = {"/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc",
        "/", "/static"}  # the page and its files: no data (what it shows, it asks the API for, with the key)


def test_api_key_guards_every_route_the_app_has(client, monkeypatch):
    """Every route, found from the app itself (a route added later is covered without editing this test)."""
    import re

    from fastapi.routing import APIRoute

    from main import app

    monkeypatch.setenv("API_KEY", "s3cret-key")
    get_settings.cache_clear()
    def flat(routes, prefix=""):  # included routers hold their routes (FastAPI >= 0.120 includes them lazily)
        for route in routes:
            if hasattr(route, "original_router"):
                yield from flat(route.original_router.routes, prefix + route.include_context.prefix)
            else:
                yield prefix + route.path, route

    routes = list(flat(app.routes))
    guarded = []
    for full_path, route in routes:
        if full_path in OPEN:
            continue
        assert isinstance(route, APIRoute), f"{full_path} is not an APIRoute: it bypasses the API key dependency"
        path = re.sub(r"\{[^}]+\}", "User1", full_path)  # dummy path parameters
        for method in sorted(route.methods):
            r = client.request(method, path)
            assert r.status_code == 401, (method, full_path, r.status_code, r.text)
            message = "missing or wrong API key: send 'Authorization: Bearer <API_KEY>'"
            if full_path.startswith("/v1/"):  # OpenAI's error object, as its clients expect
                assert r.json() == {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                              "code": "invalid_api_key"}}
            else:
                assert r.json() == {"detail": message}
            guarded.append(f"{method} {full_path}")
    assert {"GET /v1/models", "POST /v1/chat/completions", "DELETE /speakers/{speaker}"} <= set(guarded), guarded
    assert OPEN <= {p for p, _ in routes}  # the exemptions name routes that exist


def test_queue_limit_answers_429(client, env, monkeypatch):
    monkeypatch.setenv("MAX_QUEUED_JOBS", "1")
    get_settings.cache_clear()
    for s in ("A", "B", "C"):
        dialog = [{"speaker": "X", "content": "hi"}, {"speaker": s, "content": "hello"}]
        assert client.post("/upload-text", json={"dialog": dialog, "speaker": s}).status_code == 200
    running = client.post("/train", json={"speaker": "A", "max_steps": 10**6}).json()
    wait_for_job(client, running["job_id"], lambda j: j["status"] == "running", timeout=120, what="running")
    assert client.post("/train", json={"speaker": "B"}).status_code == 202  # the one queued place
    r = client.post("/train", json={"speaker": "C"})
    assert r.status_code == 429
    assert r.json() == {"detail": "1 jobs are already queued (MAX_QUEUED_JOBS=1); retry when some have finished"}
    assert client.get("/jobs", params={"speaker": "C"}).json()["count"] == 0


def test_one_log_line_per_request_and_no_message_content(client, caplog):
    secret = "таємниця-7f3a"
    with caplog.at_level(logging.INFO):
        client.post("/upload-text", json={"dialog": [{"speaker": "User1", "content": secret}], "speaker": "User1"})
        client.get("/jobs/nope")
    access = [r.getMessage() for r in caplog.records if r.name == "persona_lora.access"]
    assert len(access) == 2
    assert access[0].startswith("method=POST path=/upload-text status=200 duration_ms=")
    assert access[1].startswith("method=GET path=/jobs/nope status=404 duration_ms=")
    assert all(secret not in r.getMessage() for r in caplog.records)


def test_unexpected_errors_answer_json_500(client, monkeypatch):
    import parser as dialog_parser

    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(dialog_parser, "build_samples", broken)
    from fastapi.testclient import TestClient

    from main import app

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/upload-text", json={"dialog": SAMPLE_DIALOG, "speaker": "User1"})
    assert r.status_code == 500 and r.json() == {"detail": "internal error (RuntimeError); see the server log"}


LOCKER = """import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


def hold_lock(db_path: str, seconds: float) -> subprocess.Popen:
    """Another process holding the job database with BEGIN EXCLUSIVE for `seconds`, already locked."""
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, db_path, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    return locker


def timed(method, url: str, **kwargs) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = method(url, timeout=120, **kwargs)
    return r, time.monotonic() - started


@pytest.mark.slow
def test_a_locked_job_database_stalls_no_other_request(live_server, env):
    """Issue 29, defect 5: with another process holding the registry, /train waits for it (off the
    event loop) and /health still answers at once."""
    lock_s = 6.0
    upload(httpx.Client(base_url=live_server.url), "User1")
    locker = hold_lock(str(Path(env["DATA_DIR"]) / "jobs.sqlite3"), lock_s)
    locked_at = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        train = pool.submit(timed, httpx.post, f"{live_server.url}/train", json={"speaker": "User1", "max_steps": 1})
        time.sleep(0.5)  # /train is waiting for the lock
        health, health_s = timed(httpx.get, f"{live_server.url}/health")
        (trained, train_s), waited = train.result(), time.monotonic() - locked_at
    locker.wait(10)
    assert health.status_code == 200, health.text
    assert health_s < 0.1 * lock_s, f"/health took {health_s:.2f} s while the registry was locked for {lock_s} s"
    assert trained.status_code == 202, trained.text
    assert waited >= lock_s - 0.5, "/train answered before the lock was released: it did not meet the lock"
    print(f"registry locked {lock_s} s: /health {health_s * 1000:.0f} ms, /train {train_s:.2f} s (202 once released)")
    wait_for_job(httpx.Client(base_url=live_server.url), trained.json()["job_id"], lambda j: j["status"] in
                 ("succeeded", "failed", "cancelled"), what="the job to finish")


def _uploads(n: int, speakers: list[str]):
    for i in range(n):
        speaker = speakers[i % len(speakers)]
        yield speaker, [{"speaker": "Other", "content": f"питання {i}"}, {"speaker": speaker, "content": f"відповідь {i}"}]


@pytest.mark.slow
def test_fifty_clients_upload_while_training_and_polling(live_server, env):
    speakers = ["Ann", "Bob", "Олена", "José"]
    http = httpx.Client(base_url=live_server.url, timeout=120)
    assert http.post("/upload-text", json={"dialog": SAMPLE_DIALOG, "speaker": "User1"}).status_code == 200
    job = http.post("/train", json={"speaker": "User1", "epochs": 30}).json()

    async def main():
        async with httpx.AsyncClient(base_url=live_server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=60)) as client:
            stop = asyncio.Event()

            async def poll():
                codes = []
                while not stop.is_set():
                    codes.append((await client.get(job["url"])).status_code)
                    codes.append((await client.get("/jobs")).status_code)
                    await asyncio.sleep(0.05)
                return codes

            async def clients(k):
                out = []
                for speaker, dialog in list(_uploads(200, speakers))[k::50]:
                    r = await client.post("/upload-text", json={"dialog": dialog, "speaker": speaker})
                    out.append(r.status_code)
                return out

            poller = asyncio.create_task(poll())
            results = await asyncio.gather(*(clients(k) for k in range(50)))
            stop.set()
            return results, await poller

    results, polled = asyncio.run(main())
    assert [code for r in results for code in r] == [200] * 200
    assert polled and set(polled) == {200}
    assert http.get(job["url"]).json()["status"] in ("running", "succeeded")
    for k, speaker in enumerate(speakers):
        data = json.loads((Path(env["DATA_DIR"]) / f"{speaker}_messages.json").read_text(encoding="utf-8"))
        replies = [m["reply"] for m in data["messages"]]
        assert sorted(replies) == sorted(f"відповідь {i}" for i in range(k, 200, len(speakers)))  # none lost, none twice


@pytest.mark.slow
def test_sigkill_during_upload_burst_loses_no_acknowledged_upload(env, tmp_path):
    speakers = ["Ann", "Bob", "Олена"]
    acknowledged: list[tuple[str, str]] = []
    cycles, burst_size, kill_after = 20, 60, 10  # small bursts: 20 cycles in about two minutes on 2 cores
    for cycle in range(cycles):
        server = LiveServer(env, tmp_path / f"server{cycle}.log")

        async def burst():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                async def one(speaker, dialog):
                    try:
                        r = await client.post("/upload-text", json={"dialog": dialog, "speaker": speaker})
                    except httpx.HTTPError:
                        return
                    if r.status_code == 200:
                        acknowledged.append((speaker, dialog[-1]["content"]))

                batch = [(s, [{**d[0], "content": f"{cycle}-{d[0]['content']}"}, {**d[1], "content": f"{cycle}-{d[1]['content']}"}])
                         for s, d in _uploads(burst_size, speakers)]
                tasks = [asyncio.create_task(one(s, d)) for s, d in batch]
                deadline = time.monotonic() + 60
                while (done := sum(a[1].startswith(f"{cycle}-") for a in acknowledged)) < kill_after:  # kill mid-burst
                    if time.monotonic() > deadline or all(t.done() for t in tasks):
                        pytest.fail(f"cycle {cycle}: only {done} of {burst_size} uploads acknowledged "
                                    f"({sum(t.done() for t in tasks)} answered) before the kill")
                    await asyncio.sleep(0.005)
                server.proc.send_signal(signal.SIGKILL)
                await asyncio.gather(*tasks)

        asyncio.run(burst())
        server.proc.wait(10)
        server.stop()
        assert 0 < len([a for a in acknowledged if a[1].startswith(f"{cycle}-")]) < burst_size, "kill did not land mid-burst"
    LiveServer(env, tmp_path / "server-last.log").stop()  # its start-up removes temporaries the kills left
    assert list(Path(env["DATA_DIR"]).glob(".*.tmp")) == []
    stored = set()
    for speaker in speakers:
        path = Path(env["DATA_DIR"]) / f"{speaker}_messages.json"
        data = json.loads(path.read_text(encoding="utf-8"))  # valid JSON after every kill
        replies = [m["reply"] for m in data["messages"]]
        assert len(replies) == len(set(replies))
        stored |= {(speaker, r) for r in replies}
    assert set(acknowledged) <= stored
    print(f"{cycles} kill cycles, {len(acknowledged)} acknowledged uploads, all stored; {len(stored)} stored in all")
