"""How fast exports parse and clean: a generated 20k-message Telegram export and WhatsApp chat.

    python bench/parse_exports.py [--messages 20000] [--json out.json]

Deterministic (seeded). Prints seconds per stage and messages per second; not a test.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import parser as dialog_parser  # noqa: E402
from models import CleaningOptions  # noqa: E402

WORDS = "привіт як справи добре дякую кава завтра сьогодні робота дім кіт собака music coffee ok 😊 ха".split()


def corpus(n: int, seed: int = 0):
    rng = random.Random(seed)
    t = datetime(2024, 1, 1, 8, 0)
    for i in range(n):
        t += timedelta(minutes=rng.choice([0, 1, 1, 2, 5, 30, 300]))
        yield i, t, rng.choice(["Олена", "Андрій", "Olena K"]), " ".join(rng.choices(WORDS, k=rng.randint(1, 25)))


def telegram(n: int) -> bytes:
    messages = [{"id": i + 1, "type": "message", "date": t.isoformat(), "from": who, "from_id": who, "text": text}
                for i, t, who, text in corpus(n)]
    return json.dumps({"name": "bench", "type": "personal_chat", "id": 1, "messages": messages}, ensure_ascii=False).encode()


def whatsapp(n: int) -> bytes:
    lines = [f"{t:%d.%m.%y}, {t:%H:%M} - {who}: {text}" for _, t, who, text in corpus(n)]
    return ("\n".join(lines) + "\n").encode()


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--messages", type=int, default=20_000)
    cli.add_argument("--json", type=Path)
    ns = cli.parse_args()
    results = {}
    for name, data, filename in (("telegram", telegram(ns.messages), "result.json"), ("whatsapp", whatsapp(ns.messages), "chat.txt")):
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            result = dialog_parser.import_export(data, filename, "Олена", "auto", None, {"Olena K": "Олена"},
                                                 CleaningOptions(), 6, None)
            best = min(best, time.perf_counter() - started)
        results[name] = {"messages": ns.messages, "bytes": len(data), "seconds": round(best, 3),
                         "messages_per_second": round(ns.messages / best), "samples": len(result.samples)}
        print(f"{name:9s} {ns.messages} messages, {len(data) / 1e6:.1f} MB: {best:.2f} s "
              f"({ns.messages / best:,.0f} messages/s), {len(result.samples)} samples")
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
