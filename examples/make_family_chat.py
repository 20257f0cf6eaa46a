"""Write examples/family_chat.txt: a made-up family group chat, as WhatsApp for Android exports it.

Three people with a voice each, written for this project (no text copied from anywhere):
- Mia, 16, in sixth form in Sheffield: lower case, emoji, several short messages in a row;
- Dad (Mia's dad), a signal engineer on the Sheffield trams: terse, full stops, dry;
- Grandma (Dad's mother), in Whitby by the sea: warm, long, signs her messages.

Facts come back across the weeks, so a persona's memory has something to recall: Biscuit the
beagle (eats socks, bins and remotes), Mia's Saturday job at the Bean Counter café, volleyball on
Thursdays, her biology mock, her birthday on 4 November (17) and Grandma's lemon drizzle cake, Dad's
trams and his chilli, Grandma's neighbour Maureen, her bad knee and her garden.

The scenes are hand-written, in examples/family_scenes.txt; this script only lays them out on dates
and times (deterministic: the same file every run) in the Android export's form
`dd/mm/yyyy, HH:MM - Name: text`, a multi-line message's later lines on lines of their own, after the
lines WhatsApp writes when a group is made. Run from the repository root:

    python examples/make_family_chat.py        # writes examples/family_chat.txt
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from pathlib import Path

HERE = Path(__file__).parent
PEOPLE = ("Mia", "Dad", "Grandma")
Scene = tuple[str, str, list[tuple[str, str]]]  # (date, first message's time, [(who, text), ...])


def scenes(text: str | None = None) -> list[Scene]:
    """The scenes of family_scenes.txt: '== date time' opens one, 'Name: text' is a message, a line
    beginning with two spaces continues the message before it; '#' lines are comments."""
    out: list[Scene] = []
    for line in (text if text is not None else (HERE / "family_scenes.txt").read_text(encoding="utf-8")).splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("== "):
            day, start = line[3:].split()
            out.append((day, start, []))
        elif line.startswith("  "):
            who, said = out[-1][2][-1]
            out[-1][2][-1] = (who, said + "\n" + line[2:])
        else:
            who, _, said = line.partition(": ")
            assert who in PEOPLE and said, f"not a message line: {line!r}"
            out[-1][2].append((who, said))
    return out


def render() -> str:
    """The export's text: the group's system lines, then every scene's messages on its date."""
    rng = random.Random(17)  # the same gaps every run: the file never changes unless the scenes do
    lines = ["01/10/2023, 19:02 - Messages and calls are end-to-end encrypted. No one outside of this chat, "
             "not even WhatsApp, can read or listen to them. Tap to learn more.",
             "01/10/2023, 19:02 - Dad created group \"Family 🏡\"",
             "01/10/2023, 19:03 - Dad added Mia",
             "01/10/2023, 19:03 - Dad added Grandma"]
    for day, start, turns in scenes():
        at = datetime.fromisoformat(f"{day} {start}")
        for i, (who, text) in enumerate(turns):
            if i:
                at += timedelta(minutes=rng.choice([0, 1, 1, 2, 2, 3, 4, 6, 9]))
            lines.append(f"{at:%d/%m/%Y, %H:%M} - {who}: {text}")
    return "\n".join(lines) + "\n"


def main() -> None:
    out = HERE / "family_chat.txt"
    out.write_text(render(), encoding="utf-8")
    counts = {who: sum(t[0] == who for _, _, turns in scenes() for t in turns) for who in PEOPLE}
    print(f"{out}: {sum(counts.values())} messages", counts)


if __name__ == "__main__":
    main()
