"""Build bench/data/importance_of_being_earnest.json from the raw play text.

The raw text (importance_of_being_earnest.txt, next to this file) is Project
Gutenberg eBook #844 with the Gutenberg header, footer and licence removed:
the play itself, unchanged, from its title to the closing "TABLEAU".

Conversion rules:
  * the play has three acts and no scene divisions inside them, so each act
    is one "scene" (a list of speeches in order);
  * a speech starts at a speaker line ("ALGERNON.", "LADY BRACKNELL.") and
    runs to the next blank line; the two joint speeches
    ("GWENDOLEN and CECILY [Speaking together.] ...") are kept with the
    speaker "Gwendolen and Cecily" / "Jack and Algernon";
  * stage directions, i.e. everything in [square brackets], are removed;
    a paragraph that starts with a direction and then carries on with
    spoken words ("[Enter Algernon ...] He does!") is appended to the
    speech it belongs to (the one before it);
  * the cast list, scene settings, "ACT DROP" and "TABLEAU" are dropped;
  * _underscore_ italics markers are removed and whitespace is collapsed.

Usage:
    python bench/data/make_play.py            # rewrite the JSON
    python bench/data/make_play.py --check    # fail if the JSON is stale

Loading from other code:
    from bench.data.make_play import load_play
    play = load_play()          # dict: title, author, ..., scenes, counts

speaker_name, clean, assemble, dumps and run_cli are shared with
make_shakespeare.py (the second corpus).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
RAW = HERE / "importance_of_being_earnest.txt"
OUT = HERE / "importance_of_being_earnest.json"

ACT_HEADINGS = ["FIRST ACT", "SECOND ACT", "THIRD ACT"]
ACT_TITLES = [
    "Act I: Morning-room in Algernon's flat in Half-Moon Street",
    "Act II: Garden at the Manor House, Woolton",
    "Act III: Morning-room at the Manor House, Woolton",
]
# "ALGERNON." / "LADY BRACKNELL." alone on a line.
SPEAKER_LINE = re.compile(r"^([A-Z][A-Z]+(?: [A-Z][A-Z]+)*)\.$")
# "GWENDOLEN and CECILY [Speaking together.] Your Christian names are"
JOINT_LINE = re.compile(r"^([A-Z][A-Z]+ and [A-Z][A-Z]+)\s*(.*)$")
DIRECTION = re.compile(r"\[[^\]]*\]", re.S)
IGNORED_PARAGRAPHS = {"ACT DROP", "TABLEAU", "SCENE"}

META = {
    "title": "The Importance of Being Earnest: A Trivial Comedy for Serious People",
    "author": "Oscar Wilde",
    "year": 1895,
    "source": (
        "Project Gutenberg eBook #844 (transcribed by David Price from the "
        "1915 Methuen & Co. edition; release of 1 March 1997, updated "
        "10 November 2025), copy of pg844.txt in the public GitHub "
        "repository vyjayanv-hub/112_TP_Vasudevan, commit "
        "ac75819458e6ab0a03cf6edee0d54c363e8e9d1d; Gutenberg header, footer "
        "and licence removed"
    ),
    "license": (
        "public domain (Oscar Wilde died in 1900; first performed 1895 and "
        "published 1899, so the work is out of copyright in the US and in "
        "every life+70 or life+100 country)"
    ),
}


SMALL_WORDS = {"and", "of", "the"}
ROMAN_NUMERAL = re.compile(r"[IVX]{2,}")


def speaker_name(raw: str) -> str:
    """'LADY BRACKNELL' -> 'Lady Bracknell'; 'JACK and ALGERNON' kept joint;
    'KING EDWARD IV' -> 'King Edward IV'; 'Ghost of CLARENCE' -> 'Ghost of Clarence'."""
    return " ".join(w.lower() if w.lower() in SMALL_WORDS
                    else w if ROMAN_NUMERAL.fullmatch(w) else w.capitalize()
                    for w in raw.split())


def clean(text: str) -> str:
    text = DIRECTION.sub("\0", text)
    # a removed direction must not leave "word ," or "word ." behind; the
    # source's own spaced ellipses (". . .") are left as they are
    text = re.sub(r"\s*\0\s*(?=[,;:!?]|\.(?! \.))", "", text)
    text = text.replace("\0", " ").replace("_", "")
    return re.sub(r"\s+", " ", text).strip()


def split_acts(raw: str) -> list[str]:
    lines = raw.splitlines()
    starts = []
    for heading in ACT_HEADINGS:
        idx = [i for i, line in enumerate(lines) if line.strip() == heading]
        if len(idx) != 1:
            raise ValueError(f"expected one {heading!r} heading, found {len(idx)}")
        starts.append(idx[0])
    starts.append(len(lines))
    return ["\n".join(lines[a + 1:b]) for a, b in zip(starts, starts[1:])]


def parse_act(act_text: str, problems: list[str]) -> list[dict]:
    speeches: list[dict] = []
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", act_text)]
    for para in paragraphs:
        if not para.strip():
            continue
        lines = para.split("\n")
        first = lines[0].strip()
        m = SPEAKER_LINE.match(first)
        j = JOINT_LINE.match(first) if not m else None
        if m and first[:-1] not in IGNORED_PARAGRAPHS:
            speaker, body = m.group(1), "\n".join(lines[1:])
        elif j:
            speaker, body = j.group(1), "\n".join([j.group(2)] + lines[1:])
        else:
            if para.strip() in IGNORED_PARAGRAPHS:
                continue
            if not speeches:
                continue  # "SCENE" setting text before the first speech
            if first.startswith("["):
                rest = clean(para)
                if rest:  # words spoken after an entrance direction
                    speeches[-1]["content"] += " " + rest
                continue
            problems.append(f"unattached paragraph: {para[:80]!r}")
            continue
        content = clean(body)
        if not content:
            problems.append(f"empty speech for {speaker}: {body[:80]!r}")
            continue
        speeches.append({"speaker": speaker_name(speaker), "content": content})
    return speeches


def build(raw_path: Path = RAW) -> dict:
    raw = raw_path.read_text(encoding="utf-8")
    problems: list[str] = []
    scenes = [parse_act(a, problems) for a in split_acts(raw)]
    if problems:
        raise ValueError("could not place:\n" + "\n".join(problems))
    return assemble(META, ACT_TITLES, scenes)


def assemble(meta: dict, scene_titles: list[str], scenes: list[list[dict]]) -> dict:
    """The JSON layout shared by the bench corpora: meta, scene_titles, scenes, counts."""
    if len(scene_titles) != len(scenes):
        raise ValueError(f"{len(scene_titles)} scene titles for {len(scenes)} scenes")
    counts = Counter(s["speaker"] for scene in scenes for s in scene)
    play = dict(meta)
    play["scene_titles"] = scene_titles
    play["scenes"] = scenes
    play["counts"] = dict(counts.most_common())
    return play


def dumps(play: dict) -> str:
    return json.dumps(play, ensure_ascii=False, indent=1) + "\n"


def load_play(path: Path = OUT) -> dict:
    """Read the generated JSON (title, author, source, license, scenes, counts)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def run_cli(build_fn, out: Path, description: str, argv: list[str] | None = None) -> int:
    """Write build_fn()'s JSON to `out`, or with --check exit 1 if `out` is stale."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if the JSON on disk differs from a fresh build")
    args = ap.parse_args(argv)
    text = dumps(build_fn())
    if args.check:
        same = out.exists() and out.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{out.name} is stale")
        return 0 if same else 1
    out.write_text(text, encoding="utf-8")
    play = json.loads(text)
    n = sum(len(s) for s in play["scenes"])
    print(f"wrote {out} ({len(play['scenes'])} scenes, {n} speeches)")
    for who, c in play["counts"].items():
        print(f"  {who:22s} {c}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build, OUT, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
