"""Messenger exports: reading each format's quirks, cleaning, and the /upload-file endpoint."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

import exports
import parser as dialog_parser
from exports_fixtures import (WHATSAPP_ANDROID, WHATSAPP_IOS, telegram_account_bytes, telegram_bytes, telegram_chat,
                              zipped)
from config import get_settings
from models import CleaningOptions


def test_telegram_text_entities_service_media_and_null_sender():
    chat = exports.read_telegram(telegram_chat(), None)[0]
    assert (chat.name, chat.id) == ("Андрій", "4242")
    by_id = {m.id: m for m in chat.messages}
    assert by_id[1].kind == "system" and by_id[8].kind == "system"
    assert by_id[3].text == "Все добре, дякую" and by_id[3].speaker == "Олена"
    assert by_id[5].kind == "media"
    assert by_id[6].text == "Пиши на andriy@example.com або дзвони +380 67 123 45 67"
    assert by_id[7].reply_to == 2 and by_id[7].time == datetime(2023, 12, 31, 21, 9)
    assert by_id[9].speaker == "user9"


def test_whatsapp_android_month_first_twelve_hour_multiline_and_system():
    chat = exports.read_whatsapp(WHATSAPP_ANDROID)
    kinds = [(m.speaker, m.kind) for m in chat.messages]
    assert kinds == [("", "system"), ("Andriy", "message"), ("Olena K", "message"), ("Andriy", "media"),
                     ("Olena K", "deleted"), ("", "system"), ("Andriy", "message"), ("Olena K", "message")]
    assert chat.messages[2].text == "Fine, thanks.\nAnd a second line\nand a third"
    assert chat.messages[1].time == datetime(2023, 12, 31, 21, 5)
    assert chat.messages[6].time == datetime(2024, 1, 13, 10, 0)  # 1/13: month first, inferred from the file
    assert chat.messages[6].text == "New day: I added sugar"  # an ordinary message that says 'added'


def test_whatsapp_ios_day_first_marks_and_authored_notices():
    chat = exports.read_whatsapp(WHATSAPP_IOS)
    kinds = [(m.speaker, m.kind) for m in chat.messages]
    assert kinds == [("Олена", "system"), ("Андрій", "message"), ("Олена", "media"), ("Олена", "message"),
                     ("Андрій", "system"), ("Андрій", "message"), ("Олена", "message")]
    assert chat.messages[3].text == "Все добре\nще рядок"
    assert chat.messages[5].time == datetime(2024, 1, 13, 9, 0)  # 13.01: day first
    assert exports.read_export(zipped(WHATSAPP_IOS), "WhatsApp Chat - Андрій.zip")[0].messages[1].text == "Привіт"


def test_ambiguous_dates_default_to_day_first():
    chat = exports.read_whatsapp("01/02/24, 10:00 - A: x\n03/04/24, 10:00 - B: y\n")
    assert chat.messages[0].time == datetime(2024, 2, 1, 10, 0)


def test_cleaning_steps_and_reply_context():
    chat = exports.read_telegram(telegram_chat(), None)[0]
    dialogs, report = dialog_parser.clean(chat, CleaningOptions(), {})
    assert report == {"messages_read": 11, "renamed_by_alias": 0, "dropped_system": 2, "dropped_media": 1,
                      "dropped_deleted": 0, "masked_pii": 3, "dropped_empty": 0, "cut_long": 0, "merged": 1,
                      "merge_capped": 0, "dialogs": 2}
    assert [[m.speaker for m in d] for d in dialogs] == [["Андрій", "Олена", "Андрій", "Олена", "user9"], ["Андрій", "Олена"]]
    assert dialogs[0][1].text == "Все добре, дякую\nА в тебе?"
    assert dialogs[0][2].text == "Пиши на [email] або дзвони [phone]"
    assert dialogs[1][1].text == "Доброго! Картка [card] не моя 😊"

    samples = dialog_parser.dialog_samples(dialogs, "Олена", max_context_turns=1)
    contexts = {s.reply: [t.content for t in s.context] for s in samples}
    # Message 7 replied to message 2, which lies beyond the one-turn window: it joins the context.
    assert contexts["Відповідаю на привіт: у мене все чудово"] == ["Привіт! Як справи?", "Пиши на [email] або дзвони [phone]"]
    assert contexts["Доброго! Картка [card] не моя 😊"] == ["Доброго ранку!"]  # the gap split the day off

    raw, raw_report = dialog_parser.clean(chat, CleaningOptions(drop_system=False, drop_media=False, merge_consecutive=False,
                                                                split_gap_minutes=0, mask_pii=False, drop_empty=False), {})
    assert len(raw) == 1 and len(raw[0]) == 11 and raw_report["masked_pii"] == 0


def test_mask_pii():
    text, n = dialog_parser.mask_pii("a.b+c@mail.co.uk, +1 (202) 555-0143, 5500-0000-0000-0004, 2024 рік, 15:30")
    assert text == "[email], [phone], [card], 2024 рік, 15:30" and n == 3


def upload_file(client, data: bytes, filename: str, speaker: str, **form):
    fields = {"speaker": speaker, **{k: (json.dumps(v, ensure_ascii=False) if isinstance(v, dict) else str(v)) for k, v in form.items()}}
    return client.post("/upload-file", files={"file": (filename, data)}, data=fields)


def test_upload_telegram_export(client, env):
    r = upload_file(client, telegram_bytes(), "result.json", "Олена")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["message"] == "Successfully saved messages for Олена" and body["format"] == "telegram"
    assert (body["added"], body["total"], body["chats"]) == (3, 3, ["Андрій"])
    assert body["report"]["dropped_system"] == 2 and body["report"]["merged"] == 1
    assert body["speakers"]["Олена"]["messages"] == 3 and body["speakers"]["Андрій"]["messages"] == 3
    assert body["token_counter"] == "tokenizer" and body["speakers"]["Олена"]["tokens"] > 0
    assert body["warnings"] == ["Олена has 3 samples in this export; at least 10 (MIN_SAMPLES) are needed to train well"]
    stored = json.loads((Path(env["DATA_DIR"]) / "Олена_messages.json").read_text(encoding="utf-8"))
    assert "andriy@example.com" not in json.dumps(stored, ensure_ascii=False)
    assert upload_file(client, telegram_bytes(), "result.json", "Олена").json()["added"] == 0  # dedupe


def test_upload_whatsapp_with_aliases_into_one_speaker(client, env):
    r = upload_file(client, telegram_bytes(), "result.json", "Олена")
    r = upload_file(client, WHATSAPP_ANDROID.encode(), "WhatsApp Chat with Andriy.txt", "Олена", aliases={"Olena K": "Олена"})
    assert r.status_code == 200, r.text
    assert r.json()["format"] == "whatsapp" and r.json()["added"] == 2 and r.json()["total"] == 5
    assert r.json()["report"]["renamed_by_alias"] > 0
    replies = [m["reply"] for m in json.loads((Path(env["DATA_DIR"]) / "Олена_messages.json").read_text())["messages"]]
    assert "Fine, thanks.\nAnd a second line\nand a third" in replies and "Mail me at [email]" in replies
    r = upload_file(client, zipped(WHATSAPP_IOS), "chat.zip", "Андрій", format="whatsapp")
    assert r.status_code == 200 and r.json()["added"] == 2


def test_full_account_export_pick_a_chat(client):
    r = upload_file(client, telegram_account_bytes(), "result.json", "Олена", chat="Робота")
    assert r.status_code == 200 and r.json()["chats"] == ["Робота"] and r.json()["added"] == 1
    r = upload_file(client, telegram_account_bytes(), "result.json", "Олена", chat="4242")
    assert r.json()["chats"] == ["Андрій"]
    r = upload_file(client, telegram_account_bytes(), "result.json", "Олена")
    assert r.json()["chats"] == ["Андрій", "Робота"] and r.json()["total"] == 4
    r = upload_file(client, telegram_account_bytes(), "result.json", "Олена", chat="Сім'я")
    assert r.status_code == 422
    assert r.json()["detail"] == "no chat named or numbered \"Сім'я\" in the export; its chats are ['Андрій', 'Робота']"


def test_native_json_and_any_participant(client):
    native = json.dumps({"dialog": [{"speaker": "A", "content": "hi"}, {"speaker": "B", "content": "hey"}]}).encode()
    r = upload_file(client, native, "dialog.json", "B")
    assert r.status_code == 200 and r.json()["format"] == "native" and r.json()["added"] == 1
    assert upload_file(client, telegram_bytes(), "result.json", "Андрій").json()["added"] == 3


@pytest.mark.parametrize(
    "data, filename, form, fragment",
    [
        (telegram_bytes()[:200], "result.json", {}, "not valid JSON"),
        (b"\x00\xff\xfe\x01binary junk" * 100, "result.json", {}, "could not tell the format"),
        (b"\xff\xfe{" + b"\x00junk" * 100, "result.json", {"format": "telegram"}, "not UTF-8"),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 10, "photo.png", {}, "could not tell the format"),
        (b"PK\x03\x04 not really a zip", "chat.zip", {}, "damaged"),
        (b"hello there\nno timestamps", "chat.txt", {}, "not a WhatsApp message line"),
        (b'{"messages": 5}', "result.json", {}, "'messages' must be a list"),
        (b'[{"speaker": 1}]', "x.json", {"format": "native"}, "dialog item 0"),
        (telegram_bytes(), "result.json", {}, "speaker 'Nobody' does not occur in the export"),
    ],
    ids=["truncated-json", "binary-junk", "binary-as-telegram", "png", "bad-zip", "text-without-stamps",
         "telegram-bad-messages", "native-bad-item", "unknown-speaker"],
)
def test_malformed_exports_answer_422_and_store_nothing(client, env, data, filename, form, fragment):
    r = upload_file(client, data, filename, "Nobody" if "Nobody" in fragment else "Олена", **form)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["detail"]
    assert list(Path(env["DATA_DIR"]).glob("*_messages.json")) == []


def test_unknown_speaker_lists_the_names(client):
    r = upload_file(client, telegram_bytes(), "result.json", "Nobody")
    assert r.json()["detail"].endswith("its speakers are ['user9', 'Андрій', 'Олена']")


def test_form_validation(client):
    assert upload_file(client, telegram_bytes(), "result.json", "../x").status_code == 422
    assert upload_file(client, telegram_bytes(), "result.json", "Олена", format="pdf").status_code == 422
    assert upload_file(client, telegram_bytes(), "result.json", "Олена", aliases="{not json").status_code == 422
    assert client.post("/upload-file", data={"speaker": "Олена"}).status_code == 422  # no file


def test_fifty_megabyte_upload_over_the_limit_is_413(client, env, monkeypatch):
    monkeypatch.setenv("MAX_UPLOAD_BYTES", str(10 * 1024 * 1024))
    get_settings.cache_clear()
    r = upload_file(client, b"x" * (50 * 1024 * 1024), "result.json", "Олена")
    assert r.status_code == 413 and "MAX_UPLOAD_BYTES=10485760" in r.json()["detail"]
    assert list(Path(env["DATA_DIR"]).glob("*_messages.json")) == []
