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


def zipped(text: str, name: str = "_chat.txt") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, text)
        archive.writestr("IMG-0001.jpg", b"\xff\xd8\xff")
    return buffer.getvalue()
