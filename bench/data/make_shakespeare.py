"""Build bench/data/shakespeare.json from the raw tinyshakespeare excerpt.

The raw text (tinyshakespeare_coriolanus_richard_iii.txt, next to this file)
is the first 317,026 bytes of data/tinyshakespeare/input.txt in the GitHub
repository karpathy/char-rnn, unchanged: the whole of *Coriolanus* followed
by the whole of *Richard III*, as "NAME:" lines, each followed by the speech,
with blank lines between speeches. The file has no play, act or scene
markers and no stage directions.

Conversion rules:
  * scenes: the act/scene divisions of the Moby/MIT text that tinyshakespeare
    was cut from (see bench/data/README.md). SCENES below gives, for each
    scene, the speaker and first line of its first speech. Each anchor must
    match exactly one speech, and the anchors must come in order, starting
    at the first speech;
  * a "lost" speech, a "NAME:" line with no words (tinyshakespeare dropped
    every speech that held a bracketed direction), is removed. The scene is
    split there, so no reply follows a turn it did not answer. The parts are
    titled "... (part k of n)";
  * aliases of one person are merged (ALIASES). Other names are title-cased
    with make_play.speaker_name;
  * line breaks and runs of spaces become single spaces (make_play.clean).

Usage:
    python bench/data/make_shakespeare.py            # rewrite the JSON
    python bench/data/make_shakespeare.py --check    # fail if the JSON is stale
"""
from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

try:
    from bench.data.make_play import assemble, clean, run_cli, speaker_name
except ImportError:  # run as a script: bench/data is on sys.path instead
    from make_play import assemble, clean, run_cli, speaker_name

HERE = Path(__file__).resolve().parent
RAW = HERE / "tinyshakespeare_coriolanus_richard_iii.txt"
OUT = HERE / "shakespeare.json"
# sha256 of the raw bytes: a changed or re-encoded copy fails loudly
RAW_SHA256 = "2443e759d5c264434fae34891cf12cd9116876bdac5a66d46e77bfbf8fea8f99"

# "MENENIUS:" / "First Citizen:" / "Senators, &C:" on a line, then the speech
SPEECH = re.compile(r"\A([A-Za-z][A-Za-z ,&]*):(?:\n(.*))?\Z", re.S)

# raw label -> name, per play: several labels for one person
ALIASES = {
    "Coriolanus": {
        "MARCIUS": "Coriolanus",       # Caius Marcius, named Coriolanus in I.ix
        "CORIOLANUS": "Coriolanus",
        "TITUS": "Lartius",            # Titus Lartius
        "LARTIUS": "Lartius",
    },
    "Richard III": {
        "GLOUCESTER": "Richard",       # Duke of Gloucester, crowned in IV.ii
        "KING RICHARD III": "Richard",
        "STANLEY": "Stanley",          # Lord Stanley, Earl of Derby
        "LORD STANLEY": "Stanley",
        "DERBY": "Stanley",
        "Second murderer": "Second Murderer",
    },
}

# (play, act.scene, place, raw speaker label, first line of the scene's first speech)
SCENES = [
    ("Coriolanus", "I.i", "Rome. A street.", "First Citizen", "Before we proceed any further, hear me speak."),
    ("Coriolanus", "I.ii", "Corioli. The Senate-house.", "First Senator", "So, your opinion is, Aufidius,"),
    ("Coriolanus", "I.iii", "Rome. A room in Marcius' house.", "VOLUMNIA", "I pray you, daughter, sing; or express yourself in a"),
    ("Coriolanus", "I.iv", "Before Corioli.", "MARCIUS", "Yonder comes news. A wager they have met."),
    ("Coriolanus", "I.v", "Corioli. A street.", "First Roman", "This will I carry to Rome."),
    ("Coriolanus", "I.vi", "Near the camp of Cominius.", "COMINIUS", "Breathe you, my friends: well fought;"),
    ("Coriolanus", "I.vii", "The gates of Corioli.", "LARTIUS", "So, let the ports be guarded: keep your duties,"),
    ("Coriolanus", "I.viii", "A field of battle.", "MARCIUS", "I'll fight with none but thee; for I do hate thee"),
    ("Coriolanus", "I.ix", "The Roman camp.", "COMINIUS", "If I should tell thee o'er this thy day's work,"),
    ("Coriolanus", "I.x", "The camp of the Volsces.", "AUFIDIUS", "The town is ta'en!"),
    ("Coriolanus", "II.i", "Rome. A public place.", "MENENIUS", "The augurer tells me we shall have news to-night."),
    ("Coriolanus", "II.ii", "The same. The Capitol.", "First Officer", "Come, come, they are almost here. How many stand"),
    ("Coriolanus", "II.iii", "The same. The Forum.", "First Citizen", "Once, if he do require our voices, we ought not to deny him."),
    ("Coriolanus", "III.i", "Rome. A street.", "CORIOLANUS", "Tullus Aufidius then had made new head?"),
    ("Coriolanus", "III.ii", "A room in Coriolanus's house.", "CORIOLANUS", "Let them puff all about mine ears, present me"),
    ("Coriolanus", "III.iii", "The same. The Forum.", "BRUTUS", "In this point charge him home, that he affects"),
    ("Coriolanus", "IV.i", "Rome. Before a gate of the city.", "CORIOLANUS", "Come, leave your tears: a brief farewell: the beast"),
    ("Coriolanus", "IV.ii", "The same. A street near the gate.", "SICINIUS", "Bid them all home; he's gone, and we'll no further."),
    ("Coriolanus", "IV.iii", "A highway between Rome and Antium.", "Roman", "I know you well, sir, and you know"),
    ("Coriolanus", "IV.iv", "Antium. Before Aufidius's house.", "CORIOLANUS", "A goodly city is this Antium. City,"),
    ("Coriolanus", "IV.v", "The same. A hall in Aufidius's house.", "First Servingman", "Wine, wine, wine! What service"),
    ("Coriolanus", "IV.vi", "Rome. A public place.", "SICINIUS", "We hear not of him, neither need we fear him;"),
    ("Coriolanus", "IV.vii", "A camp, at a small distance from Rome.", "AUFIDIUS", "Do they still fly to the Roman?"),
    ("Coriolanus", "V.i", "Rome. A public place.", "MENENIUS", "No, I'll not go: you hear what he hath said"),
    ("Coriolanus", "V.ii", "Entrance of the Volscian camp before Rome.", "First Senator", "Stay: whence are you?"),
    ("Coriolanus", "V.iii", "The tent of Coriolanus.", "CORIOLANUS", "We will before the walls of Rome tomorrow"),
    ("Coriolanus", "V.iv", "Rome. A public place.", "MENENIUS", "See you yond coign o' the Capitol, yond"),
    ("Coriolanus", "V.v", "The same. A street near the gate.", "First Senator", "Behold our patroness, the life of Rome!"),
    ("Coriolanus", "V.vi", "Antium. A public place.", "AUFIDIUS", "Go tell the lords o' the city I am here:"),
    ("Richard III", "I.i", "London. A street.", "GLOUCESTER", "Now is the winter of our discontent"),
    ("Richard III", "I.ii", "The same. Another street.", "LADY ANNE", "Set down, set down your honourable load,"),
    ("Richard III", "I.iii", "The palace.", "RIVERS", "Have patience, madam: there's no doubt his majesty"),
    ("Richard III", "I.iv", "London. The Tower.", "BRAKENBURY", "Why looks your grace so heavily today?"),
    ("Richard III", "II.i", "London. The palace.", "KING EDWARD IV", "Why, so: now have I done a good day's work:"),
    ("Richard III", "II.ii", "The palace.", "Boy", "Tell me, good grandam, is our father dead?"),
    ("Richard III", "II.iii", "London. A street.", "First Citizen", "Neighbour, well met: whither away so fast?"),
    ("Richard III", "II.iv", "London. The palace.", "ARCHBISHOP OF YORK", "Last night, I hear, they lay at Northampton;"),
    ("Richard III", "III.i", "London. A street.", "BUCKINGHAM", "Welcome, sweet prince, to London, to your chamber."),
    ("Richard III", "III.ii", "Before Lord Hastings' house.", "Messenger", "What, ho! my lord!"),
    ("Richard III", "III.iii", "Pomfret Castle.", "RATCLIFF", "Come, bring forth the prisoners."),
    ("Richard III", "III.iv", "The Tower of London.", "HASTINGS", "My lords, at once: the cause why we are met"),
    ("Richard III", "III.v", "The Tower-walls.", "GLOUCESTER", "Come, cousin, canst thou quake, and change thy colour,"),
    ("Richard III", "III.vi", "The same.", "Scrivener", "This is the indictment of the good Lord Hastings;"),
    ("Richard III", "III.vii", "Baynard's Castle.", "GLOUCESTER", "How now, my lord, what say the citizens?"),
    ("Richard III", "IV.i", "Before the Tower.", "DUCHESS OF YORK", "Who meets us here?  my niece Plantagenet"),
    ("Richard III", "IV.ii", "London. The palace.", "KING RICHARD III", "Stand all apart Cousin of Buckingham!"),
    ("Richard III", "IV.iii", "The same.", "TYRREL", "The tyrannous and bloody deed is done."),
    ("Richard III", "IV.iv", "Before the palace.", "QUEEN MARGARET", "So, now prosperity begins to mellow"),
    ("Richard III", "IV.v", "Lord Derby's house.", "DERBY", "Sir Christopher, tell Richmond this from me:"),
    ("Richard III", "V.i", "Salisbury. An open place.", "BUCKINGHAM", "Will not King Richard let me speak with him?"),
    ("Richard III", "V.ii", "The camp near Tamworth.", "RICHMOND", "Fellows in arms, and my most loving friends,"),
    ("Richard III", "V.iii", "Bosworth Field.", "KING RICHARD III", "Here pitch our tents, even here in Bosworth field."),
    ("Richard III", "V.iv", "Another part of the field.", "CATESBY", "Rescue, my Lord of Norfolk, rescue, rescue!"),
    ("Richard III", "V.v", "Another part of the field.", "RICHMOND", "God and your arms be praised, victorious friends,"),
]

META = {
    "title": "Coriolanus and Richard III (tinyshakespeare excerpt)",
    "author": "William Shakespeare",
    "year": 1623,  # both first printed complete in the First Folio (Richard III also in quarto, 1597)
    "source": (
        "karpathy/char-rnn, data/tinyshakespeare/input.txt (blob "
        "7dcb3a2d4cc3b48b6283dd46870bfeb78f88aac9, added in commit "
        "370cbcd448eb7daf32f21a6be560b70e0b33c4e3, unchanged at "
        "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e), bytes 0-317025 "
        "unchanged: Coriolanus and Richard III from the Moby/MIT "
        "Shakespeare text, with stage directions removed; scene divisions "
        "from the Moby/MIT text (Wenhao-Chen/StegoAppDB_Passlok_Script, "
        "commit d68a696cc84a7494cf32c5e892d35c268b3cbcb0, "
        "PassLok-stego/message_dictionary/shakespeare_coriolanus.txt and "
        "shakespeare_richardiii.txt)"
    ),
    "license": (
        "public domain (William Shakespeare died in 1616; the Moby "
        "Shakespeare text is itself free of copyright, and tinyshakespeare "
        "only deletes from it)"
    ),
}


def parse(raw: str, problems: list[str]) -> list[tuple[str, str]]:
    """(raw label, speech text) for every paragraph; the text is '' for a lost speech."""
    if not raw.endswith("\n") or "\n\n\n" in raw or "\r" in raw:
        problems.append("the raw text is not single-blank-line separated paragraphs")
    paragraphs = []
    for n, para in enumerate(raw.rstrip("\n").split("\n\n")):
        m = SPEECH.match(para)
        if not m:
            problems.append(f"paragraph {n} is not a 'NAME:' speech: {para[:80]!r}")
            continue
        paragraphs.append((m.group(1), m.group(2) or ""))
    return paragraphs


def scene_starts(paragraphs: list[tuple[str, str]], problems: list[str]) -> list[int]:
    starts = []
    for play, act_scene, _, label, first_line in SCENES:
        hits = [i for i, (lab, text) in enumerate(paragraphs)
                if lab == label and text.split("\n", 1)[0] == first_line]
        if len(hits) != 1:
            problems.append(f"{play} {act_scene}: anchor {label}: {first_line!r} matches {len(hits)} speeches")
        elif starts and hits[0] <= starts[-1]:
            problems.append(f"{play} {act_scene}: anchor comes before the previous scene's")
        else:
            starts.append(hits[0])
    if starts and starts[0] != 0:
        problems.append(f"the first scene starts at speech {starts[0]}, not 0")
    return starts


def build(raw_path: Path = RAW) -> dict:
    data = raw_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RAW_SHA256:
        raise ValueError(f"{raw_path.name}: sha256 {digest}, expected {RAW_SHA256}")
    problems: list[str] = []
    paragraphs = parse(data.decode("utf-8"), problems)
    starts = scene_starts(paragraphs, problems)
    if problems:
        raise ValueError("could not place:\n" + "\n".join(problems))
    used = {play: set() for play in ALIASES}
    titles: list[str] = []
    scenes: list[list[dict]] = []
    lost: list[str] = []
    for (play, act_scene, place, _, _), a, b in zip(SCENES, starts, starts[1:] + [len(paragraphs)]):
        title = f"{play} {act_scene}: {place}"
        parts: list[list[dict]] = [[]]
        for label, text in paragraphs[a:b]:
            content = clean(text)
            if label in ALIASES[play]:
                used[play].add(label)
            speaker = ALIASES[play].get(label) or speaker_name(label)
            if not content:  # a speech tinyshakespeare dropped: the dialogue breaks here
                lost.append(f"{title} / {speaker}")
                if parts[-1]:
                    parts.append([])
                continue
            parts[-1].append({"speaker": speaker, "content": content})
        parts = [p for p in parts if p]
        for k, part in enumerate(parts, 1):
            titles.append(title if len(parts) == 1 else f"{title} (part {k} of {len(parts)})")
            scenes.append(part)
    unused = [f"{play}: {label}" for play, table in ALIASES.items() for label in table if label not in used[play]]
    if unused:
        raise ValueError("aliases that never occur in their play: " + ", ".join(unused))
    play = assemble(META, titles, scenes)
    play["lost_speeches"] = lost
    return play


def main(argv: list[str] | None = None) -> int:
    return run_cli(build, OUT, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
