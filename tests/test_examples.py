"""The sample chat (examples/) and the README's quick start: the sample imports cleanly with a voice
per person and enough samples to train, the file is what its script writes, and every command the
quick start shows names a route the app has and a file the repository holds. The manual's links
(README.md and docs/) lead to files and headings that exist."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "family_chat.txt"  # written by examples/make_family_chat.py from family_scenes.txt
PEOPLE = ("Mia", "Dad", "Grandma")


def _script():
    spec = importlib.util.spec_from_file_location("make_family_chat", ROOT / "examples" / "make_family_chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quick_start() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Quick start")
    return readme[start:readme.index("\n## ", start + 1)]


def test_sample_is_what_its_script_writes():
    assert SAMPLE.read_text(encoding="utf-8") == _script().render()


def test_sample_has_distinct_hand_written_lines():
    scenes = _script().scenes()
    for person in PEOPLE:
        texts = [text for _, _, turns in scenes for who, text in turns if who == person and text != "<Media omitted>"]
        assert len(texts) >= 50, person
        # hand-written, not a template: nearly every line is said once ("Peas count." is a running joke)
        assert len(set(texts)) >= 0.95 * len(texts), person
    days = sorted({day for day, _, _ in scenes})
    assert len(days) >= 30 and days[0] < "2023-10-08" and days[-1] > "2023-11-12"  # a few weeks of dates


def test_sample_imports_for_each_person(client):
    text = SAMPLE.read_text(encoding="utf-8")
    authored = {p: len(re.findall(rf"^\d\d/\d\d/\d{{4}}, \d\d:\d\d - {p}: (?!<Media omitted>)", text, re.M)) for p in PEOPLE}
    minimum = {"Mia": 120, "Dad": 100, "Grandma": 50}  # samples after merging a person's consecutive messages
    for person in PEOPLE:
        r = client.post("/upload-file", files={"file": ("family_chat.txt", SAMPLE.read_bytes())}, data={"speaker": person})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["format"] == "whatsapp"
        assert set(body["speakers"]) == set(PEOPLE)  # no system line read as a person ("Dad added Mia")
        report = body["report"]
        assert report["messages_read"] == sum(authored.values()) + 2 + 4  # + 2 photos + 4 system lines
        assert report["dropped_system"] == 4 and report["dropped_media"] == 2 and report["dropped_deleted"] == 0
        assert report["dropped_empty"] == report["cut_long"] == report["masked_pii"] == 0
        for p in PEOPLE:
            assert body["speakers"][p]["messages"] >= minimum[p], (p, body["speakers"][p])
        assert body["added"] == body["total"] == body["speakers"][person]["messages"]
        assert body["warnings"] == []  # no "fewer than MIN_SAMPLES" for anyone

    listed = {s["speaker"]: s["messages"] for s in client.get("/speakers").json()["data"]}
    assert listed == {p: client.get(f"/speakers/{p}/messages?limit=1").json()["count"] for p in PEOPLE}
    sample = client.get("/speakers/Mia/dataset?limit=1").json()["data"][0]  # what training will see
    assert sample["completion"].strip() and "⟦" in sample["marked"]
    # the facts that come back across the weeks are there for the memory to recall
    for person, query, fact in [("Mia", "what's your favourite food?", "lemon drizzle"),
                                ("Dad", "what has Biscuit eaten now?", "Biscuit"), ("Grandma", "how's the knee?", "knee")]:
        recalled = client.get(f"/speakers/{person}/memory", params={"q": query, "limit": 3}).json()["data"]
        assert any(fact in r["text"] for r in recalled), (person, query, recalled)


def _curls(section: str) -> list[list[str]]:
    joined = section.replace("\\\n", " ")
    return [shlex.split(line.strip()) for line in joined.splitlines() if line.strip().startswith("curl ")]


def test_quick_start_commands_name_routes_and_files_that_exist():
    from main import app

    routes = app.openapi()["paths"]  # path → its methods, as the app serves them
    commands = _curls(_quick_start())
    assert len(commands) >= 4  # import, train, evaluation, talk
    seen = set()
    for args in commands:
        url = next(a for a in args if a.startswith("localhost:8000/"))
        path = url.removeprefix("localhost:8000").split("?")[0]
        method = "POST" if {"-F", "-d"} & set(args) else "GET"
        matches = [route for route, methods in routes.items()
                   if method.lower() in methods and re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", route), path)]
        assert matches, f"the quick start's {method} {path} is no route of the app"
        seen.add(matches[0])
        for i, arg in enumerate(args):
            if arg == "-F" and args[i + 1].startswith("file=@"):
                assert (ROOT / args[i + 1].removeprefix("file=@")).is_file(), args[i + 1]
            if arg == "-F" and args[i + 1].startswith("speaker="):
                assert args[i + 1].removeprefix("speaker=") in PEOPLE
            if arg == "-d":
                json.loads(args[i + 1])
    assert {"/upload-file", "/train", "/speakers/{speaker}/evaluation", "/generate"} <= seen


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_manual_links_lead_somewhere():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 10
    anchors = {p: {_slug(h) for h in re.findall(r"^#+ (.+)$", p.read_text(encoding="utf-8"), re.M)} for p in pages}
    linked = set()
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            assert dest.exists(), f"{page.name}: link to {target}: no such file"
            linked.add(dest)
            if anchor and dest.suffix == ".md":
                assert anchor in anchors[dest], f"{page.name}: link to {target}: no such heading"
    assert set(pages[1:]) <= linked, "a docs/ page no other page links to"


def test_the_persona_benchs_corpora_are_what_their_converters_write():
    """bench/data's JSON files are stale if their converter (or the raw text) changed: --check says so."""
    import subprocess
    import sys

    for script in ("make_play.py", "make_shakespeare.py"):
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "data" / script), "--check"], capture_output=True, text=True)
        assert done.returncode == 0, (script, done.stdout, done.stderr)
    play = json.loads((ROOT / "bench" / "data" / "shakespeare.json").read_text(encoding="utf-8"))
    assert min(play["counts"][c] for c in ("Richard", "Coriolanus", "Menenius")) >= 150
