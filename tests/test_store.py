"""The per-speaker files: appends in place that equal a rewrite, dedupe, torn tails, the index sidecar,
and the lock's bound (503 with Retry-After) on a real server."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from filelock import FileLock

import store
from conftest import LiveServer
from errors import StorageError
from models import Sample, SpeakerFile, Turn
from parser import sample_id

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def samples(start: int, n: int, speaker: str = "Олена") -> list[Sample]:
    """n samples with context holding quotes, newlines and emoji, as JSON must escape them."""
    out = []
    for i in range(start, start + n):
        context = [Turn(speaker="Друг", content=f'питання {i}\n"в лапках" 😊')] if i % 3 else []
        out.append(Sample(id=sample_id(context, f"відповідь {i}"), context=context, reply=f"відповідь {i}",
                          added_at=T0 + timedelta(minutes=i)))
    return out


def rewritten(speaker: str, stored: list[Sample]) -> bytes:
    """What the seed's rewrite of the whole file writes."""
    return SpeakerFile(speaker=speaker, messages=stored).model_dump_json(indent=1).encode("utf-8")


def touch(path: Path) -> None:
    """Another process's change, as this process sees it: the file's mtime moves."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_appends_in_place_equal_a_rewrite_and_deduplicate(tmp_path):
    data = tmp_path / "data"
    first = store.append_samples(data, "Олена", samples(0, 3))
    before = first.path.read_bytes()
    second = store.append_samples(data, "Олена", samples(2, 4))  # 2..5: sample 2 is stored already
    third = store.append_samples(data, "Олена", samples(0, 6))  # all stored
    assert [(r.added, r.duplicates, r.total) for r in (first, second, third)] == [(3, 0, 3), (3, 1, 6), (0, 6, 6)]
    raw = first.path.read_bytes()
    assert raw == rewritten("Олена", samples(0, 6))  # byte for byte the seed's layout
    assert raw.startswith(before[: -len(store.TAIL)])  # the stored bytes stayed where they were
    assert [m["reply"] for m in json.loads(raw)["messages"]] == [f"відповідь {i}" for i in range(6)]
    assert first.path.name == "Олена_messages.json"
    assert store.read_messages(data, "Олена", 4, 10) == (samples(4, 2), 6)
    assert store.read_messages(data, "Олена", 0, 1) == (samples(0, 1), 6)
    assert store.read_messages(data, "Олена", 6, 5) == ([], 6)
    assert store.load_speaker(data, "Олена") == SpeakerFile(speaker="Олена", messages=samples(0, 6))
    assert store.list_speakers(data) == [store.SpeakerSummary("Олена", 6, T0 + timedelta(minutes=5))]


@pytest.mark.parametrize("cut", [1, 3, 5, 40, -20])  # bytes of the last append that reached the disk (-20: all but 20)
def test_a_torn_append_is_cut_after_its_last_whole_message(tmp_path, cut):
    data = tmp_path / "data"
    path = store.append_samples(data, "Олена", samples(0, 4)).path
    whole = path.read_bytes()
    store.append_samples(data, "Олена", samples(4, 2))
    full = path.read_bytes()
    torn = full[: len(whole) - len(store.TAIL) + cut] if cut > 0 else full[:cut]  # cut=5: the same size as before
    path.write_bytes(torn)  # a kill mid-append: the old end overwritten, the new one not all there
    with pytest.raises(json.JSONDecodeError):
        json.loads(torn)
    expected = samples(0, 4) if cut > 0 else samples(0, 5)  # -20 leaves sample 4 whole, 5 torn
    assert store.read_messages(data, "Олена", 0, 1) == (samples(0, 1), len(expected))
    assert path.read_bytes() == rewritten("Олена", expected)  # repaired on disk, valid JSON again
    result = store.append_samples(data, "Олена", samples(0, 7))
    assert (result.added, result.total) == (7 - len(expected), 7)
    assert path.read_bytes() == rewritten("Олена", samples(0, 7))


def test_a_file_damaged_before_its_last_message_is_left_alone(tmp_path):
    data = tmp_path / "data"
    path = store.append_samples(data, "Олена", samples(0, 4)).path
    damaged = path.read_bytes()[:120]  # no whole message left to keep
    path.write_bytes(damaged)
    with pytest.raises(StorageError, match="Олена_messages.json is not a valid messages file"):
        store.append_samples(data, "Олена", samples(4, 1))
    assert path.read_bytes() == damaged


def test_a_missing_or_stale_index_is_rebuilt_from_the_file(tmp_path):
    data = tmp_path / "data"
    path = store.append_samples(data, "Олена", samples(0, 3)).path
    index = store.index_file(path)
    old = index.read_bytes()
    store.append_samples(data, "Олена", samples(3, 2))
    index.write_bytes(old)  # stale: it describes the file before the last append
    touch(path)
    assert store.append_samples(data, "Олена", samples(4, 2)).added == 1  # sample 4 is known though the index forgot it
    assert store.list_speakers(data) == [store.SpeakerSummary("Олена", 6, T0 + timedelta(minutes=5))]
    rebuilt = index.read_bytes()
    index.unlink()
    touch(path)
    assert store.read_messages(data, "Олена", 5, 1) == (samples(5, 1), 6)
    lines = index.read_text().splitlines()
    assert [x for x in lines if x[0] != "b"] == [x for x in rebuilt.decode().splitlines() if x[0] != "b"]  # ids, offsets
    assert lines[-1] == rebuilt.decode().splitlines()[-1]  # size, count, last upload
    index.write_bytes(rebuilt[:-7])  # torn
    touch(path)
    assert store.summary(data, "Олена") == store.SpeakerSummary("Олена", 6, T0 + timedelta(minutes=5))
    assert path.read_bytes() == rewritten("Олена", samples(0, 6))


def test_files_of_other_layouts_are_read_and_rewritten_once_in_this_one(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = data / "Ann_messages.json"
    seed = SpeakerFile(speaker="Ann", messages=samples(0, 2)).model_dump(mode="json")
    path.write_text(json.dumps(seed, ensure_ascii=False, indent=2), encoding="utf-8")
    assert store.summary(data, "Ann") == store.SpeakerSummary("Ann", 2, T0 + timedelta(minutes=1))
    assert path.read_bytes() == rewritten("Ann", samples(0, 2))
    (data / "Bob_messages.json").write_text(json.dumps({"speaker": "Bob", "messages": []}))
    assert store.append_samples(data, "Bob", samples(0, 1)).total == 1
    assert (data / "Bob_messages.json").read_bytes() == rewritten("Bob", samples(0, 1))


def test_delete_removes_the_file_its_index_and_lock(tmp_path):
    data = tmp_path / "data"
    path = store.append_samples(data, "Олена", samples(0, 2)).path
    assert store.delete_speaker(data, "Олена") == [path, store.index_file(path)]
    assert list(data.iterdir()) == []
    assert store.delete_speaker(data, "Олена") == [] and store.summary(data, "Олена") is None
    assert store.append_samples(data, "Олена", samples(0, 2)).added == 2  # nothing cached survives the delete


@pytest.mark.slow  # a real uvicorn server
def test_a_held_lock_answers_503_with_retry_after_and_no_change(env, tmp_path):
    server = LiveServer({**env, "STORAGE_LOCK_SECONDS": "0.5"}, tmp_path / "server.log")
    try:
        http = httpx.Client(base_url=server.url, timeout=30)
        dialog = [{"speaker": "B", "content": "ping"}, {"speaker": "User1", "content": "pong"}]
        assert http.post("/upload-text", json={"dialog": dialog, "speaker": "User1"}).status_code == 200
        path = Path(env["DATA_DIR"]) / "User1_messages.json"
        before = path.read_bytes()
        with FileLock(str(path.with_name(".User1_messages.json.lock"))):  # another writer holds the speaker
            later = [{"speaker": "B", "content": "ping 2"}, {"speaker": "User1", "content": "pong 2"}]
            answers = [http.post("/upload-text", json={"dialog": later, "speaker": "User1"}), http.get("/speakers"),
                       http.get("/speakers/User1/messages", params={"limit": 1})]
            for r in answers:
                assert (r.status_code, r.headers.get("retry-after")) == (503, "1"), r.text
                assert r.json() == {"detail": "the messages of 'User1' are being written by other requests "
                                              "(waited 0.5 s); retry in a second"}
        assert path.read_bytes() == before
        r = http.post("/upload-text", json={"dialog": later, "speaker": "User1"})
        assert (r.status_code, r.json()["total"]) == (200, 2)
        assert "Traceback" not in server.log_path.read_text()
    finally:
        server.stop()


@pytest.mark.slow  # a real uvicorn server
def test_concurrent_uploads_to_one_speaker_wait_their_turn(live_server, env):
    async def burst():
        async with httpx.AsyncClient(base_url=live_server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/upload-text", json={"speaker": "User1", "dialog": [
                {"speaker": "B", "content": f"питання {k}"}, {"speaker": "User1", "content": f"відповідь {k}"}]})
                for k in range(15)))

    answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * 15, [r.text for r in answers if r.status_code != 200]
    assert sorted(r.json()["total"] for r in answers) == list(range(1, 16))  # each saw the ones before it
    stored = json.loads((Path(env["DATA_DIR"]) / "User1_messages.json").read_text(encoding="utf-8"))
    assert sorted(m["reply"] for m in stored["messages"]) == sorted(f"відповідь {k}" for k in range(15))


def test_another_process_s_appends_are_seen(tmp_path):
    """A second server process (another uvicorn worker, train.py's CLI) appends between this one's appends."""
    import subprocess
    import sys

    from conftest import ROOT

    data = tmp_path / "data"
    assert store.append_samples(data, "Олена", samples(0, 3)).added == 3
    child = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
             "import store, test_store\n"
             f"print(store.append_samples(__import__('pathlib').Path({str(data)!r}), 'Олена', test_store.samples(2, 3)).added)")
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "2", run.stderr
    result = store.append_samples(data, "Олена", samples(0, 6))
    assert (result.added, result.total) == (1, 6)
    assert (data / "Олена_messages.json").read_bytes() == rewritten("Олена", samples(0, 6))


@pytest.mark.parametrize("count,stored_as", [(55, "𝓐" * 55), (56, None), (57, None)])
def test_a_name_whose_files_would_pass_255_bytes_is_stored_under_its_encoded_name(client, env, count, stored_as):
    """"𝓐" is 4 bytes in UTF-8: 55 of them (220 bytes) make the longest file the store writes, the index's
    temporary `.<name>_messages.json.index.<8 random>.tmp`, exactly 255 bytes; 56 would be 259."""
    from config import storage_name

    name = "𝓐" * count
    dialog = [{"speaker": "B", "content": "ping"}, {"speaker": name, "content": "pong"}]
    r = client.post("/upload-text", json={"dialog": dialog, "speaker": name})
    assert r.status_code == 200, r.text
    assert r.json()["total"] == 1
    assert (storage_name(name) == stored_as) if stored_as else storage_name(name).startswith("~")
    r = client.get(f"/speakers/{name}/messages")
    assert (r.status_code, [m["reply"] for m in r.json()["data"]]) == (200, ["pong"]), r.text
    assert [(s["speaker"], s["messages"]) for s in client.get("/speakers").json()["data"]] == [(name, 1)]
    r = client.delete(f"/speakers/{name}")
    assert r.status_code == 200, r.text
    assert list(Path(env["DATA_DIR"]).glob("*_messages.json*")) == []


def test_no_lock_file_outlives_the_speaker_s_messages(tmp_path):
    """Reads of a speaker with no file write nothing; a write that stores nothing, a delete, and a read
    that waited while another process deleted the speaker leave no lock naming them."""
    import threading

    data = tmp_path / "data"
    data.mkdir()
    assert store.summary(data, "Ghost") is None and store.read_messages(data, "Ghost", 0, 5) is None
    assert store.load_speaker(data, "Ghost") is None and store.delete_speaker(data, "Ghost") == []
    assert store.append_samples(data, "Ghost", []).total == 0
    assert list(data.iterdir()) == []
    path = store.append_samples(data, "Zoë Åsa", samples(0, 2)).path
    lock = path.with_name(f".{path.name}.lock")
    assert lock.exists()
    found = []
    with FileLock(str(lock)):  # another process's delete holds the speaker while this one's read waits
        reader = threading.Thread(target=lambda: found.append(store.read_messages(data, "Zoë Åsa", 0, 5)))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive()
        path.unlink()
        store.index_file(path).unlink()
    reader.join(10)
    assert found == [None] and list(data.iterdir()) == []
    store.append_samples(data, "Zoë Åsa", samples(0, 1))
    assert store.delete_speaker(data, "Zoë Åsa") == [path, store.index_file(path)]
    assert list(data.iterdir()) == []
