"""Big speakers stay fast: latencies with 50,000 stored messages, and a 100,000-message import.

Starts the service (`uvicorn main:app`) on loopback with fresh folders (and MODELS_DIR empty, so
exports count words, not tokens), then:
  1. builds a 50,000-message speaker through the service itself: POST /upload-text, 2,500 samples
     per upload (dialogs of 5,000 turns, the MAX_DIALOG_MESSAGES bound);
  2. times N one-message uploads to it, N `GET /speakers` and N `GET /speakers/{s}/messages?limit=1`
     (median and p90, ms), then C concurrent one-message uploads to it (their status codes);
  3. the first `GET /speakers` of a restarted server, with the index sidecar and without it;
  4. on a fresh server, imports a generated WhatsApp .txt export of 100,000 messages through
     POST /upload-file (MAX_BODY_BYTES raised to 64 MiB so that larger --imported fit; the
     default's ~15 MB file passes the default 16 MiB too) and reports its time and the server's peak RSS.

    python bench/big_speaker.py                      # 50,000 stored, 100,000 imported, N=20, C=15
    python bench/big_speaker.py --stored 10000 --imported 20000 -n 10

Writes bench/results/big_speaker.json (or --json) and prints the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from parse_exports import whatsapp  # noqa: E402

from jobs.runner import free_port  # noqa: E402

SPEAKER = "Big"
PER_UPLOAD = 2500  # samples per /upload-text: 5,000 turns, the MAX_DIALOG_MESSAGES bound


class Server:
    def __init__(self, work: Path, extra: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DATA_DIR": str(work / "data"), "OUTPUT_DIR": str(work / "out"),
               "MODELS_DIR": str(work / "models"), "PYTHONUNBUFFERED": "1", **(extra or {})}
        self.log = open(work / "server.log", "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "main:app", "--port", str(self.port),
                                      "--log-level", "warning"], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not start; see {work / 'server.log'}")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def turns(i: int, n: int) -> list[dict[str, str]]:
    """n samples of the speaker, each answering a friend; unique by i."""
    out = []
    for k in range(i, i + n):
        out += [{"speaker": "Friend", "content": f"Як справи сьогодні, {k}?"},
                {"speaker": SPEAKER, "content": f"Все добре, дякую; ось що було сьогодні: кава, робота, кіт ({k})"}]
    return out


def stats(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=10, method="inclusive")
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 1), "p90_ms": round(q[8], 1)}


def timed(n: int, call) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        r = call(i)
        out.append((time.perf_counter() - started) * 1000)
        assert r.status_code == 200, r.text[:300]
    return out


async def concurrent_uploads(url: str, clients: int, start: int) -> dict[str, int]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        answers = await asyncio.gather(*(client.post("/upload-text", json={"dialog": turns(start + k, 1), "speaker": SPEAKER})
                                         for k in range(clients)))
    codes: dict[str, int] = {}
    for r in answers:
        codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1
    return codes


def big_speaker(work: Path, stored: int, n: int, clients: int) -> dict:
    server = Server(work)
    try:
        http = httpx.Client(base_url=server.url, timeout=600)
        started = time.perf_counter()
        for i in range(0, stored, PER_UPLOAD):
            r = http.post("/upload-text", json={"dialog": turns(i, min(PER_UPLOAD, stored - i)), "speaker": SPEAKER})
            assert r.status_code == 200, r.text[:300]
        build_s = time.perf_counter() - started
        size = (work / "data" / f"{SPEAKER}_messages.json").stat().st_size
        print(f"built {stored} messages ({size / 1e6:.1f} MB) in {build_s:.1f} s", flush=True)
        result = {"stored": stored, "file_mb": round(size / 1e6, 1), "build_s": round(build_s, 1)}
        result["upload_one"] = stats(timed(n, lambda i: http.post(
            "/upload-text", json={"dialog": turns(10**7 + i, 1), "speaker": SPEAKER})))
        result["get_speakers"] = stats(timed(n, lambda i: http.get("/speakers")))
        result["messages_limit_1"] = stats(timed(n, lambda i: http.get(f"/speakers/{SPEAKER}/messages", params={"limit": 1})))
        for key in ("upload_one", "get_speakers", "messages_limit_1"):
            print(f"{key:17s} {result[key]}", flush=True)
        started = time.perf_counter()
        result["concurrent"] = {"clients": clients, "codes": asyncio.run(concurrent_uploads(server.url, clients, 2 * 10**7)),
                                "seconds": round(time.perf_counter() - started, 2)}
        print(f"concurrent        {result['concurrent']}", flush=True)
    finally:
        server.stop()
    result["cold"] = cold(work)
    print(f"cold              {result['cold']}", flush=True)
    return result


def cold(work: Path) -> dict[str, float]:
    """The first GET /speakers of a fresh server process: with the index sidecar on disk, and without
    one (as for a file the seed wrote: rebuilt from the JSON file). A server that has no index is
    the code before store.py; it has no sidecar to remove."""
    out = {}
    for label in ("first_get_speakers_ms", "first_get_speakers_no_index_ms"):
        if label.endswith("no_index_ms"):
            for index in (work / "data").glob(".*.index"):
                index.unlink()
        server = Server(work)
        try:
            started = time.perf_counter()
            assert httpx.get(server.url + "/speakers", timeout=600).status_code == 200
            out[label] = round((time.perf_counter() - started) * 1000, 1)
        finally:
            server.stop()
    return out


def import_export(work: Path, messages: int) -> dict:
    data = whatsapp(messages)
    server = Server(work, {"MAX_BODY_BYTES": str(64 * 1024 * 1024)})
    try:
        before = server.peak_rss_mb()
        started = time.perf_counter()
        r = httpx.post(server.url + "/upload-file", files={"file": ("chat.txt", data, "text/plain")},
                       data={"speaker": "Олена", "aliases": json.dumps({"Olena K": "Олена"})}, timeout=1800)
        seconds = time.perf_counter() - started
        assert r.status_code == 200, r.text[:500]
        result = {"messages": messages, "mb": round(len(data) / 1e6, 1), "seconds": round(seconds, 1),
                  "samples_added": r.json()["added"], "peak_rss_mb": round(server.peak_rss_mb()), "rss_at_start_mb": round(before)}
        print(f"import            {result}", flush=True)
        return result
    finally:
        server.stop()


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--stored", type=int, default=50_000)
    cli.add_argument("--imported", type=int, default=100_000)
    cli.add_argument("-n", type=int, default=20, help="calls per endpoint")
    cli.add_argument("--clients", type=int, default=15)
    cli.add_argument("--skip-import", action="store_true")
    cli.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "big_speaker.json")
    ns = cli.parse_args()
    out = {"big_speaker": big_speaker(Path(tempfile.mkdtemp(prefix="bench-big-")), ns.stored, ns.n, ns.clients)}
    if not ns.skip_import:
        out["import"] = import_export(Path(tempfile.mkdtemp(prefix="bench-import-")), ns.imported)
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
