"""WhatsApp forms that were refused as "not a WhatsApp message line" (issue 28, item 5): the rest of the
variants (a byte-order mark inside the bracket, time before date, month names) are in WHATSAPP_VARIANTS."""

from __future__ import annotations

from datetime import datetime

import pytest
from exports_fixtures import WHATSAPP_DAY_PERIODS, WHATSAPP_FROM_PDF

import importers as exports


@pytest.mark.parametrize("prefix, hour", WHATSAPP_DAY_PERIODS, ids=[p.split(", ")[1].strip(" -") for p, _ in WHATSAPP_DAY_PERIODS])
def test_a_day_period_phrase_sets_the_hour(prefix, hour):
    chat = exports.read_whatsapp(f"{prefix}Ана: доброго ранку\n13/01/2021, 10:00 in the morning - Ана: x\n")
    assert (chat.messages[0].speaker, chat.messages[0].text) == ("Ана", "доброго ранку")
    assert chat.messages[0].time == datetime(2021, 1, 3, hour, 15)


def test_german_ios_byte_order_mark_inside_the_first_bracket():
    data = "[\ufeff29.01.18, 12:24:03] Ана: Hallo\n[29.01.18, 12:25:00] Ben: Hi\n".encode()
    assert exports.detect_format(data, "chat") == "whatsapp"
    chat = exports.read_export(data, "_chat.txt")[0]
    assert [(m.speaker, m.text, m.time) for m in chat.messages] == [
        ("Ана", "Hallo", datetime(2018, 1, 29, 12, 24, 3)), ("Ben", "Hi", datetime(2018, 1, 29, 12, 25))]


def test_a_copied_chat_is_read_from_its_first_message_line_and_says_what_it_skipped(client):
    chat = exports.read_whatsapp(WHATSAPP_FROM_PDF)
    assert [(m.speaker, m.text) for m in chat.messages] == [("Олена", "Привіт"), ("Andriy K", "Hi"), ("Олена", "Як справи?")]
    assert chat.skipped_lines == 2
    r = client.post("/upload-file", files={"file": ("chat.txt", WHATSAPP_FROM_PDF.encode())}, data={"speaker": "Олена"})
    assert r.status_code == 200, r.text
    assert r.json()["report"]["skipped_lines"] == 2 and r.json()["added"] == 2


def test_a_text_that_never_becomes_a_chat_is_still_a_422(client):
    r = client.post("/upload-file", files={"file": ("chat.txt", b"1\nMy essay\n\nno stamps here\n")}, data={"speaker": "A"})
    assert r.status_code == 422
    assert r.json()["detail"] == ("line 1 is not a WhatsApp message line: '1'; expected '31/12/23, 21:05 - Name: text' "
                                  "or '[31.12.23, 21:05:09] Name: text'")
    many = "".join(f"line {i} of an essay\n" for i in range(51)) + "31.12.23, 21:05 - A: x\n"
    with pytest.raises(exports.ExportError, match=r"^line 1 is not a WhatsApp message line: 'line 0 of an essay'; expected .* "
                       r"\(its first message line, line 52, comes after more than 50 lines that are not\)$"):
        exports.read_whatsapp(many)
