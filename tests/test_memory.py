"""Memory: each speaker's messages in an FTS5 index kept in step with uploads and deletes, recall
into prompts (training and generation), and what a user sees of it (/memory, /generate, /v1, /dataset)."""

from __future__ import annotations

import logging
import sqlite3

import httpx
import pytest

import memory
import train
from memory import Memory, near_duplicate
from models import Sample, Turn

FACTS = [
    {"speaker": "Q", "content": "how is your family?"},
    {"speaker": "Ann", "content": "my sister moved to Lviv last spring"},
    {"speaker": "Q", "content": "any pets?"},
    {"speaker": "Ann", "content": "our dog Biscuit eats my socks"},
    {"speaker": "Q", "content": "and work?"},
    {"speaker": "Ann", "content": "I fix trams at the depot, night shifts mostly"},
    {"speaker": "Q", "content": "what did you cook?"},
    {"speaker": "Ann", "content": "borscht again, the only dish I really cook well"},
    {"speaker": "Q", "content": "see you"},
    {"speaker": "Ann", "content": "bye!"},
]


def sample(i: int, reply: str, context: list[tuple[str, str]] = ()) -> Sample:
    return Sample(id=f"s{i}", context=[Turn(speaker=s, content=c) for s, c in context], reply=reply,
                  added_at="2024-01-01T00:00:00Z")


def test_recall_ranks_the_relevant_message_first_and_ignores_common_words():
    with Memory(":memory:") as m:
        m.add([(f"x{i}", f"the weather is so nice today {i}", None) for i in range(40)])
        m.add([("sis", "my sister moved to Lviv last spring", None), ("dog", "our dog Biscuit eats my socks", None)])
        assert m.count() == 42
        found = m.recall(["where does your sister live now?"], 2)
        assert [r.sample_id for r in found][:1] == ["sis"] and found[0].text == "my sister moved to Lviv last spring"
        assert "the" not in m.query_terms(["the sister"]) and "sister" in m.query_terms(["the sister"])  # in 40 of 42
        assert m.recall(["the is so"], 3) == []  # only common words: nothing is relevant
        assert m.add([("sis", "again", None)]) == 0  # an id already indexed is skipped


def test_recall_excludes_ids_near_duplicates_and_diacritics_fold():
    with Memory(":memory:") as m:
        m.add([("a", "Zoë moved to Kraków", None), ("b", "zoe moved to krakow!", None), ("c", "Zoë loves Kraków in spring", None)])
        found = m.recall(["Krakow"], 3, exclude_ids={"a"}, exclude_texts=["Zoe moved to Krakow"])
        assert [r.sample_id for r in found] == ["c"]  # a by id, b as a near duplicate of the excluded text
    assert near_duplicate("I fix trams at night", "i FIX trams at night!!") and not near_duplicate("I fix trams", "I ride trams")


def test_training_memory_never_leaks_a_samples_own_reply():
    pool = [sample(0, "my sister moved to Lviv", [("Q", "family?")]),
            sample(1, "My sister moved to Lviv!", [("Q", "where is your sister?")]),  # a near duplicate of 0
            sample(2, "she likes Lviv a lot, my sister", [("Q", "sister?")]),
            sample(3, "I fix trams", [("Q", "do trams at the depot need fixing?")]),
            sample(4, "still at the depot, trams all day", [("Ann", "I fix trams")])]  # Ann twice in a row: 3's reply answered
    out = memory.with_memory(pool, pool, "Ann", k=3)
    for before, after in zip(pool, out):
        recalled = after.context[: len(after.context) - len(before.context)]
        assert after.context[len(recalled):] == before.context and after.reply == before.reply
        assert not any(near_duplicate(t.content, before.reply) for t in recalled), (before.reply, recalled)
    # each recalled line after the turn it answered, as the chat had it; never 0, which says what 1 replies
    assert [(t.speaker, t.content) for t in out[1].context[:-1]] == [("Q", "sister?"), ("Ann", "she likes Lviv a lot, my sister")]
    # 3 recalls 4 without the turn 4 answered: that turn is 3's own reply
    assert [(t.speaker, t.content) for t in out[3].context[:-1]] == [("Ann", "still at the depot, trams all day")]
    assert memory.with_memory(pool, pool, "Ann", k=0) == pool


def test_held_out_samples_recall_from_the_training_split_only():
    topics = ["trams", "borscht", "Lviv", "Biscuit", "socks", "Skoda"]
    samples = [sample(i, f"{topics[i % 6]} again, story number {i} of mine", [("Q", f"and {topics[i % 6]}?")]) for i in range(36)]
    pool, held = train.holdout_split(samples, 0.3, 10)
    replies = {s.reply for s in held}
    recalled = [s.context[:-1] for s in memory.with_memory(held, pool, "Ann", 2)]
    assert held and all(recalled)  # each held-out sample recalls its topic's training lines...
    assert not any(t.content in replies for turns in recalled for t in turns)  # ...and nothing held out


@pytest.fixture
def stored(client):
    r = client.post("/upload-text", json={"dialog": FACTS, "speaker": "Ann"})
    assert r.status_code == 200, r.text
    return client


def test_memory_route_recalls_and_counts_and_follows_uploads(stored, env):
    r = stored.get("/speakers/Ann/memory", params={"q": "where does your sister live?", "limit": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 5 and body["data"][0]["text"] == "my sister moved to Lviv last spring"
    assert body["data"][0]["score"] > 0 and len(body["data"]) <= 2
    stored.post("/upload-text", json={"dialog": [{"speaker": "Q", "content": "car?"},
                                                 {"speaker": "Ann", "content": "a red Skoda, older than me"}], "speaker": "Ann"})
    body = stored.get("/speakers/Ann/memory", params={"q": "what car do you drive, the Skoda?"}).json()
    assert body["count"] == 6 and body["data"][0]["text"] == "a red Skoda, older than me"
    assert stored.get("/speakers/Nobody/memory", params={"q": "x"}).json() == {"detail": "no messages stored for speaker 'Nobody'"}
    r = stored.get("/speakers/Ann/memory")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "q"]


def test_delete_removes_the_index_and_lists_it(stored, env, tmp_path):
    from config import get_settings

    data = get_settings().DATA_DIR
    stored.get("/speakers/Ann/memory", params={"q": "sister"})
    index = data / ".Ann_messages.json.fts"
    assert index.is_file()
    r = stored.delete("/speakers/Ann")
    assert r.status_code == 200 and str(index) in r.json()["deleted"]
    assert not index.exists() and not any(p.name.endswith(".fts") for p in data.iterdir())


def test_a_damaged_index_is_rebuilt_with_a_log_line(stored, caplog):
    from config import get_settings

    stored.get("/speakers/Ann/memory", params={"q": "sister"})
    index = get_settings().DATA_DIR / ".Ann_messages.json.fts"
    index.write_bytes(b"not a database at all" * 100)
    with caplog.at_level(logging.INFO, logger="persona_lora.memory"):
        r = stored.get("/speakers/Ann/memory", params={"q": "dog"})
    assert r.status_code == 200 and r.json()["data"][0]["text"] == "our dog Biscuit eats my socks"
    assert any("damaged" in rec.message and "rebuilding" in rec.message for rec in caplog.records)
    assert all("Biscuit" not in rec.message for rec in caplog.records)  # never message content in the log
    with sqlite3.connect(index) as db:
        assert db.execute("SELECT count(*) FROM ids").fetchone()[0] == 5
    assert stored.get("/speakers/Ann/messages").status_code == 200  # the other routes never depended on it


def test_an_index_behind_the_store_catches_up(stored):
    import store
    from config import get_settings

    data = get_settings().DATA_DIR
    stored.get("/speakers/Ann/memory", params={"q": "sister"})
    late = sample(9, "the Skoda is older than me", [("Q", "your car?")])
    store.append_samples(data, "Ann", [late])  # as if the index update was lost: a kill between the two writes
    body = stored.get("/speakers/Ann/memory", params={"q": "what about the Skoda?"}).json()
    assert body["count"] == 6 and body["data"][0]["text"] == "the Skoda is older than me"


def test_uploads_at_once_for_one_speaker_keep_the_index_whole(stored):
    from concurrent.futures import ThreadPoolExecutor

    def upload(i: int) -> int:
        dialog = [{"speaker": "Q", "content": f"question {i}?"}, {"speaker": "Ann", "content": f"answer number {i} wombat{i}"}]
        return stored.post("/upload-text", json={"dialog": dialog, "speaker": "Ann"}).status_code

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(upload, range(48))) == [200] * 48
    body = stored.get("/speakers/Ann/memory", params={"q": "wombat17"}).json()
    assert body["count"] == 5 + 48 and body["data"][0]["text"] == "answer number 17 wombat17"


def test_dataset_shows_the_recalled_lines(stored):
    stored.post("/upload-text", json={"dialog": FACTS * 1 + [{"speaker": "Q", "content": "your sister, still in Lviv?"},
                                                          {"speaker": "Ann", "content": "yes, Lviv suits her"}], "speaker": "Ann"})
    r = stored.get("/speakers/Ann/dataset", params={"limit": 20})
    assert r.status_code == 200, r.text
    rows = {row["completion"].strip(): row for row in r.json()["data"]}
    row = next(v for k, v in rows.items() if k.startswith("yes, Lviv"))
    assert row["recalled"] == ["my sister moved to Lviv last spring"]
    assert "Ann: my sister moved to Lviv last spring" in row["prompt"]


@pytest.mark.slow
def test_generate_and_v1_list_what_was_recalled(live_server):
    from openai import OpenAI

    http = httpx.Client(base_url=live_server.url, timeout=600)
    assert http.post("/upload-text", json={"dialog": FACTS * 2, "speaker": "Ann"}).status_code == 200
    assert http.post("/train", json={"speaker": "Ann", "max_steps": 2, "wait": True}).status_code == 200
    ask = {"speaker": "Ann", "messages": [{"speaker": "Q", "content": "where does your sister live?"}], "max_new_tokens": 4, "seed": 1}
    body = http.post("/generate", json=ask).json()
    assert body["memory"][0]["text"] == "my sister moved to Lviv last spring", body
    assert http.post("/generate", json={**ask, "memory": False}).json()["memory"] == []
    assert len(http.post("/generate", json={**ask, "memory": 1}).json()["memory"]) == 1
    r = http.post("/generate", json={**ask, "memory": 99})
    assert r.status_code == 422
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "where does your sister live?"}]
    reply = client.chat.completions.create(model="Ann", messages=messages, max_tokens=4)
    assert reply.model_extra["memory"][0]["text"] == "my sister moved to Lviv last spring"
    both = [{"role": "user", "content": "how are your sister and the dog?"}]
    chunks = list(client.chat.completions.create(model="Ann", messages=both, max_tokens=4, stream=True,
                                                 extra_body={"memory": 2}))
    assert len(chunks[0].model_extra["memory"]) == 2 and "memory" not in (chunks[1].model_extra or {})
    none = client.chat.completions.create(model="Ann", messages=messages, max_tokens=4, extra_body={"memory": False})
    assert none.model_extra["memory"] == []
