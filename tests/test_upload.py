"""POST /upload-text: validation, storage, append/dedupe, and that bad input changes nothing."""

from __future__ import annotations

import json
import subprocess
import unicodedata
from pathlib import Path

import pytest

from conftest import SAMPLE_DIALOG, tmpfs
from config import get_settings
from models import MAX_DIALOG_MESSAGES, MAX_MESSAGE_CHARS


def upload(client, dialog=SAMPLE_DIALOG, speaker="User1"):
    return client.post("/upload-text", json={"dialog": dialog, "speaker": speaker})


def stored(env, speaker="User1") -> dict:
    return json.loads((Path(env["DATA_DIR"]) / f"{speaker}_messages.json").read_text(encoding="utf-8"))


def all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_sample_dialog_is_stored_with_context(client, env):
    r = upload(client)
    assert r.status_code == 200
    assert r.json() == {
        "message": "Successfully saved messages for User1",
        "filepath": f"{env['DATA_DIR']}/User1_messages.json",
        "speaker": "User1",
        "added": 2,
        "duplicates": 0,
        "skipped_empty": 0,
        "total": 2,
    }
    data = stored(env)
    assert data["speaker"] == "User1"
    assert [m["reply"] for m in data["messages"]] == ["Привіт! Як справи?", "Підемо кави вип'ємо?"]
    assert data["messages"][0]["context"] == []
    assert data["messages"][1]["context"] == SAMPLE_DIALOG[:2]


def test_relative_data_dir_is_reported_as_typed(client, env, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATA_DIR", "./data")
    get_settings.cache_clear()
    r = upload(client)
    assert r.json()["filepath"] == "./data/User1_messages.json"
    assert (tmp_path / "data" / "User1_messages.json").exists()


def test_identical_upload_adds_nothing_and_new_dialog_appends(client, env):
    upload(client)
    before = stored(env)
    r = upload(client)
    assert (r.json()["added"], r.json()["duplicates"], r.json()["total"]) == (0, 2, 2)
    assert stored(env) == before
    more = SAMPLE_DIALOG + [{"speaker": "User2", "content": "Так, ходімо!"}, {"speaker": "User1", "content": "Чудово 😊"}]
    r = upload(client, more)
    assert (r.json()["added"], r.json()["duplicates"], r.json()["total"]) == (1, 2, 3)
    assert stored(env)["messages"][:2] == before["messages"]
    assert stored(env)["messages"][2]["reply"] == "Чудово 😊"


def test_context_is_bounded_by_setting(client, env, monkeypatch):
    monkeypatch.setenv("MAX_CONTEXT_TURNS", "2")
    get_settings.cache_clear()
    dialog = [{"speaker": f"U{i % 2}", "content": f"m{i}"} for i in range(6)]
    upload(client, dialog, "U1")
    last = stored(env, "U1")["messages"][-1]
    assert last["reply"] == "m5"
    assert [t["content"] for t in last["context"]] == ["m3", "m4"]


def test_empty_messages_of_speaker_are_skipped(client, env):
    dialog = [{"speaker": "A", "content": "hi"}, {"speaker": "B", "content": "   "}, {"speaker": "B", "content": "yo"}]
    r = upload(client, dialog, "B")
    assert (r.json()["added"], r.json()["skipped_empty"]) == (1, 1)


@pytest.mark.parametrize("name", ["Олена", "José", "User 1", "a_b.c-d", "李小龙", "O'Neil".replace("'", "")])
def test_unicode_names_accepted(client, env, name):
    r = upload(client, [{"speaker": name, "content": "hello"}], name)
    assert r.status_code == 200, r.text
    assert (Path(env["DATA_DIR"]) / f"{name}_messages.json").exists()


def test_names_are_nfc_normalised_and_trimmed(client, env):
    nfd = unicodedata.normalize("NFD", "José")
    assert nfd != "José"
    r = upload(client, [{"speaker": "José", "content": "hola"}], f"  {nfd} ")
    assert r.status_code == 200, r.text
    assert r.json()["speaker"] == "José"
    assert (Path(env["DATA_DIR"]) / "José_messages.json").exists()


HOSTILE = {
    "a\x00b": "control",
    "a\nb": "control",
    "bell\x07": "control",
    "x" * 129: "at most 128",
    "": "at least 1",
    "   ": "at least 1",
    "\u202a\u202c": "at least 1",
    "a\u202eb": "control or invisible",
    "a\u2028b": "control or invisible",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_speaker_names_rejected_and_nothing_written(client, env, name):
    before = all_files(Path(env["DATA_DIR"]).parent)
    r = upload(client, [{"speaker": name, "content": "x"}] if name.strip() else SAMPLE_DIALOG, name)
    assert r.status_code == 422, r.text
    problems = r.json()["detail"]
    assert any(p["loc"][-1] == "speaker" and HOSTILE[name] in p["msg"] for p in problems), problems
    assert all_files(Path(env["DATA_DIR"]).parent) == before


# Names that are not safe file names: stored under parser.storage_name, listed by their real name.
ENCODED = ["../etc/passwd", "..", "a..b", ".hidden", "a/b", "a\\b", "rm -rf *", "C:evil", "x" * 65, "O'Neil \"Jr\"",
           "Мама 👨\u200d👩\u200d👧", "+91 98911 81801", "Щ" * 128, "李" * 90]


@pytest.mark.parametrize("name", ENCODED)
def test_any_printable_name_is_stored_inside_the_data_folder(client, env, name):
    data = Path(env["DATA_DIR"])
    r = upload(client, [{"speaker": "Інший", "content": "привіт"}, {"speaker": name, "content": "x"}], name)
    assert r.status_code == 200, r.text
    files = list(data.glob("*_messages.json"))
    assert len(files) == 1 and files[0].parent == data and files[0].name.startswith("~")
    assert len(files[0].name.encode()) <= 255
    assert json.loads(files[0].read_text(encoding="utf-8"))["speaker"] == name
    assert client.get("/speakers").json()["data"][0]["speaker"] == name
    assert upload(client, [{"speaker": name, "content": "x"}, {"speaker": name, "content": "y"}], name).json()["total"] == 3


def test_direction_marks_around_a_name_are_stripped(client, env):
    r = upload(client, [{"speaker": "\u202a+234 903 186 6339\u202c", "content": "hi"}], "\u202a+234 903 186 6339\u202c")
    assert r.status_code == 200, r.text
    assert r.json()["speaker"] == "+234 903 186 6339"


def test_safe_names_keep_their_file_names():
    from config import storage_name

    assert [storage_name(n) for n in ("Олена", "User 1", "a_b.c-d", "李" * 64)] == ["Олена", "User 1", "a_b.c-d", "李" * 64]
    assert storage_name("C:evil") == storage_name("C:evil") != storage_name("C;evil")  # stable, distinct
    assert storage_name("Мама 👨\u200d👩\u200d👧").startswith("~") and "/" not in storage_name("../x")


@pytest.mark.parametrize(
    "payload, loc, text",
    [
        ({"dialog": [], "speaker": "User1"}, ["body", "dialog"], "at least 1"),
        ({"dialog": "hello", "speaker": "User1"}, ["body", "dialog"], "list"),
        ({"speaker": "User1"}, ["body", "dialog"], "required"),
        ({"dialog": SAMPLE_DIALOG}, ["body", "speaker"], "required"),
        ({"dialog": [{"speaker": "User1"}], "speaker": "User1"}, ["body", "dialog", 0, "content"], "required"),
        ({"dialog": [{"speaker": "User1", "content": 5}], "speaker": "User1"}, ["body", "dialog", 0, "content"], "string"),
        ({"dialog": [{"speaker": "User1", "content": None}], "speaker": "User1"}, ["body", "dialog", 0, "content"], "string"),
        ({"dialog": [{"speaker": "", "content": "x"}, {"speaker": "User1", "content": "y"}], "speaker": "User1"},
         ["body", "dialog", 0, "speaker"], "at least 1"),
        ({"dialog": [{"speaker": "User1", "content": "x" * (MAX_MESSAGE_CHARS + 1)}], "speaker": "User1"},
         ["body", "dialog", 0, "content"], f"at most {MAX_MESSAGE_CHARS}"),
        ({"dialog": [{"speaker": "User1", "content": "x"}] * (MAX_DIALOG_MESSAGES + 1), "speaker": "User1"},
         ["body", "dialog"], f"at most {MAX_DIALOG_MESSAGES}"),
        ({"dialog": SAMPLE_DIALOG, "speaker": "User3"}, ["body"], "does not occur in the dialog; its speakers are ['User1', 'User2']"),
    ],
)
def test_bad_payloads_answer_422_with_location(client, env, payload, loc, text):
    r = client.post("/upload-text", json=payload)
    assert r.status_code == 422, r.text
    problems = r.json()["detail"]
    assert any(p["loc"] == loc and text in p["msg"] for p in problems), problems
    assert list(Path(env["DATA_DIR"]).glob("*_messages.json")) == []


JSON_HINT = "; JSON takes double quotes around names and strings, and no comma after the last item of an object or a list"


@pytest.mark.parametrize(
    "body, pos, where",
    [
        (b'{"speaker": "User1",\n "dialog": [],\n}', 36, "line 3, column 1: expecting property name enclosed in double quotes"),
        (b"{'speaker': 'User1'}", 1, "line 1, column 2: expecting property name enclosed in double quotes"),
        (b'{"speaker": "User1", "dialog": [1,]}', 34, "line 1, column 35: expecting value"),
        (b'{"dialog": [', 12, "line 1, column 13: expecting value"),
        (b"\xff\xfe binary junk", 0, "line 1, column 1: expecting value"),
        (b'{"speaker": "User1" "dialog": []}', 20, "line 1, column 21: expecting ',' delimiter"),
    ],
)
def test_not_json_says_where_and_what_was_expected(client, env, body, pos, where):
    r = client.post("/upload-text", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422
    hint = JSON_HINT if "expecting ','" not in where else ""
    assert r.json() == {"detail": [{"type": "json_invalid", "loc": ["body", pos], "msg": f"the body is not valid JSON: {where}{hint}"}]}
    assert list(Path(env["DATA_DIR"]).glob("*_messages.json")) == []


@pytest.mark.parametrize("path", ["/upload-text", "/train"])
@pytest.mark.parametrize("content_type, sent", [(None, "this request had none"),
                                                ("application/x-www-form-urlencoded", "this request's is 'application/x-www-form-urlencoded'")])
def test_json_without_its_content_type_says_to_send_the_header(client, env, path, content_type, sent):
    headers = {"content-type": content_type} if content_type else {}
    r = client.post(path, content=json.dumps({"dialog": SAMPLE_DIALOG, "speaker": "User1"}).encode(), headers=headers)
    assert r.status_code == 422
    assert r.json() == {"detail": [{"type": "json_expected", "loc": ["body"], "msg": (
        f"the body must be sent as JSON, with the header 'Content-Type: application/json' ({sent}); "
        "with curl: --json '{...}', or -H 'Content-Type: application/json' -d '{...}'")}]}


def test_json_sent_to_upload_file_says_it_takes_a_form(client, env):
    r = client.post("/upload-file", json={"dialog": SAMPLE_DIALOG, "speaker": "User1"})
    assert r.status_code == 422
    assert r.json() == {"detail": [{"type": "multipart_expected", "loc": ["body"], "msg": (
        "this route takes a multipart form, not 'application/json': send the file and fields with curl "
        "-F file=@result.json -F speaker=NAME; a dialog as JSON goes to POST /upload-text")}]}
    r = client.post("/upload-file", files={"file": ("a.json", b"{}")})  # a form without its speaker: the field is named
    assert r.status_code == 422
    assert r.json()["detail"] == [{"type": "missing", "loc": ["body", "speaker"], "msg": "Field required"}]
    assert list(Path(env["DATA_DIR"]).glob("*_messages.json")) == []


def test_not_json_under_v1_answers_openais_shape(client):
    r = client.post("/v1/chat/completions", content=b'{"model": "x",}', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "invalid request: 14: the body is not valid JSON: line 1, column 15: expecting property name enclosed in "
        f"double quotes{JSON_HINT}")


def test_allow_list(client, env, monkeypatch):
    monkeypatch.setenv("ALLOWED_SPEAKERS", "User2, Олена")
    get_settings.cache_clear()
    r = upload(client)
    assert r.status_code == 403
    assert r.json() == {"detail": "speaker 'User1' is not in ALLOWED_SPEAKERS (User2, Олена)"}
    assert upload(client, speaker="User2").status_code == 200
    assert client.post("/train", json={"speaker": "User1"}).status_code == 403


def test_damaged_file_is_reported_and_left_alone(client, env):
    upload(client)
    path = Path(env["DATA_DIR"]) / "User1_messages.json"
    path.write_text('{"speaker": "User1", "messages": [', encoding="utf-8")
    r = upload(client)
    assert r.status_code == 500
    assert "is not a valid messages file" in r.json()["detail"] and "nothing was changed" in r.json()["detail"]
    assert path.read_text(encoding="utf-8") == '{"speaker": "User1", "messages": ['


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB filesystem at tmp_path/disk."""
    with tmpfs(tmp_path / "disk", "512k") as mount:
        yield mount


def test_disk_full_and_read_only_disk_keep_stored_data(client, env, monkeypatch, small_disk):
    monkeypatch.setenv("DATA_DIR", str(small_disk / "data"))
    get_settings.cache_clear()
    assert upload(client).status_code == 200
    path = small_disk / "data" / "User1_messages.json"
    before = path.read_bytes()
    with open(small_disk / "filler", "wb", buffering=0) as filler:  # fill the disk to the last block
        try:
            while True:
                filler.write(b"x" * 4096)
        except OSError:
            pass
    big = SAMPLE_DIALOG + [{"speaker": "User1", "content": "нове повідомлення " * 500}]
    r = upload(client, big)
    assert r.status_code == 507, r.text
    assert r.json()["detail"].endswith("the stored messages are unchanged. Free disk space and retry.")
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []

    (small_disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    r = upload(client, big)
    assert r.status_code == 500, r.text
    assert "Check that the data folder exists and is writable" in r.json()["detail"]
    assert path.read_bytes() == before
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert upload(client, big).json()["added"] == 1


def test_limits_from_settings(client, env, monkeypatch):
    monkeypatch.setenv("MAX_DIALOG_MESSAGES", "2")
    monkeypatch.setenv("MAX_MESSAGE_CHARS", "10")
    get_settings.cache_clear()
    r = upload(client)
    assert r.status_code == 422
    problems = {tuple(p["loc"]): p["msg"] for p in r.json()["detail"]}
    assert problems == {
        ("body", "dialog"): "List should have at most 2 items (MAX_DIALOG_MESSAGES)",
        **{("body", "dialog", i, "content"): "String should have at most 10 characters (MAX_MESSAGE_CHARS)" for i in range(3)},
    }
    assert list(Path(env["DATA_DIR"]).glob("*_messages.json")) == []


def test_body_limit_answers_413_before_reading(client, env, monkeypatch):
    monkeypatch.setenv("MAX_BODY_BYTES", "2048")
    get_settings.cache_clear()
    big = [{"speaker": "User1", "content": "x" * 3000}]
    r = upload(client, big)
    assert r.status_code == 413
    assert r.json() == {"detail": "request body is larger than MAX_BODY_BYTES=2048 bytes; split the dialog into several uploads"}

    def chunks():  # no Content-Length: counted while read
        yield b'{"speaker": "User1", "dialog": ['
        for _ in range(10):
            yield b'{"speaker": "User1", "content": "' + b"y" * 500 + b'"},'
        yield b'{"speaker": "User1", "content": "z"}]}'

    r = client.post("/upload-text", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "MAX_BODY_BYTES=2048" in r.json()["detail"]
    assert list(Path(env["DATA_DIR"]).glob("*_messages.json")) == []


def test_export_files_have_the_upload_limit_on_both_endpoints(client, env, monkeypatch):
    """An export may be as large as MAX_UPLOAD_BYTES whether it is imported or only inspected."""
    monkeypatch.setenv("MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("MAX_UPLOAD_BYTES", "8192")
    get_settings.cache_clear()
    chat = "".join(f"31/12/23, 21:{i % 60:02d} - {'Ann' if i % 2 else 'Bob'}: message number {i}\n" for i in range(100))
    assert 2048 < len(chat.encode()) < 8192
    r = client.post("/exports/inspect", files={"file": ("chat.txt", chat.encode())})
    assert r.status_code == 200, r.text
    assert r.json()["participants"] == [{"name": "Bob", "messages": 50}, {"name": "Ann", "messages": 50}]
    r = client.post("/upload-file", files={"file": ("chat.txt", chat.encode())}, data={"speaker": "Ann"})
    assert r.status_code == 200, r.text
    for path in ("/exports/inspect", "/upload-file"):
        r = client.post(path, files={"file": ("chat.txt", (chat * 3).encode())}, data={"speaker": "Ann"})
        assert r.status_code == 413 and "MAX_UPLOAD_BYTES=8192" in r.json()["detail"], (path, r.text)
