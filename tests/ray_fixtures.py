"""A real local Ray cluster for the tests: the session's head node (`ray_cluster`, made a fixture of
every test file by conftest), nodes joined to it and lost (`ray_nodes`), a cut in the network between
the server and the cluster (`Proxy`), and what a test reads of the cluster (a job's submissions, its
worker process, the resources Ray gave it). Knows nothing of the service's API."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from select import select

import psutil
import pytest

from jobs.runner import free_port

RAY = importlib.util.find_spec("ray") is not None


def need_ray() -> None:
    """Skip the test without Ray; under CI, fail it (CI runs the Ray tests)."""
    if not RAY:
        if os.environ.get("CI") == "true":
            pytest.fail("Ray is not installed: CI runs the Ray tests (pip install -r requirements-ray.txt)")
        pytest.skip("Ray is not installed: pip install -r requirements-ray.txt")


class Cluster:
    def __init__(self, address: str, gcs: str, temp: str, env: dict[str, str]):
        self.address, self.gcs, self.temp, self.env = address, gcs, temp, env

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)


def ray_command() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray")


def in_session(p: psutil.Process, sid: int) -> bool:
    try:
        return os.getsid(p.pid) == sid
    except (ProcessLookupError, psutil.Error):
        return False


def stop_session(proc: subprocess.Popen) -> None:
    """Stop a `ray start --block` process and anything left in its session (never `ray stop`, which
    would stop every Ray on the machine)."""
    proc.terminate()  # `ray start --block` stops what it started
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    for p in psutil.process_iter():
        if in_session(p, proc.pid):
            try:
                p.kill()
            except psutil.Error:
                pass


def own_ports() -> list[str]:
    """A port of the node's own for its dashboard agent, which Ray would otherwise take from its
    default (52365), where two nodes or two test sessions on one machine collide."""
    return [f"--dashboard-agent-listen-port={free_port()}"]


@pytest.fixture(scope="session")
def ray_cluster():
    """A head node of 2 CPUs and 1 (pretend) GPU with token auth, on loopback, for the session."""
    need_ray()
    if "ray" in sys.modules and os.environ.get("RAY_AUTH_MODE") != "token":
        pytest.fail("Ray was imported before the cluster's token auth was set, and reads its mode once, at import: "
                    "run the tests that import Ray without the cluster after those that use it")
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)  # this process's clients use the token too
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    port, gcs = free_port(), free_port()
    log = open(Path(temp) / "ray-start.log", "wb")
    head = subprocess.Popen(
        [ray_command(), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=1", "--disable-usage-stats",
         "--include-dashboard=true", f"--dashboard-port={port}", f"--port={gcs}", f"--temp-dir={temp}",
         f"--ray-client-server-port={free_port()}", *own_ports()],
        env={**os.environ, **auth}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp)
    cluster = Cluster(f"http://127.0.0.1:{port}", f"127.0.0.1:{gcs}", temp, auth)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                cluster.client()
                break
            except ConnectionError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head did not start: {(Path(temp) / 'ray-start.log').read_text()[-3000:]}")
                time.sleep(0.5)
        # The Jobs API answers before the head node is listed with its resources: wait for its GPU, which
        # the tests (and a server with TRAIN_GPUS unset) read from the state API.
        while not any(n.resources_total.get("GPU") for n in alive_nodes(cluster)):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head was not listed with its GPU: {(Path(temp) / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield cluster
    finally:
        stop_session(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def alive_nodes(cluster: Cluster) -> list:
    from ray.util.state import list_nodes

    # Not a filter on state: with one, Ray 2.60 counts the dead nodes as truncated output and raises.
    return [n for n in list_nodes(address=cluster.address, limit=10_000, detail=True) if n.state == "ALIVE"]


class Node:
    """A worker node joined to the cluster (`ray start --address`), in a process session of its own."""

    def __init__(self, cluster: Cluster, cpus: int, gpus: int):
        before = {n.node_id for n in alive_nodes(cluster)}
        self.log = open(Path(cluster.temp) / f"node-{free_port()}.log", "wb")
        self.proc = subprocess.Popen(
            [ray_command(), "start", f"--address={cluster.gcs}", "--block", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
             "--disable-usage-stats", f"--temp-dir={cluster.temp}", *own_ports()],
            env={**os.environ, **cluster.env}, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=cluster.temp)
        deadline = time.monotonic() + 120
        while not (joined := [n.node_id for n in alive_nodes(cluster) if n.node_id not in before]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray node did not join: {Path(self.log.name).read_text()[-3000:]}")
            time.sleep(0.5)
        self.node_id = joined[0]

    def lose(self) -> None:
        """The machine gone: every process of the node (its raylet, agents, workers and what they
        started) killed at once, nothing told."""
        root = psutil.Process(self.proc.pid)
        doomed = [root, *root.children(recursive=True)]
        doomed += [p for p in psutil.process_iter() if p not in doomed and in_session(p, self.proc.pid)]
        for p in doomed:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_session(self.proc)
        self.log.close()


@pytest.fixture
def ray_nodes(ray_cluster):
    """`join(cpus, gpus)`: a node joined to the session's cluster; each is stopped after the test."""
    nodes = []

    def join(cpus: int, gpus: int) -> Node:
        nodes.append(Node(ray_cluster, cpus, gpus))
        return nodes[-1]

    yield join
    for node in nodes:
        node.stop()


class Proxy(socketserver.ThreadingTCPServer):
    """The network between the server and the cluster's dashboard, on loopback: a TCP proxy that a test
    cuts (new connections refused, open ones closed) and mends, on the same port."""

    daemon_threads = allow_reuse_address = True

    def __init__(self, target: str):
        host, port = target.removeprefix("http://").split(":")
        self.target, self.port, self.open = (host, int(port)), free_port(), set()
        self.address = f"http://127.0.0.1:{self.port}"
        super().__init__(("127.0.0.1", self.port), _Pipe, bind_and_activate=False)
        self.socket.close()
        self.mend()

    def mend(self) -> None:
        self.socket = socket.socket(self.address_family, self.socket_type)
        self.server_bind()
        self.server_activate()
        self._serving = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._serving.start()

    def cut(self) -> None:
        self.shutdown()
        self.server_close()
        for conn in list(self.open):
            conn.close()

    def close(self) -> None:
        if self._serving.is_alive():
            self.cut()


class _Pipe(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        upstream = socket.create_connection(self.server.target)
        self.server.open.update((self.request, upstream))
        try:
            while True:
                ready, _, _ = select([self.request, upstream], [], [])
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return
                    (upstream if source is self.request else self.request).sendall(data)
        except OSError:
            return  # cut
        finally:
            self.server.open.difference_update((self.request, upstream))
            upstream.close()


def ray_env(env: dict, cluster: Cluster, address: str | None = None, **more: str | None) -> dict[str, str]:
    """A server's settings for jobs on the cluster (reached at `address`, by default its own); a None
    in `more` leaves that setting unset."""
    values = {**env, **cluster.env, "EXECUTOR": "ray", "RAY_ADDRESS": address or cluster.address, "TRAIN_GPUS": "0.5",
              "PROGRESS_INTERVAL_S": "0", "TRAIN_WORKERS": "2", **more}
    return {k: v for k, v in values.items() if v is not None}


def submissions(cluster: Cluster, job_id: str) -> list[str]:
    return sorted(j.submission_id for j in cluster.client().list_jobs() if (j.submission_id or "").startswith(f"persona-lora-{job_id}-"))


def resources_given(cluster: Cluster, sid: str) -> dict[str, float]:
    """The resources Ray reserved for a submission (those of the actor that runs its entrypoint)."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.address, filters=[("class_name", "=", "JobSupervisor")], detail=True, limit=10_000)
    return next(a.required_resources for a in actors if a.name.endswith(f"_{sid}"))
