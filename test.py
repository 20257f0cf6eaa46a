"""End-to-end check of a running persona-lora server.

    fastapi dev main.py            # in one terminal
    python test.py                 # in another; or: python test.py --base-url http://host:port

Uploads the sample dialog (the example of the server's own OpenAPI schema), checks validation errors, trains User1 (once waiting, once as a
background job polled to the end) and checks that /health answers while it trains. Prints one line
per check and exits 0 only if every check holds. The first training on the default model provisions
it (about a minute or two on a CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

import httpx



class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.passed = 0

    def check(self, name: str, ok: bool, detail: object = "") -> bool:
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + ("" if ok else f"\n      {detail}"), flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed.append(name)
        return ok


def run(base_url: str, timeout: float) -> int:
    c = Checks()
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(30.0, read=timeout)) as http:
        r = http.get("/health")
        c.check("GET /health answers 200", r.status_code == 200, r.text)
        SAMPLE = http.get("/openapi.json").json()["components"]["schemas"]["UploadTextRequest"]["examples"][0]
        c.check("the sample dialog is User1's", SAMPLE["speaker"] == "User1", SAMPLE)

        r = http.post("/upload-text", json=SAMPLE)
        body = r.json()
        c.check("upload answers 200", r.status_code == 200, r.text)
        c.check("upload message", body.get("message") == "Successfully saved messages for User1", body)
        c.check("upload filepath", str(body.get("filepath", "")).endswith("User1_messages.json"), body)
        r = http.post("/upload-text", json=SAMPLE)
        c.check("identical upload adds nothing", r.status_code == 200 and r.json().get("added") == 0, r.text)

        bad = {
            "hostile speaker name": {**SAMPLE, "speaker": "../etc/passwd"},
            "empty dialog": {"dialog": [], "speaker": "User1"},
            "speaker not in dialog": {**SAMPLE, "speaker": "User3"},
            "content not a string": {"dialog": [{"speaker": "User1", "content": 5}], "speaker": "User1"},
        }
        for name, payload in bad.items():
            r = http.post("/upload-text", json=payload)
            c.check(f"upload rejects {name} with 422", r.status_code == 422 and "detail" in r.json(), r.text)

        r = http.post("/train", json={"speaker": f"nobody-{uuid.uuid4().hex[:8]}"})
        c.check("train unknown speaker answers 404", r.status_code == 404 and "upload" in r.json().get("detail", ""), r.text)
        r = http.get("/jobs/does-not-exist")
        c.check("unknown job answers 404", r.status_code == 404, r.text)

        r = http.post("/train", json={"speaker": "User1", "wait": True})
        body = r.json()
        ok = c.check("train with wait answers 200", r.status_code == 200, r.text)
        if ok:
            c.check("train message", body.get("message") == "Training completed successfully for User1", body)
            c.check("train model_path", str(body.get("model_path", "")).endswith("output_lora/User1"), body)

        r = http.post("/train", json={"speaker": "User1"})
        ok = c.check("train without wait answers 202 with a job", r.status_code == 202 and "job_id" in r.json(), r.text)
        if ok:
            job = r.json()
            c.check("job has a URL to poll", job.get("url") == f"/jobs/{job['job_id']}", job)
            health_during, deadline = [], time.monotonic() + timeout
            while job["status"] in ("queued", "running") and time.monotonic() < deadline:
                if job["status"] == "running":  # from the start of the child process to its end
                    t = time.perf_counter()
                    h = http.get("/health")
                    health_during.append((h.status_code, time.perf_counter() - t))
                time.sleep(0.1)
                job = http.get(job["url"]).json()
            c.check("background job finished in time", time.monotonic() < deadline, f"still {job['status']} after {timeout} s")
            c.check("background job succeeded", job["status"] == "succeeded", job.get("error") or job["status"])
            worst = max((seconds for _, seconds in health_during), default=0.0)
            c.check(
                f"/health answered during training ({len(health_during)} calls, slowest {worst * 1000:.0f} ms)",
                bool(health_during) and all(code == 200 for code, _ in health_during),
                health_during or "the job was never seen running",
            )
    print(f"\n{c.passed} passed, {len(c.failed)} failed")
    return 0 if not c.failed else 1


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--base-url", default="http://127.0.0.1:8000")
    cli.add_argument("--timeout", type=float, default=1800, help="seconds to wait for a training")
    ns = cli.parse_args()
    try:
        return run(ns.base_url, ns.timeout)
    except httpx.HTTPError as exc:
        print(f"FAIL  cannot talk to {ns.base_url}: {exc!r}\n\n0 passed, 1 failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
