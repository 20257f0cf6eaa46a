"""Hostile exports (issue 29): damaged numbers and names answer 4xx or are read, never 500; reading is
linear in the line; a JSON export's parsed size is bounded by MAX_EXPORT_MESSAGES."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest

import importers as exports
import parser as dialog_parser
from config import get_settings


def _telegram(*messages: dict) -> bytes:
    base = [{"id": 1, "type": "message", "date": "2024-01-01T10:00:00", "from": "Ана", "text": "Привіт"}]
    rows = [{"id": i + 2, "type": "message", "date": "2024-01-01T10:01:00", "from": "Ана", "text": "ще", **m}
            for i, m in enumerate(messages)]
    tail = {"id": 99, "type": "message", "date": "2024-01-01T10:02:00", "from": "Олена", "text": "Відповідь"}
    return json.dumps({"name": "x", "id": 1, "messages": base + rows + [tail]}, ensure_ascii=False).encode()


def _discord(**fields) -> bytes:
    author = lambda name: {"id": "1", "name": name}  # noqa: E731
    return json.dumps({
        "guild": {"id": "1", "name": "g"}, "channel": {"id": "2", "name": "c"},
        "messages": [{"id": "10", "type": "Default", "timestamp": "2024-01-01T10:00:00+00:00", "content": "Привіт", "author": author("Ана")},
                     {"id": "11", "type": "Reply", "timestamp": "2024-01-01T10:01:00+00:00", "content": "Відповідь",
                      "author": author("Олена"), **fields}],
    }, ensure_ascii=False).encode()


def _both(client, data: bytes, filename: str = "result.json"):
    upload = client.post("/upload-file", files={"file": (filename, data)}, data={"speaker": "Олена"})
    inspect = client.post("/exports/inspect", files={"file": (filename, data)})
    return upload, inspect


# --- numbers that are digits to str.isdigit, not to int (issue 29, items 1 and 2) --------------------


@pytest.mark.parametrize("unixtime", ["²", "1" * 5000, "١٧٠٤٠٥٦٧٠٠"], ids=["superscript-two", "5000-digits", "arabic-indic-digits"])
def test_a_telegram_unixtime_that_is_no_number_is_ignored(client, unixtime):
    upload, inspect = _both(client, _telegram({"date": None, "date_unixtime": unixtime}))
    assert upload.status_code == 200, upload.text
    assert upload.json()["added"] == 1
    assert inspect.status_code == 200, inspect.text
    assert (inspect.json()["first_message"], inspect.json()["last_message"]) == ("2024-01-01T10:00:00", "2024-01-01T10:02:00")
    assert exports.read_telegram(json.loads(_telegram({"date": None, "date_unixtime": unixtime})), None)[0].messages[1].time is None


def test_a_telegram_unixtime_string_still_gives_the_time():
    chat = exports.read_telegram(json.loads(_telegram({"date": None, "date_unixtime": "1704103260"})), None)[0]
    assert str(chat.messages[1].time) == "2024-01-01 10:01:00"


@pytest.mark.parametrize("fields", [{"id": "²"}, {"reference": {"messageId": "1" * 5000}}, {"id": "1" * 5000},
                                    {"reference": {"messageId": "²"}}],
                         ids=["id-superscript-two", "reference-5000-digits", "id-5000-digits", "reference-superscript-two"])
def test_a_discord_id_that_is_no_number_is_ignored(client, fields):
    upload, inspect = _both(client, _discord(**fields), "general.json")
    assert upload.status_code == 200, upload.text
    assert upload.json()["added"] == 1 and upload.json()["format"] == "discord"
    assert inspect.status_code == 200, inspect.text
    message = exports.read_export(_discord(**fields), "general.json")[0].messages[1]
    assert (message.id, message.reply_to) == (None if "id" in fields else 11, None)
