"""Export files written by the tests: Telegram Desktop JSON and WhatsApp text in both styles."""

from __future__ import annotations

import io
import json
import zipfile

MEDIA = "(File not included. Change data exporting settings to download.)"


def telegram_chat(name="Андрій", chat_id=4242) -> dict:
    return {
        "name": name, "type": "personal_chat", "id": chat_id,
        "messages": [
            {"id": 1, "type": "service", "date": "2023-12-31T21:00:00", "actor": "Олена", "action": "phone_call", "text": ""},
            {"id": 2, "type": "message", "date": "2023-12-31T21:05:00", "from": "Андрій", "from_id": "user1", "text": "Привіт! Як справи?"},
            {"id": 3, "type": "message", "date": "2023-12-31T21:06:00", "from": "Олена", "from_id": "user2",
             "text": ["Все ", {"type": "bold", "text": "добре"}, ", дякую"]},
            {"id": 4, "type": "message", "date": "2023-12-31T21:06:10", "from": "Олена", "from_id": "user2", "text": "А в тебе?"},
            {"id": 5, "type": "message", "date": "2023-12-31T21:07:00", "from": "Андрій", "from_id": "user1",
             "photo": MEDIA, "width": 1280, "height": 720, "text": ""},
            {"id": 6, "type": "message", "date": "2023-12-31T21:08:00", "from": "Андрій", "from_id": "user1",
             "text": ["Пиши на ", {"type": "email", "text": "andriy@example.com"}, " або дзвони +380 67 123 45 67"]},
            {"id": 7, "type": "message", "date": "2023-12-31T21:09:00", "from": "Олена", "from_id": "user2",
             "reply_to_message_id": 2, "text": "Відповідаю на привіт: у мене все чудово"},
            {"id": 8, "type": "unsupported", "date": "2023-12-31T21:10:00", "from": "Андрій", "from_id": "user1"},
            {"id": 9, "type": "message", "date": "2023-12-31T21:11:00", "from": None, "from_id": "user9", "text": "я видалений акаунт"},
            {"id": 10, "type": "message", "date": "2024-01-01T09:00:00", "from": "Андрій", "from_id": "user1", "text": "Доброго ранку!"},
            {"id": 11, "type": "message", "date": "2024-01-01T09:01:00", "from": "Олена", "from_id": "user2",
             "text": "Доброго! Картка 4111 1111 1111 1111 не моя 😊"},
        ],
    }


def telegram_bytes(**kwargs) -> bytes:
    return json.dumps(telegram_chat(**kwargs), ensure_ascii=False).encode()


def telegram_account_bytes() -> bytes:
    other = {"name": "Робота", "type": "private_group", "id": 777, "messages": [
        {"id": 1, "type": "message", "date": "2024-02-01T10:00:00", "from": "Бос", "text": "Звіт готовий?"},
        {"id": 2, "type": "message", "date": "2024-02-01T10:01:00", "from": "Олена", "text": "Так, надіслала"},
    ]}
    return json.dumps({"about": "export", "chats": {"about": "chats", "list": [telegram_chat(), other]}}, ensure_ascii=False).encode()


WHATSAPP_ANDROID = """12/31/23, 9:05 PM - Messages and calls are end-to-end encrypted. No one outside of this chat, not even WhatsApp, can read or listen to them. Tap to learn more.
12/31/23, 9:05 PM - Andriy: Hi! How are you?
12/31/23, 9:06 PM - Olena K: Fine, thanks.
And a second line
and a third
12/31/23, 9:07 PM - Andriy: <Media omitted>
12/31/23, 9:08 PM - Olena K: This message was deleted
12/31/23, 9:09 PM - Andriy added Olena K
1/13/24, 10:00 AM - Andriy: New day: I added sugar
1/13/24, 10:01 AM - Olena K: Mail me at olena@example.org
"""

WHATSAPP_IOS = (
    "\u200e[31.12.23, 21:05:09] Олена: \u200eMessages and calls are end-to-end encrypted. No one outside of this chat can read them.\n"
    "[31.12.23, 21:05:10] Андрій: Привіт\n"
    "[31.12.23, 21:06:00] Олена: \u200eimage omitted\n"
    "[31.12.23, 21:06:30] Олена: Все добре\n"
    "ще рядок\n"
    "\u200e[31.12.23, 21:07:00] Андрій: \u200eАндрій added Олена\n"
    "[13.01.24, 09:00:00] Андрій: Новий рік, я left the building\n"
    "[13.01.24, 09:01:00] Олена: Гарного дня\n"
)


def zipped(text: str | bytes, name: str = "_chat.txt") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, text)
        archive.writestr("IMG-0001.jpg", b"\xff\xd8\xff")
    return buffer.getvalue()


# --- WhatsApp: one variant per locale and version seen in public exports ---------------------------
# Each is the line prefix of a message on 31 Dec 2023 21:05:09 and one on 13 Jan 2024 10:00 (13 > 12,
# so the date order is decidable); the messages themselves are invented.
WHATSAPP_VARIANTS = {
    "android-en-us-12h": ("12/31/23, 9:05 PM - ", "1/13/24, 10:00 AM - "),
    "android-en-us-12h-narrow-nbsp": ("12/31/23, 9:05\u202fPM - ", "1/13/24, 10:00\u202fAM - "),
    "android-en-gb-24h": ("31/12/2023, 21:05 - ", "13/01/2024, 10:00 - "),
    "android-de-24h-dots": ("31.12.23, 21:05 - ", "13.01.24, 10:00 - "),
    "android-de-seconds": ("31.12.2023, 21:05:09 - ", "13.01.2024, 10:00:00 - "),
    "android-dash-date-12h": ("31-12-2023, 09:05:09 PM - ", "13-01-2024, 10:00:00 AM - "),
    "android-es-a-m-p-m": ("31/12/2023, 9:05 p. m. - ", "13/1/2024, 10:00 a. m. - "),
    "android-es-no-comma": ("31/12/2023 9:05 p. m. - ", "13/1/2024 10:00 a. m. - "),
    "android-es-nbsp-ampm": ("31/12/23, 9:05\u202fp.\u00a0m. - ", "13/1/24, 10:00\u202fa.\u00a0m. - "),
    "android-en-lower-p.m.": ("12/31/2023 9:05 p.m. - ", "1/13/2024 10:00 a.m. - "),
    "android-de-nachm": ("31.12.23, 9:05 nachm. - ", "13.01.24, 10:00 vorm. - "),
    "android-fi-klo": ("31.12.2023 klo 21.05.09 - ", "13.1.2024 klo 10.00 - "),
    "android-iso": ("2023-12-31, 21:05 - ", "2024-01-13, 10:00 - "),
    "android-ja-year-first": ("2023/12/31, 21:05 - ", "2024/01/13, 10:00 - "),
    "android-ja-trailing-dot": ("2023/12/31, 21:05. - ", "2024/01/13, 10:00. - "),
    "android-ja-gogo": ("2023/12/31 午後9:05 - ", "2024/01/13 午前10:00 - "),
    "android-zh-xiawu": ("2023/12/31 下午9:05 - ", "2024/1/13 上午10:00 - "),
    "android-ko": ("2023. 12. 31. 오후 9:05 - ", "2024. 1. 13. 오전 10:00 - "),
    "android-en-dash-en-dash": ("31/12/2023, 21:05 – ", "13/01/2024, 10:00 – "),
    "ios-de": ("[31.12.23, 21:05:09] ", "[13.01.24, 10:00:00] "),
    "ios-dot-time-no-comma": ("[31/12/23 21.05.09] ", "[13/01/24 10.00.00] "),
    "ios-us-12h-narrow-nbsp": ("[12/31/23, 9:05:09\u202fPM] ", "[1/13/24, 10:00:00\u202fAM] "),
    "ios-month-first-dots": ("[12.31.23, 21:05:09] ", "[01.13.24, 10:00:00] "),
    "ios-year-first-a-m": ("[2023/12/31 9:05:09 p. m.] ", "[2024/01/13 10:00:00 a. m.] "),
    "ios-no-seconds": ("[31.12.23, 21:05] ", "[13.01.24, 10:00] "),
    "ios-old-no-brackets": ("12/31/23, 9:05:09 PM: ", "1/13/24, 10:00:00 AM: "),
    "ios-old-24h-no-brackets": ("31.12.23 21.05.09: ", "13.01.24 10.00.00: "),
    "ios-de-bom-in-bracket": ("[\ufeff31.12.23, 21:05:09] ", "[\ufeff13.01.24, 10:00:00] "),
    "ios-vi-time-first": ("[21:05:09, 12/31/23] ", "[10:00:00, 1/13/24] "),
    "android-en-day-period": ("12/31/2023, 9:05 in the evening - ", "1/13/2024, 10:00 in the morning - "),
    "android-old-time-first-month-name": ("21:05, 31 Dec 2023 - ", "10:00, 13 Jan 2024 - "),
}

# The 12-hour clock with day periods (ICU's English "night" runs 21:00-06:00): the line, its hour on the 24-hour clock.
WHATSAPP_DAY_PERIODS = [
    ("03/01/2021, 9:15 in the morning - ", 9), ("03/01/2021, 12:15 in the afternoon - ", 12),
    ("03/01/2021, 3:15 in the afternoon - ", 15), ("03/01/2021, 7:15 in the evening - ", 19),
    ("03/01/2021, 10:15 at night - ", 22), ("03/01/2021, 12:15 at night - ", 0), ("03/01/2021, 2:15 at night - ", 2),
]

# A chat copied out of a PDF (or a web page): a page number and a title before the first message line.
WHATSAPP_FROM_PDF = (
    "1\nWhatsApp chat with Олена — printed 14.01.24\n\n"
    "31.12.23, 21:05 - Олена: Привіт\n31.12.23, 21:06 - Andriy K: Hi\n31.12.23, 21:07 - Олена: Як справи?\n"
)


def whatsapp_variant(key: str) -> str:
    """A chat in that variant: a system line, two speakers, a multi-line message, a media placeholder."""
    first, second = WHATSAPP_VARIANTS[key]
    system = "Messages and calls are end-to-end encrypted. Tap to learn more."
    if first.startswith("["):  # iOS: the notice carries the chat's name and a U+200E mark
        system = "Олена: \u200e" + system
    return (f"{first}{system}\n{first}Олена: Привіт 👋\nдругий рядок\n{first}Andriy K: <Media omitted>\n"
            f"{second}Andriy K: Hi: all good\n{second}Олена: Добре\n")


def encoded(text: str, how: str) -> bytes:
    """The same chat as different phones write it."""
    return {
        "utf-8": text.encode(), "bom": "\ufeff".encode() + text.encode(), "crlf": text.replace("\n", "\r\n").encode(),
        "utf-16-le": text.replace("\n", "\r\n").encode("utf-16"), "utf-16-be": b"\xfe\xff" + text.encode("utf-16-be"),
    }[how]


# Localised placeholders and notices: (the message text, the kind it must be read as)
WHATSAPP_LOCALISED = [
    ("<Medien ausgeschlossen>", "media"), ("<Multimedia omitido>", "media"), ("<Médias omis>", "media"),
    ("<Media weggelaten>", "media"), ("<Без медиафайлов>", "media"), ("\u200eimagen omitida", "media"),
    ("\u200eBild weggelassen", "media"), ("\u200e<adjunto: 00000004-PHOTO-2023-12-31-21-05-09.jpg>", "media"),
    ("\u200e<attached: 00000012-PHOTO-2023-12-31-21-05-09.jpg>", "media"), ("IMG-20231231-WA0001.jpg (Datei angehängt)", "media"),
    ("Diese Nachricht wurde gelöscht.", "deleted"), ("Se eliminó este mensaje.", "deleted"), ("Ce message a été supprimé", "deleted"),
    ("\u200eNachrichten und Anrufe sind Ende-zu-Ende-verschlüsselt. Niemand außerhalb dieses Chats kann sie lesen.", "system"),
    ("Los mensajes y las llamadas están cifrados de extremo a extremo. Nadie fuera de este chat puede leerlos.", "system"),
    ("Les messages et les appels sont chiffrés de bout en bout.", "system"),
    ("Ана hat die Gruppe „Urlaub“ erstellt", "system"), ("Ана creó el grupo “Viaje”", "system"),
    ("\u200eafbeelding weggelaten", "media"), ("Rechner.pdf • \u200e1 Seite \u200eDokument weggelassen", "media"),
    ("Notes.pdf • \u200e9 pages \u200edocument omitted", "media"),
    ("\u200eBerichten en gesprekken worden end-to-end versleuteld. Niemand buiten deze chat kan ze lezen.", "system"),
    ("\u200eAna hat dich hinzugefügt.", "system"), ("\u200eAna hat ~\u202fBen und 4 weitere Personen hinzugefügt. Tippe, um alle zu sehen.", "system"),
    ("\u200e~\u202fBen hat das Gruppenbild geändert.", "system"),
    ("Script.docx • 8 pages <attached: 00000172-Script.docx>", "media"), ("POLL:\nPizza?\nOPTION: yes (7 votes)\nOPTION: no (0 votes)", "media"),
    ("~\u202fAna created this group", "system"), ("You were added", "system"), ("Missed voice call", "system"),
    ("Hey! Created this group so we can stay in touch", "message"), ("Ich habe <Medien> gern", "message"), ("null pointer again", "message"), ("Wir haben Salz hinzugefügt", "message"),
]


# --- Discord and Messenger ---------------------------------------------------------------------------


def discord_bytes() -> bytes:
    """DiscordChatExporter JSON, invented messages."""
    author = lambda name, nick=None: {"id": str(abs(hash(name)) % 10**18), "name": name, "nickname": nick or name}
    return json.dumps({
        "guild": {"id": "1", "name": "Гільдія"}, "channel": {"id": "42", "type": "GuildTextChat", "name": "загальний"},
        "messages": [
            {"id": "100", "type": "GuildMemberJoin", "timestamp": "2024-01-01T10:00:00+00:00", "content": "", "author": author("olena_k", "Олена")},
            {"id": "101", "type": "Default", "timestamp": "2024-01-01T10:01:00.123+00:00", "content": "Привіт усім", "author": author("olena_k", "Олена"), "attachments": []},
            {"id": "102", "type": "Default", "timestamp": "2024-01-01T10:02:00+02:00", "content": "", "author": author("andriy"), "attachments": [{"id": "9", "url": "a.png", "fileName": "a.png"}]},
            {"id": "103", "type": "Reply", "timestamp": "2024-01-01T10:03:00+00:00", "content": "І тобі привіт", "author": author("andriy"), "reference": {"messageId": "101", "channelId": "42"}},
            {"id": "104", "type": "Default", "timestamp": "2024-01-01T10:04:00", "content": "Як справи?", "author": author("olena_k", "Олена")},
        ],
        "messageCount": 5,
    }, ensure_ascii=False).encode()


def _meta(text: str) -> str:
    """Meta's mis-encoding: UTF-8 bytes written as latin-1 code points."""
    return text.encode("utf-8").decode("latin-1")


def messenger_bytes() -> bytes:
    """Facebook Messenger message_1.json, newest first, text mis-encoded, invented messages."""
    return json.dumps({
        "participants": [{"name": _meta("Олена")}, {"name": "Andriy K"}],
        "messages": [
            {"sender_name": "Andriy K", "timestamp_ms": 1704103500000, "content": _meta("Чудово ❤️"), "type": "Generic"},
            {"sender_name": _meta("Олена"), "timestamp_ms": 1704103440000, "photos": [{"uri": "photos/1.jpg"}], "type": "Generic"},
            {"sender_name": _meta("Олена"), "timestamp_ms": 1704103380000, "content": _meta("Дивись, що я знайшла"), "type": "Generic"},
            {"sender_name": "Andriy K", "timestamp_ms": 1704103320000, "content": "Andriy K started a call.", "type": "Call"},
            {"sender_name": "Andriy K", "timestamp_ms": 1704103260000, "content": "Café au lait?", "type": "Generic"},
        ],
        "title": _meta("Олена"), "is_still_participant": True, "thread_type": "Regular", "thread_path": "inbox/olena_123",
    }).encode()
