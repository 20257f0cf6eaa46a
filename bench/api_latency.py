"""API latency while idle and while a training job runs, and upload throughput.

Starts the service (`uvicorn main:app`) on loopback with fresh data and output folders, then:
  1. idle: N sequential `GET /health` and `POST /upload-text` calls; p50 / p99 / max;
  2. the same while a training job runs (its child process busy on the CPU);
  3. upload throughput: C concurrent clients posting M uploads in all (idle).

    python bench/api_latency.py                    # the default model (provisioned under ./models)
    python bench/api_latency.py --model PATH       # any local checkpoint
    python bench/api_latency.py -n 300 --clients 16 --uploads 400

Writes bench/results/api_latency.json (or --json) and prints a table.
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

from jobs.runner import free_port  # noqa: E402


def dialog(i: int, speaker: str = "User1") -> list[dict[str, str]]:
    return [{"speaker": "Friend", "content": f"Привіт! Як справи? ({i})"},
            {"speaker": speaker, "content": f"Все добре, дякую, ось так, друже 🌻 ({i})"}]


def percentiles(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"n": len(ms), "p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2), "max_ms": round(max(ms), 2)}


def timed(http: httpx.Client, n: int, call) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        r = call(http, i)
        out.append((time.perf_counter() - t) * 1000)
        r.raise_for_status()
    return out


def health(http, i):
    return http.get("/health")


def upload(http, i):
    return http.post("/upload-text", json={"dialog": dialog(i, "Probe"), "speaker": "Probe"})


async def throughput(url: str, clients: int, uploads: int) -> dict[str, float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(uploads):
        queue.put_nowait(i)
    failures = 0

    async def worker(client: httpx.AsyncClient, k: int):
        nonlocal failures
        while not queue.empty():
            i = queue.get_nowait()
            r = await client.post("/upload-text", json={"dialog": dialog(i, f"Load{k % 4}"), "speaker": f"Load{k % 4}"})
            failures += r.status_code != 200

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        t = time.perf_counter()
        await asyncio.gather(*(worker(client, k) for k in range(clients)))
        elapsed = time.perf_counter() - t
    return {"clients": clients, "uploads": uploads, "seconds": round(elapsed, 2),
            "uploads_per_s": round(uploads / elapsed, 1), "failures": failures}


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", help="BASE_MODEL for the server (default: the offline default model)")
    cli.add_argument("-n", type=int, default=200, help="calls per endpoint and phase")
    cli.add_argument("--clients", type=int, default=16)
    cli.add_argument("--uploads", type=int, default=400)
    cli.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "api_latency.json")
    ns = cli.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(work / "data"), "OUTPUT_DIR": str(work / "out"),
           "MODELS_DIR": str(ROOT / "models"), "EVALUATE_AFTER_TRAINING": "false", "PYTHONUNBUFFERED": "1"}
    if ns.model:
        env["BASE_MODEL"] = ns.model
    log = open(work / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "main:app", "--port", str(port), "--log-level", "warning"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    report: dict = {"machine": {"cpus": os.cpu_count()}, "model": ns.model or "default"}
    try:
        http = httpx.Client(base_url=url, timeout=120)
        for _ in range(300):
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        # enough samples that training outlasts the measurement: one sample per step (batch_tokens=1)
        big = [turn for i in range(200) for turn in dialog(i)]
        http.post("/upload-text", json={"dialog": big, "speaker": "User1"}).raise_for_status()
        timed(http, 20, health)  # warm-up
        report["idle"] = {"health": percentiles(timed(http, ns.n, health)),
                          "upload": percentiles(timed(http, ns.n, upload))}

        job = http.post("/train", json={"speaker": "User1", "epochs": 50, "batch_tokens": 1}).json()
        while http.get(f"/jobs/{job['job_id']}").json()["progress"] is None:  # model loaded, steps running
            time.sleep(0.2)
        report["training"] = {"health": percentiles(timed(http, ns.n, health)),
                              "upload": percentiles(timed(http, ns.n, upload))}
        state = http.get(f"/jobs/{job['job_id']}").json()
        assert state["status"] == "running", f"the job ended before the measurement did: {state['status']}"
        report["training"]["job_steps_during"] = state["progress"]["step"]
        http.post(f"/jobs/{job['job_id']}/cancel")
        while http.get(f"/jobs/{job['job_id']}").json()["status"] == "running":
            time.sleep(0.2)
        report["throughput"] = asyncio.run(throughput(url, ns.clients, ns.uploads))
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"{'endpoint':<10} {'phase':<9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for endpoint in ("health", "upload"):
        for phase in ("idle", "training"):
            p = report[phase][endpoint]
            print(f"{endpoint:<10} {phase:<9} {p['p50_ms']:>8} {p['p99_ms']:>8} {p['max_ms']:>8}")
        ratio = report["training"][endpoint]["p99_ms"] / report["idle"][endpoint]["p99_ms"]
        report.setdefault("p99_training_over_idle", {})[endpoint] = round(ratio, 2)
        print(f"{endpoint:<10} p99 training / idle = {ratio:.2f}x")
    t = report["throughput"]
    print(f"uploads: {t['uploads']} by {t['clients']} clients in {t['seconds']} s = {t['uploads_per_s']}/s, "
          f"{t['failures']} failed")
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
