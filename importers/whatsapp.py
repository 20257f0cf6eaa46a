"""WhatsApp chat exports (`.txt`, Android and iOS, every locale seen in public exports) → a `Chat`.

Reading only: each line is marked as a message, a system notice, a media placeholder or a deleted
message; dropping and masking are parser.clean's. Knows nothing of zips, encodings, other formats or HTTP.
"""

from __future__ import annotations

import re
from datetime import datetime

from importers.record import Chat, ChatMessage, ExportError, Kind, MessageBudget

# One pattern for every locale seen in public exports (tests/exports_fixtures.py has one of each): Android
# "31/12/2023, 9:05 p. m. - Name: text", "2023. 12. 31. 오후 9:05 - …"; iOS "[31.12.23, 21.05.09] Name: text";
# old iOS "12/31/23, 9:05:09 PM: Name: text". Spaces may be U+00A0 or U+202F; AM/PM may precede the time; English
# phones may write a day period instead ("9:15 in the morning", ICU's en day periods).
_WA_LINE = re.compile(
    r"^(?P<open>\[)?"
    r"(?P<a>\d{1,4})(?P<sep>[./-])\s?(?P<b>\d{1,2})(?P=sep)\s?(?P<c>\d{1,4})\.?"
    r",?\s(?:(?P<pre>[^\W\d_]{1,5}\.?)\s?)?"
    r"(?P<hour>\d{1,2})[:.](?P<minute>\d{2})(?:[:.](?P<second>\d{2}))?\.?"
    r"(?:\s(?P<period>in the (?:morning|afternoon|evening)|at night)|\s?(?P<post>[^\W\d_]{1,5}\.?(?:\s?[^\W\d_]{1,5}\.?)?))?"
    r"(?(open)\]\s?(?:[-–]\s)?|(?:\s[-–]\s|:\s))"
    r"(?P<body>.*)$"
)
# Time before the date: Vietnamese iOS "[14:56:01, 3/18/22] Name: text"; old Android "19:23, 28 Aug 2013 - Name: text".
_WA_TIME_FIRST = re.compile(
    r"^(?P<open>\[)?"
    r"(?P<hour>\d{1,2})[:.](?P<minute>\d{2})(?:[:.](?P<second>\d{2}))?(?:\s?(?P<post>[AaPp]\.?\s?[Mm]\.?))?,\s"
    r"(?:(?P<a>\d{1,4})(?P<sep>[./-])(?P<b>\d{1,2})(?P=sep)(?P<c>\d{1,4})|(?P<day>\d{1,2})\s(?P<month>[A-Za-z]{3,9})\.?\s(?P<year>\d{4}))"
    r"(?(open)\]\s?(?:[-–]\s)?|\s[-–]\s)"
    r"(?P<body>.*)$"
)
_MONTHS = {name: number for number, name in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov",
                                                       "dec"), start=1)}
_MAX_SKIPPED = 50  # lines before the first message line that are read past (a copied page's number, title, header)
# AM/PM words, without dots and spaces, lower case: English, Spanish/Portuguese ("a. m."), German,
# Japanese, Chinese, Korean, Arabic, Greek, Hungarian, Vietnamese, Finnish, Swedish/Norwegian, Czech, Persian.
_AM = {"am", "vorm", "午前", "上午", "오전", "ص", "πμ", "de", "sa", "ap", "fm", "dop", "قظ"}
_PM = {"pm", "nachm", "午後", "下午", "오후", "م", "μμ", "du", "ch", "ip", "em", "odp", "بظ"}
_WA_MEDIA = re.compile(
    r"^(<[^<>]{3,80}>"  # Android: <Media omitted>, <Medien ausgeschlossen>, <Multimedia omitido>, <Médias omis>, <attached: …>
    r"|(.+ )?(image|video|audio|sticker|GIF|document|Contact card|imagen|vídeo|foto|Bild|Video|Audio|Sticker|GIF|Dokument"
    r"|Kontaktkarte|documento|tarjeta de contacto|image absente|vidéo absente|audio omis|imagem|arquivo de mídia|afbeelding)"
    r" (omitted|omitida|omitido|weggelassen|ausgeschlossen|omis|omise|absente|ocultad[oa]|oculta|omessa|omesso|weggelaten)"
    r"|.+ \((file attached|Datei angehängt|archivo adjunto|fichier joint|arquivo anexado|file allegato|ファイル添付)\)"
    r"|.+ <(attached|adjunto|Anhang|pièce jointe|anexo): [^<>]+>|POLL:\n.+\nOPTION: [\s\S]+|null)$",
    re.IGNORECASE,
)
_WA_DELETED = re.compile(
    r"^(This message was deleted|You deleted this message|Це повідомлення видалено|Ви видалили це повідомлення"
    r"|Это сообщение удалено|Вы удалили это сообщение|Diese Nachricht wurde gelöscht|Du hast diese Nachricht gelöscht"
    r"|Se eliminó este mensaje|Eliminaste este mensaje|Este mensaje fue eliminado|Ce message a été supprimé"
    r"|Vous avez supprimé ce message|Questo messaggio è stato eliminato|Hai eliminato questo messaggio"
    r"|Mensagem apagada|Essa mensagem foi apagada|Você apagou esta mensagem|Dit bericht is verwijderd"
    r"|Je hebt dit bericht verwijderd|Bu mesaj silindi|Bu mesajı sildiniz)\.?$",
    re.IGNORECASE,
)
# iOS puts an author on system notices (and marks them with U+200E): recognise them by their text.
# Phrases no one types in a chat count always; everyday words ("added", "left") only on marked lines.
_WA_SYSTEM = re.compile(
    r"(Messages and calls are end-to-end encrypted|Messages (you send )?to this (group|chat) are now secured"
    r"|end-to-end[- ]verschlüsselt|Ende-zu-Ende-verschlüsselt|cifrad[oa]s de extremo a extremo"
    r"|chiffrés de bout en bout|crittografati end-to-end|protegidas com a criptografia de ponta a ponta"
    r"|criptografad[oa]s de ponta a ponta|защищены сквозным шифрованием|захищені наскрізним шифруванням"
    r"|uçtan uca şifreli|end-to-end versleuteld|This business uses a secure service from Meta"
    r"|^(You were added|Missed (group )?(voice|video) call)\.?$"
    r"|\b(created (this group$|group [\"“«])|changed the subject|changed this group's icon|changed the group description"
    r"|deleted this group's icon|joined using this group's invite link|changed their phone number"
    r"|a créé le groupe|hat die Gruppe .{0,40}erstellt|creó el grupo|ha creato il gruppo|criou o grupo"
    r"|создал\(а\)? группу|створив\(ла\)? групу|hat das Gruppenbild geändert|hat die Gruppe verlassen)\b"
    r"|security code (with .+ )?changed|Sicherheitsnummer .+ geändert|^\S+( \S+)? hat .+ (hinzugefügt|entfernt)\.$)",
    re.IGNORECASE,
)
_WA_SYSTEM_MARKED = re.compile(r"(\b(added|removed|left|hinzugefügt|entfernt|verlassen|beigetreten|añadió|eliminó|salió|a ajouté"
                               r"|a retiré|est parti|adicionou|removeu|saiu)\b|Missed (voice|video) call|Verpasster (Sprach|Video)anruf"
                               r"|is a contact)", re.IGNORECASE)
# Searched for, not subbed with a leading \s*: that retries the run of spaces at each of its starts (quadratic).
_WA_EDITED = re.compile(r"\u200e?<(This message was edited|Se editó este mensaje\.?|Diese Nachricht wurde bearbeitet\.?"
                        r"|Ce message a été modifié\.?|Mensagem editada|Questo messaggio è stato modificato\.?|Dit bericht is bewerkt\.?)>$")
_INVISIBLE = "\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2060\ufeff"


def read_whatsapp(text: str, name: str = "chat", budget: MessageBudget | None = None) -> Chat:
    """Lines starting with a timestamp begin a message; others continue the one before it."""
    raw: list[tuple[dict, list[str]]] = []  # a message's lines, joined once: += on a long message is quadratic
    skipped: list[tuple[int, str]] = []  # lines before the first message line: a copied page's number and title
    for number, line in enumerate(text.splitlines(), start=1):
        stamp = _stamp(line)
        if stamp:
            if skipped and len(skipped) > _MAX_SKIPPED:
                raise _not_a_line(*skipped[0], f" (its first message line, line {number}, comes after more than "
                                                f"{_MAX_SKIPPED} lines that are not)")
            if budget:
                budget.take(1)
            raw.append((stamp, [stamp["body"]]))
        elif raw:
            raw[-1][1].append(line.strip(_INVISIBLE))
        elif clean := line.strip(_INVISIBLE + " \t"):
            skipped.append((number, clean))
    if not raw and skipped:
        raise _not_a_line(*skipped[0])
    if not raw:
        raise ExportError("no WhatsApp message lines found (expected '12/31/23, 21:05 - Name: text' or '[31.12.23, 21:05:09] Name: text')")
    day_first = _day_first([stamp for stamp, _ in raw])
    messages = []
    for i, (stamp, lines) in enumerate(raw):
        time, body = _wa_time(stamp, day_first), "\n".join(lines)
        speaker, sep, text = body.rstrip("\n").partition(": ")
        if not sep and body.endswith(":") and "\n" not in body:  # "Name:" with nothing after it
            speaker, sep, text = body[:-1], ":", ""
        if not sep:  # Android (and some iOS) system lines: no author
            messages.append(ChatMessage(speaker="", text=body, kind="system", id=i, time=time))
            continue
        marked = text.startswith("\u200e")
        text = _without_edit_marker(text.strip(_INVISIBLE))
        bare = text.replace("\u200e", "").strip()  # iOS marks words inside notices too: "x.pdf • \u200e9 pages \u200edocument omitted"
        kind: Kind = "message"
        if _WA_MEDIA.match(bare):
            kind = "media"
        elif _WA_DELETED.match(bare):
            kind = "deleted"
        elif _WA_SYSTEM.search(text) or (marked and _WA_SYSTEM_MARKED.search(text)):
            kind = "system"
        speaker = re.sub(r"^~[\s\u202f]", "", speaker.strip(_INVISIBLE + " "))  # iOS: "~ Name" for non-contacts
        messages.append(ChatMessage(speaker=speaker.strip(), text=text, kind=kind, id=i, time=time))
    return Chat(name=name, id=None, messages=messages, skipped_lines=len(skipped))


def _stamp(line: str) -> dict | None:
    """The groups of a message line's timestamp and its body, or None. German iOS puts a BOM inside the first bracket."""
    clean = line.strip(_INVISIBLE + " \t")
    if clean[:1] == "[":
        clean = "[" + clean[1:].lstrip(_INVISIBLE)
    match = _WA_LINE.match(clean) or _WA_TIME_FIRST.match(clean)
    return match.groupdict() if match else None


def _not_a_line(number: int, clean: str, why: str = "") -> ExportError:
    return ExportError(f"line {number} is not a WhatsApp message line: {clean[:80]!r}; expected '31/12/23, 21:05 - Name: text' "
                       f"or '[31.12.23, 21:05:09] Name: text'{why}")


def _without_edit_marker(text: str) -> str:
    marker = _WA_EDITED.search(text) if text.endswith(">") else None
    return text[:marker.start()].rstrip() if marker else text


def _day_first(stamps: list[dict]) -> bool:
    """Infer the date order across the whole file: a first number over 12 means day-first, a
    second over 12 month-first; with neither, day-first (the order of most locales)."""
    firsts = [int(s["a"]) for s in stamps if s.get("a") and len(s["a"]) <= 2]
    seconds = [int(s["b"]) for s in stamps if s.get("a") and len(s["a"]) <= 2]
    if any(n > 12 for n in firsts):
        return True
    if any(n > 12 for n in seconds):
        return False
    return True


def _wa_time(stamp: dict, day_first: bool) -> datetime | None:
    a, b, c = stamp.get("a"), stamp.get("b"), stamp.get("c")
    if stamp.get("month"):  # 28 Aug 2013
        year, month, day = int(stamp["year"]), _MONTHS.get(stamp["month"][:3].lower(), 0), int(stamp["day"])
    elif len(a) == 4:  # 2023-12-31, 2021. 1. 26.
        year, month, day = int(a), int(b), int(c)
    else:
        day, month = (int(a), int(b)) if day_first else (int(b), int(a))
        year = int(c) + (2000 if len(c) <= 2 else 0)
    hour = int(stamp["hour"])
    for word in (stamp.get("pre"), stamp.get("post")):
        key = re.sub(r"[\s.]", "", word or "").lower()
        if key in _AM or key in _PM:
            hour = hour % 12 + (12 if key in _PM else 0)
    if stamp.get("period"):  # morning AM; afternoon, evening PM; night from 21:00 to 06:00 (10 at night is 22, 2 at night is 2)
        pm = stamp["period"] in ("in the afternoon", "in the evening") or (stamp["period"] == "at night" and 6 <= hour < 12)
        hour = hour % 12 + (12 if pm else 0)
    try:
        return datetime(year, month, day, hour, int(stamp["minute"]), int(stamp["second"] or 0))
    except ValueError:
        return None


def looks_like_whatsapp(first_line: str) -> bool:
    """Whether a text's first line is a WhatsApp message line (format detection)."""
    return _stamp(first_line) is not None
