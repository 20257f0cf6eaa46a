"""Messenger exports: reading each format's quirks, cleaning, and the /upload-file endpoint."""

from __future__ import annotations

import io
import json
import time
import zipfile
from datetime import datetime
from pathlib import Path

import pytest
from exports_fixtures import (
    WHATSAPP_ANDROID,
    WHATSAPP_IOS,
    WHATSAPP_LOCALISED,
    WHATSAPP_VARIANTS,
    discord_bytes,
    encoded,
    messenger_bytes,
    telegram_account_bytes,
    telegram_bytes,
    telegram_chat,
    whatsapp_variant,
    zipped,
)

import importers as exports
import parser as dialog_parser
from config import get_settings
from models import MAX_MESSAGE_CHARS, CleaningOptions


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
    assert report == {"messages_read": 11, "skipped_lines": 0, "renamed_by_alias": 0, "dropped_system": 2, "dropped_media": 1,
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


# --- every WhatsApp locale and version --------------------------------------------------------------


@pytest.mark.parametrize("variant", WHATSAPP_VARIANTS)
def test_whatsapp_variant_reads_speakers_times_and_notices(variant):
    chat = exports.read_export(whatsapp_variant(variant).encode(), "WhatsApp Chat with Олена.txt")[0]
    assert [(m.speaker, m.kind) for m in chat.messages][1:] == [
        ("Олена", "message"), ("Andriy K", "media"), ("Andriy K", "message"), ("Олена", "message")]
    assert chat.messages[0].kind == "system"
    assert chat.messages[1].text == "Привіт 👋\nдругий рядок"
    assert chat.messages[3].text == "Hi: all good"
    first = {m.time for m in chat.messages[:3]}
    assert first == {datetime(2023, 12, 31, 21, 5, 9)} or first == {datetime(2023, 12, 31, 21, 5)}
    assert chat.messages[4].time == datetime(2024, 1, 13, 10, 0), variant
    assert exports.detect_format(whatsapp_variant(variant).encode(), "chat") == "whatsapp"  # detected without .txt


@pytest.mark.parametrize("how", ["utf-8", "bom", "crlf", "utf-16-le", "utf-16-be"])
def test_whatsapp_encodings(how):
    data = encoded(whatsapp_variant("ios-de"), how)
    for chat in (exports.read_export(data, "_chat.txt")[0], exports.read_export(zipped(data), "c.zip")[0]):
        assert [m.speaker for m in chat.messages] == ["Олена", "Олена", "Andriy K", "Andriy K", "Олена"]
        assert [m.text for m in chat.messages][1:] == ["Привіт 👋\nдругий рядок", "<Media omitted>", "Hi: all good", "Добре"]
    assert exports.detect_format(data, "chat") == "whatsapp"


@pytest.mark.parametrize("text, kind", WHATSAPP_LOCALISED)
def test_whatsapp_localised_placeholders_and_notices(text, kind):
    chat = exports.read_whatsapp(f"[31.12.23, 21:05:09] Ана: {text}\n")
    assert chat.messages[0].kind == kind


def test_whatsapp_non_contacts_lose_the_tilde():
    chat = exports.read_whatsapp("[27.09.23, 13:09:05] ~\u202fBen: Hallo\n[27.09.23, 13:09:06] ~ Eva: Hi\n")
    assert [m.speaker for m in chat.messages] == ["Ben", "Eva"]


def test_whatsapp_edit_markers_are_removed():
    chat = exports.read_whatsapp("[26/11/23, 18:54:27] Ana: fiz todas <This message was edited>\n"
                                 "18/5/26, 22:27 - Óscar S.: Bien <Se editó este mensaje.>\n")
    assert [m.text for m in chat.messages] == ["fiz todas", "Bien"]


def test_whatsapp_bad_line_says_where_and_what():
    with pytest.raises(exports.ExportError, match=r"^line 2 is not a WhatsApp message line: 'hello'; expected"):
        exports.read_whatsapp("\n hello\nworld\n")  # a line before the first message line is skipped (test_whatsapp_forms)


# --- Telegram edge cases -------------------------------------------------------------------------------


def test_telegram_mixed_aware_and_naive_dates_split_by_gap():
    chat = telegram_chat()
    chat["messages"][9]["date"] = "2024-01-01T09:00:00+02:00"
    dialogs, report = dialog_parser.clean(exports.read_telegram(chat, None)[0], CleaningOptions(), {})
    assert report["dialogs"] == 2
    assert dialogs[1][0].time == datetime(2024, 1, 1, 7, 0)  # offsets become naive UTC


# --- Discord and Messenger -----------------------------------------------------------------------------


def test_discord_export():
    assert exports.detect_format(discord_bytes(), "chat.json") == "discord"
    chat = exports.read_export(discord_bytes(), "chat.json")[0]
    assert (chat.name, chat.id) == ("Гільдія / загальний", "42")
    assert [(m.speaker, m.kind) for m in chat.messages] == [
        ("Олена", "system"), ("Олена", "message"), ("andriy", "media"), ("andriy", "message"), ("Олена", "message")]
    assert chat.messages[3].reply_to == 101 and chat.messages[1].id == 101
    assert chat.messages[2].time == datetime(2024, 1, 1, 8, 2)  # +02:00 as UTC


def test_messenger_export_oldest_first_and_text_repaired():
    assert exports.detect_format(messenger_bytes(), "message_1.json") == "messenger"
    chat = exports.read_export(messenger_bytes(), "message_1.json")[0]
    assert chat.name == "Олена"
    assert [(m.speaker, m.kind, m.text) for m in chat.messages] == [
        ("Andriy K", "message", "Café au lait?"), ("Andriy K", "system", "Andriy K started a call."),
        ("Олена", "message", "Дивись, що я знайшла"), ("Олена", "media", ""), ("Andriy K", "message", "Чудово ❤️")]
    assert chat.messages[0].time == datetime(2024, 1, 1, 10, 1)


def test_messenger_archive_threads_by_folder(client):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("your_activity/messages/inbox/olena_1/message_1.json", messenger_bytes())
        archive.writestr("your_activity/messages/inbox/olena_1/photos/1.jpg", b"\xff\xd8")
        archive.writestr("your_activity/messages/inbox/bos_2/message_1.json", messenger_bytes().replace(b"Andriy K", b"Bos"))
        older = json.loads(messenger_bytes())  # the older half of the thread, in a second file
        older["messages"] = [{"sender_name": "Andriy K", "timestamp_ms": 1704000000000, "content": "Рік тому", "type": "Generic"}]
        archive.writestr("your_activity/messages/inbox/olena_1/message_2.json", json.dumps(older))
    r = upload_file(client, buffer.getvalue(), "facebook-olena.zip", "Олена", format="messenger", chat="olena_1")
    assert r.status_code == 200, r.text
    assert r.json()["format"] == "messenger" and r.json()["chats"] == ["Олена"]
    assert r.json()["report"]["messages_read"] == 6
    assert r.json()["speakers"] == {"Andriy K": {"messages": 3, "tokens": r.json()["speakers"]["Andriy K"]["tokens"]},
                                    "Олена": {"messages": 1, "tokens": r.json()["speakers"]["Олена"]["tokens"]}}


def test_upload_discord_and_messenger(client):
    r = upload_file(client, discord_bytes(), "general.json", "andriy")
    assert r.status_code == 200 and r.json()["format"] == "discord" and r.json()["added"] == 1
    r = upload_file(client, messenger_bytes(), "message_1.json", "Олена")
    assert r.status_code == 200 and r.json()["format"] == "messenger" and r.json()["added"] == 1


# --- no export gives a 500 -------------------------------------------------------------------------------


def _telegram_with(*messages: dict) -> bytes:
    base = [{"id": 1, "type": "message", "date": "2024-01-01T10:00:00", "from": "Олена", "text": "Привіт"}]
    rows = [{"id": i + 2, "type": "message", "date": "2024-01-01T10:01:00", **m} for i, m in enumerate(messages)]
    return json.dumps({"name": "x", "id": 1, "messages": base + rows}).encode()


@pytest.mark.parametrize(
    "message, speaker_shown",
    [
        ({"from": "Мама 👨\u200d👩\u200d👧", "text": "Обідати!"}, "Мама 👨\u200d👩\u200d👧"),
        ({"from": "Щ" * 128, "text": "довге ім'я"}, "Щ" * 128),
        ({"from": "+91 98911 81801", "text": "hello"}, "+91 98911 81801"),
        ({"from": "\u202a+234 903 186 6339\u202c", "text": "hi"}, "+234 903 186 6339"),
        ({"from": "A\u202eB\x07", "text": "override inside"}, "AB"),
        ({"from": "Ана", "text": "lone \ud800 surrogate"}, "Ана"),
        ({"from": "Ана", "date": "2024-01-01T10:02:00+00:00", "text": "aware date"}, "Ана"),
    ],
    ids=["zwj-family", "128-chars", "phone-name", "direction-marks", "controls-inside", "lone-surrogate", "aware-date"],
)
def test_awkward_names_and_text_import(client, env, message, speaker_shown):
    r = upload_file(client, _telegram_with(message, {"from": "Олена", "text": "Відповідь"}), "result.json", "Олена")
    assert r.status_code == 200, r.text
    assert speaker_shown in r.json()["speakers"]
    stored = json.loads((Path(env["DATA_DIR"]) / "Олена_messages.json").read_text(encoding="utf-8"))
    assert stored["messages"][-1]["context"][-1]["speaker"] == speaker_shown
    assert "\ud800" not in json.dumps(stored, ensure_ascii=False)


def test_lone_surrogate_becomes_replacement_character(client, env):
    r = upload_file(client, _telegram_with({"from": "Ана", "text": "a\ud800b"}, {"from": "Олена", "text": "ok"}), "result.json", "Олена")
    assert r.status_code == 200, r.text
    stored = json.loads((Path(env["DATA_DIR"]) / "Олена_messages.json").read_text(encoding="utf-8"))
    assert stored["messages"][-1]["context"][-1]["content"] == "a\ufffdb"


def test_message_over_the_limit_is_cut_and_reported(client, env):
    r = upload_file(client, _telegram_with({"from": "Олена", "text": "слово " * 3000}, {"from": "Ана", "text": "ok"},
                                           {"from": "Олена", "text": "коротко"}), "result.json", "Олена", mask_pii="false")
    assert r.status_code == 200, r.text
    assert r.json()["report"]["cut_long"] == 1
    stored = json.loads((Path(env["DATA_DIR"]) / "Олена_messages.json").read_text(encoding="utf-8"))
    assert max(len(m["reply"]) for m in stored["messages"]) == MAX_MESSAGE_CHARS


def test_merging_stops_at_the_message_limit(client, env):
    many = [{"from": "Олена", "text": "x" * 149} for _ in range(80)]  # 80 × 150 = 12,000 characters
    r = upload_file(client, _telegram_with(*many, {"from": "Ана", "text": "ok"}), "result.json", "Олена")
    assert r.status_code == 200, r.text
    assert r.json()["report"]["merge_capped"] == 1 and r.json()["report"]["merged"] == 79
    stored = json.loads((Path(env["DATA_DIR"]) / "Олена_messages.json").read_text(encoding="utf-8"))
    assert all(len(m["reply"]) <= MAX_MESSAGE_CHARS for m in stored["messages"])


def test_senderless_message_kept_with_drop_empty_false(client):
    data = WHATSAPP_ANDROID.encode()
    r = upload_file(client, data, "chat.txt", "Andriy", drop_empty="false", drop_system="false")
    assert r.status_code == 200, r.text
    assert dialog_parser.NO_SENDER in r.json()["speakers"]


def _zip_with(data: bytes, password_flag=False, corrupt=False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("_chat.txt", data * 50)
    raw = bytearray(buffer.getvalue())
    if password_flag:  # the "encrypted" bit, in the local header and the central directory
        raw[6] |= 1
        central = raw.rfind(b"PK\x01\x02")
        raw[central + 8] |= 1
    if corrupt:  # scramble the deflated data after the local header
        start = 30 + len("_chat.txt")
        raw[start:start + 8] = b"\xff" * 8
    return bytes(raw)


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b'{"chats": "x"}', "Telegram full export: 'chats.list' is missing or not a list"),
        (b"[" * 100_000, "the JSON is nested too deeply to be a chat export"),
        (b'{"messages": [' + b"[" * 50_000 + b"]" * 50_000 + b"]}", "nested too deeply"),
        (b'{"messages": [{"id": 1, "type": "message", "date_unixtime": "99999999999999999", "from": "A", "text": "x"}], "x": '
         + b"1" * 5000 + b"}", "not usable JSON"),
        (b'{"participants": [], "messages": [{"sender_name": "A", "timestamp_ms": 1e300, "content": "x"}]}', "speaker 'Олена'"),
        (_zip_with(b"31.12.23, 21:05 - A: x\n", password_flag=True), "damaged or unsupported"),
        (_zip_with(b"31.12.23, 21:05 - A: x\n", corrupt=True), "damaged or unsupported"),
        (zipped("x")[:60] + b"\x00" * 40 + zipped("x")[-22:], "damaged or unsupported"),
    ],
    ids=["chats-not-an-object", "deep-list", "deep-inside-messages", "huge-integer", "huge-timestamp", "encrypted-zip", "corrupt-zip",
         "bad-offsets-zip"],
)
def test_hostile_json_is_a_clear_422(client, env, data, fragment):
    r = upload_file(client, data, "result.json", "Олена")
    assert r.status_code == 422, r.text
    assert fragment in r.json()["detail"]
    assert list(Path(env["DATA_DIR"]).glob("*_messages.json")) == []


# --- bounded work ------------------------------------------------------------------------------------


def _seconds(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


@pytest.mark.parametrize("adversarial", [
    "a" * 60_000, "a." * 30_000 + "@", "a@" * 30_000, "a@b" + ".c" * 29_999, "1 " * 30_000, "+" + "1 " * 30_000,
    "(+1) " * 12_000, "1-" * 30_000,
], ids=["letters", "dotted-no-domain", "at-signs", "long-domain", "digits", "plus-digits", "bracketed", "dashes"])
def test_masking_is_linear(adversarial):
    plain = ("Привіт, як справи? " * 4000)[:60_000]
    assert _seconds(dialog_parser.mask_pii, adversarial) < 0.5 + 10 * _seconds(dialog_parser.mask_pii, plain)


def test_phone_region_masks_local_numbers_too(client, env, monkeypatch):
    text = "дзвони 067 123 45 67 або (044) 234-56-78, +44 20 7946 0958; 2024-01-01, 1 000 000 грн, 12:30"
    assert dialog_parser.mask_pii(text) == ("дзвони 067 123 45 67 або (044) 234-56-78, [phone]; 2024-01-01, 1 000 000 грн, 12:30", 1)
    assert dialog_parser.mask_pii(text, "UA") == ("дзвони [phone] або [phone], [phone]; 2024-01-01, 1 000 000 грн, 12:30", 3)
    for adversarial in ("1 " * 30_000, "0" * 60_000, "067 " * 15_000):  # still linear with a region
        assert _seconds(dialog_parser.mask_pii, adversarial, "UA") < 0.5 + 10 * _seconds(dialog_parser.mask_pii, "a" * 60_000, "UA")
    chat = "12.01.24, 10:00 - Андрій: Привіт\n12.01.24, 10:01 - Олена: мій номер 067 123 45 67\n"
    monkeypatch.setenv("PHONE_REGION", "ua")
    get_settings.cache_clear()
    assert upload_file(client, chat.encode(), "chat.txt", "Олена").json()["report"]["masked_pii"] == 1
    replies = client.get("/speakers/Олена/messages").json()["data"]
    assert [m["reply"] for m in replies] == ["мій номер [phone]"]
    monkeypatch.setenv("PHONE_REGION", "Ukraine")
    get_settings.cache_clear()
    with pytest.raises(ValueError, match="unknown phone region 'Ukraine': use a two-letter ISO 3166 code"):
        get_settings()


def test_masking_keeps_dates_amounts_and_isbns():
    text = "2024-01-01, 1 000 000 грн, ISBN 978-3-16-148410-0, 4111 1111 1111 1112, 12:30, +1 (555) 123-4567 is fake"
    assert dialog_parser.mask_pii(text) == (text, 0)
    masked, n = dialog_parser.mask_pii("card 4111 1111 1111 1111, call +44 20 7946 0958 or +380 67 123 45 67")
    assert masked == "card [card], call [phone] or [phone]" and n == 3


def test_zip_bomb_answers_413_without_unpacking_it(client, env, monkeypatch):
    monkeypatch.setenv("MAX_UPLOAD_BYTES", str(1024 * 1024))
    get_settings.cache_clear()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("_chat.txt", "31.12.23, 21:05 - A: " + "a" * (64 * 1024 * 1024))
    assert len(buffer.getvalue()) < 1024 * 1024
    r = upload_file(client, buffer.getvalue(), "chat.zip", "A")
    assert r.status_code == 413, r.text
    assert r.json()["detail"] == ("the .zip unpacks to more than 4194304 bytes of chat files (4 × MAX_UPLOAD_BYTES); "
                                  "export a shorter chat")
    assert list(Path(env["DATA_DIR"]).glob("*_messages.json")) == []


# --- /exports/inspect -------------------------------------------------------------------------------


def test_inspect_says_what_an_export_holds_and_stores_nothing(client, env):
    r = client.post("/exports/inspect", files={"file": ("WhatsApp Chat with Олена.txt", whatsapp_variant("android-es-a-m-p-m").encode())})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "format": "whatsapp", "chats": ["WhatsApp Chat with Олена"], "first_message": "2023-12-31T21:05:00",
        "last_message": "2024-01-13T10:00:00", "participants": [{"name": "Олена", "messages": 2}, {"name": "Andriy K", "messages": 1}],
    }
    r = client.post("/exports/inspect", files={"file": ("result.json", telegram_account_bytes())}, data={"chat": "Робота"})
    assert r.json()["chats"] == ["Робота"] and r.json()["participants"] == [{"name": "Бос", "messages": 1}, {"name": "Олена", "messages": 1}]
    r = client.post("/exports/inspect", files={"file": ("chat.txt", b"no stamps here")})
    assert r.status_code == 422 and r.json()["detail"].startswith("line 1 is not a WhatsApp message line: 'no stamps here'")
    assert not Path(env["DATA_DIR"]).exists() or list(Path(env["DATA_DIR"]).glob("*_messages.json")) == []
