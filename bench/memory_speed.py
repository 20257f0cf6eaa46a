"""Memory at scale: indexing and recall for a speaker with 100,000 stored messages.

    python bench/memory_speed.py                   # 100,000 messages, 300 recalls
    python bench/memory_speed.py --messages 20000

The messages are generated here (a Zipf-distributed vocabulary of 30,000 words, 3–25 words a
message, as chat text is: a few words in most messages, most words in few) and stored through
store.append_samples. Measured, in one process on this machine:
  1. the first recall's cost: building the speaker's FTS5 index from the stored messages (the store
     read included), and the index file's size;
  2. recall as /generate does it (`memory.recall`: the store's count checked, the index opened, the
     query, the results): median and p90 over conversations of three turns;
  3. for the choice of engine, the same recalls by a plain Python scan that scores every message by
     the query words it shares (what a hand-written memory without an index would do).
Writes bench/results/memory_speed.json (or --json) and prints the numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import memory  # noqa: E402
import store  # noqa: E402
from models import Sample, Turn  # noqa: E402

SPEAKER = "Big"


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(30_000)]
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
    return [" ".join(rng.choices(vocabulary, weights, k=rng.randint(3, 25))) for _ in range(n)]


def stats(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {"median_ms": round(statistics.median(ms), 2), "p90_ms": round(ms[int(len(ms) * 0.9)], 2)}


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--messages", type=int, default=100_000)
    cli.add_argument("--recalls", type=int, default=300)
    cli.add_argument("--k", type=int, default=4)
    cli.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "memory_speed.json")
    ns = cli.parse_args()

    now = datetime.now(timezone.utc)
    lines = texts(ns.messages + 3 * ns.recalls, seed=1)
    stored, asked = lines[: ns.messages], lines[ns.messages:]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        samples = [Sample(id=f"{i:08d}", context=[Turn(speaker="Q", content="?")], reply=text, added_at=now)
                   for i, text in enumerate(stored)]
        for start in range(0, len(samples), 5000):
            store.append_samples(data, SPEAKER, samples[start:start + 5000])
        started = time.perf_counter()
        built = memory.speaker_memory(data, SPEAKER)
        build_s = time.perf_counter() - started
        count = built.count()
        built.close()
        size = memory.index_path(store.speaker_file(data, SPEAKER)).stat().st_size
        conversations = [[Turn(speaker="Q", content=asked[3 * i]), Turn(speaker=SPEAKER, content=asked[3 * i + 1]),
                          Turn(speaker="Q", content=asked[3 * i + 2])] for i in range(ns.recalls)]
        indexed = []
        for turns in conversations:
            started = time.perf_counter()
            memory.recall(data, SPEAKER, turns, ns.k)
            indexed.append((time.perf_counter() - started) * 1000)
        tokenized = [set(memory.words(text)) for text in stored]
        scanned = []
        for turns in conversations[:30]:  # 30: each scan takes long
            started = time.perf_counter()
            query = {w for t in turns for w in memory.words(t.content)}
            sorted(range(len(tokenized)), key=lambda i: -len(tokenized[i] & query))[: ns.k]
            scanned.append((time.perf_counter() - started) * 1000)
    result = {"command": " ".join(sys.argv), "messages": ns.messages, "indexed": count, "k": ns.k,
              "first_recall_builds_index_s": round(build_s, 2), "index_bytes": size,
              "recall": stats(indexed), "python_scan_recall": stats(scanned)}
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
