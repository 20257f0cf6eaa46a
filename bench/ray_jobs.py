"""4 trainings of the tiny test model submitted at once: the local runner against a local Ray cluster of
2 CPU slots (EXECUTOR=ray); wall time until all four end, `GET /health` latency (p50/p99/max) while they
run, and the server's RSS after each round of four (with Ray, a second round shows whether it grows).

    python bench/ray_jobs.py                 # needs requirements-ray.txt
    python bench/ray_jobs.py --workers 1     # the local runner's default TRAIN_WORKERS

Writes bench/results/ray_jobs.json (or --json) and prints a table. The cluster (token auth, loopback)
is stopped by its own process ids at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tiny  # noqa: E402

from jobs.runner import free_port  # noqa: E402
from models import SAMPLE_DIALOG  # noqa: E402

SPEAKERS = ["A", "B", "C", "D"]


@contextmanager
def ray_head(auth: dict[str, str]):
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    port = free_port()
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=1",
         "--disable-usage-stats", "--include-dashboard=true", f"--dashboard-port={port}", f"--port={free_port()}",
         f"--temp-dir={temp}"], env={**os.environ, **auth}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, cwd=temp)
    address = f"http://127.0.0.1:{port}"
    os.environ.update(auth)  # before Ray is imported: it reads RAY_AUTH_MODE once
    from ray.job_submission import JobSubmissionClient

    try:
        while True:
            try:
                JobSubmissionClient(address)
                break
            except ConnectionError:
                time.sleep(0.5)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(60)
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == head.pid:
                    p.kill()
            except (ProcessLookupError, psutil.Error):
                pass


@contextmanager
def server(env: dict[str, str], root: Path):
    port = free_port()
    log = open(root / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    try:
        yield httpx.Client(base_url=url, timeout=60), proc.pid
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def round_of_four(http: httpx.Client, epochs: int) -> dict:
    latencies, done = [], threading.Event()

    def probe():
        while not done.is_set():
            t = time.perf_counter()
            http.get("/health")
            latencies.append((time.perf_counter() - t) * 1000)
            time.sleep(0.05)

    started = time.perf_counter()
    ids = [http.post("/train", json={"speaker": s, "epochs": epochs, "batch_tokens": 1}).json()["job_id"] for s in SPEAKERS]
    prober = threading.Thread(target=probe)
    prober.start()
    while True:
        jobs = [http.get(f"/jobs/{i}").json() for i in ids]
        if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs):
            break
        time.sleep(0.2)
    wall = time.perf_counter() - started
    done.set()
    prober.join()
    latencies.sort()
    return {"wall_s": round(wall, 1), "statuses": [j["status"] for j in jobs],
            "health_ms": {"n": len(latencies), "p50": round(statistics.median(latencies), 1),
                          "p99": round(latencies[int(0.99 * (len(latencies) - 1))], 1), "max": round(latencies[-1], 1)}}


def rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="TRAIN_WORKERS for both (2: the cluster's 2 CPU slots)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each training (2 samples: 2 steps each)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "ray_jobs.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny.save_tiny_model(tmp / "tiny-gemma3", "gemma3")
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

        def run(name: str, extra: dict[str, str], rounds: int) -> None:
            root = tmp / name
            root.mkdir()
            env = {"DATA_DIR": str(root / "data"), "OUTPUT_DIR": str(root / "out"), "MODELS_DIR": str(root / "models"),
                   "EXPORTS_DIR": str(root / "exports"), "BASE_MODEL": str(model), "DEVICE": "cpu",
                   "TRAIN_WORKERS": str(args.workers), **extra}
            with server(env, root) as (http, pid):
                for s in SPEAKERS:
                    dialog = [{**t, "speaker": s if t["speaker"] == "User1" else t["speaker"]} for t in SAMPLE_DIALOG]
                    assert http.post("/upload-text", json={"dialog": dialog, "speaker": s}).status_code == 200
                results[name] = {"rss_mb_before": rss_mb(pid), "rounds": []}
                for _ in range(rounds):
                    results[name]["rounds"].append({**round_of_four(http, args.epochs), "rss_mb_after": rss_mb(pid)})
                    print(name, results[name]["rounds"][-1], flush=True)

        run("local", {}, 1)
        with ray_head(auth) as address:
            run("ray", {**auth, "EXECUTOR": "ray", "RAY_ADDRESS": address, "TRAIN_GPUS": "0"}, 2)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"workers": args.workers, "epochs": args.epochs, **results}, indent=2))
    print(f"{'executor':8} {'round':>5} {'wall s':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'RSS MB':>7}")
    for name, r in results.items():
        for n, one in enumerate(r["rounds"], 1):
            h = one["health_ms"]
            print(f"{name:8} {n:>5} {one['wall_s']:>7} {h['p50']:>7} {h['p99']:>7} {h['max']:>7} {one['rss_mb_after']:>7}")


if __name__ == "__main__":
    main()
