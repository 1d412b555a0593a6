"""`imgsim serve --engine ray --replicas 2` on a real two-node Ray cluster started on this machine.

The service runs as it would for a user (the `imgsim` command, in its own process); every
check goes through Ray Serve's HTTP proxy. Which replica answered is in the
``x-imgsim-process`` header.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ray_cluster import free_port

pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[cluster]'")
pytest.importorskip("ray.serve", reason="Ray Serve is part of the optional extra: pip install -e '.[cluster]'")

START_SECONDS = 240


@dataclass
class Served:
    url: str
    port: int
    pairs: list[list[str]]  # per model: ["--model", M, "--index", I]


@pytest.fixture(scope="module")
def served_at(ray_cluster: str, service_pairs: list[Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Models a and b (copies of their indexes) served by 2 replicas on the cluster."""
    root = tmp_path_factory.mktemp("serve")
    pairs = []
    for pair in service_pairs:
        index = root / pair.index.name
        shutil.copytree(pair.index.parent / f".{pair.index.name}.imgsim", root / f".{index.name}.imgsim", symlinks=True)
        index.symlink_to(Path(f".{index.name}.imgsim") / pair.index.resolve().name)
        pairs.append(["--model", str(pair.model), "--index", str(index)])
    port = free_port()
    env = {**os.environ, "IMGSIM_RUNTIME": "tf", "IMGSIM_RELOAD_SECONDS": "1"}
    cmd = [sys.executable, "-m", "app.cli", "serve", "--engine", "ray", "--ray-address", ray_cluster, "--replicas", "2",
           "--port", str(port), *(arg for pair in pairs for arg in pair)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"imgsim serve --engine ray exited: {proc.stdout.read()[-3000:]}")  # type: ignore[union-attr]
            if len(_answering(url, 10)) == 2:
                break
            time.sleep(2)
        else:
            pytest.fail(f"2 replicas not answering after {START_SECONDS} s")
        yield Served(url, port, pairs)
    finally:
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: the deployment and its actors go too
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def served(served_at: Served) -> str:
    return served_at.url


def _answering(url: str, n: int, path: str = "/readyz") -> Counter:
    """replica -> how many of n requests (sent at once) it answered with 200."""

    def get(_: int) -> httpx.Response | None:
        try:
            return httpx.get(url + path, timeout=10)
        except httpx.HTTPError:
            return None

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(get, range(n)))
    return Counter(r.headers["x-imgsim-process"] for r in answers if r is not None and r.status_code == 200)


def _until(check: Any, seconds: float) -> float:
    """Seconds until check() holds (fails the test after ``seconds``)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > seconds:
            pytest.fail(f"not within {seconds} s")
        time.sleep(0.1)
    return time.monotonic() - start


def _png(path: Path) -> bytes:
    return next(path.glob("*.png")).read_bytes()


def test_the_api_answers_through_ray_serve(served: str, service_pairs: list[Any]) -> None:
    image = _png(service_pairs[0].model.parent / "colours" / "test" / "red")
    r = httpx.post(f"{served}/v1/search", data={"k": "3"}, files={"file": ("q.png", image, "image/png")}, timeout=30)
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 3
    assert httpx.get(f"{served}/openapi.json", timeout=10).json()["info"]["title"] == "imgsim"


def test_a_model_switch_reaches_every_replica(served: str) -> None:
    first, second = (m["name"] for m in httpx.get(f"{served}/v1/models", timeout=10).json()["models"])
    assert httpx.put(f"{served}/v1/models/active", json={"name": second}, timeout=10).status_code == 200

    def every_replica_on(name: str) -> bool:  # 8 requests at once: one check takes one request's time
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: httpx.get(f"{served}/v1/models", timeout=10), range(8)))
        replicas = {r.headers["x-imgsim-process"] for r in answers}
        return len(replicas) == 2 and all(r.json()["active"] == name for r in answers)

    assert _until(lambda: every_replica_on(second), 2.0) <= 2.0
    httpx.put(f"{served}/v1/models/active", json={"name": first}, timeout=10)
    _until(lambda: every_replica_on(first), 2.0)


def test_an_add_through_the_writer_is_visible_through_every_replica(served: str, service_pairs: list[Any]) -> None:
    image = _png(service_pairs[0].model.parent / "colours" / "test" / "blue")
    r = httpx.post(f"{served}/v1/images", files={"file": ("new.png", image + b"", "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    new_id = r.json()["ids"][0]
    assert _until(lambda: len(_answering(served, 8, f"/v1/images/{new_id}")) == 2, 5.0) <= 5.0


class Load:
    """Closed-loop clients on their own threads, as users: each answer's status and end time."""

    def __init__(self, url: str, clients: int = 4, call: Any = None) -> None:
        self.call = call or (lambda client: client.get(f"{url}/v1/models"))
        self.answers: list[tuple[float, int | str]] = []  # list.append is atomic: no lock needed
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    status: int | str = self.call(client).status_code
                except httpx.HTTPError:
                    status = "error"
                self.answers.append((time.monotonic(), status))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        time.sleep(2)  # steady state
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def codes(self) -> Counter:
        return Counter(status for _, status in self.answers)

    def failures(self) -> list[float]:
        return [t for t, status in self.answers if status != 200]

    def rate(self, start: float, end: float) -> float:
        """Answers with 200 per second between start and end."""
        return sum(1 for t, status in self.answers if start <= t < end and status == 200) / (end - start)


def _replica_processes() -> list[Any]:
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if "ServeReplica:imgsim" in " ".join(p.info["cmdline"] or [])]


def test_a_killed_replica_is_replaced_and_requests_keep_succeeding(served: str) -> None:
    replicas = _replica_processes()
    assert len(replicas) == 2
    with Load(served) as load:
        victim = replicas[0]
        killed_at = time.monotonic()
        victim.kill()  # SIGKILL, as a crash
        _until(lambda: len(_answering(served, 10)) == 2 and str(victim.pid) not in "".join(_answering(served, 10)), 120)
        recovered_at = time.monotonic()
        time.sleep(3)
    before, after = load.rate(killed_at - 2, killed_at), load.rate(recovered_at + 1, recovered_at + 3)
    print(f"replica killed under load: {dict(load.codes())}; {before:.0f} req/s before, {after:.0f} after")
    assert len(load.failures()) <= 4, load.codes()  # at most the requests inside the killed process (4 clients)
    assert after >= 0.5 * before, (before, after)  # throughput recovers


def test_a_lost_worker_node_costs_only_the_requests_inside_it(served: str) -> None:
    """The second node's raylet killed (as a machine lost): its replica is restarted on the
    head; afterwards the worker node joins again, for the tests that follow."""
    import psutil

    from tests.ray_cluster import rejoin_worker

    raylets = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"]
    worker_node = [p for p in raylets if "sockets/raylet." in " ".join(p.cmdline())]
    assert len(raylets) == 2 and len(worker_node) == 1
    try:
        with Load(served) as load:
            killed_at = time.monotonic()
            worker_node[0].kill()
            time.sleep(3)
            _until(lambda: len(_answering(served, 10)) == 2, 180)  # two replicas again, both on the head
            recovered_at = time.monotonic()
            time.sleep(3)
    finally:
        rejoin_worker()
    before, after = load.rate(killed_at - 2, killed_at), load.rate(recovered_at + 1, recovered_at + 3)
    failures = load.failures()
    print(f"worker node killed under load: {dict(load.codes())}; {before:.0f} req/s before, {after:.0f} after")
    # Only requests caught in the lost node fail: the replica's, and (both "nodes" share this
    # host and its port) those on connections its HTTP proxy held. None before the loss, none
    # once both replicas answer again.
    assert all(killed_at <= t <= killed_at + 10 for t in failures), (load.codes(), [t - killed_at for t in failures])
    assert not [t for t in failures if t > recovered_at], load.codes()
    assert after >= 0.5 * before, (before, after)  # throughput recovers


def test_a_detached_redeploy_upgrades_every_replica_without_a_failed_request(
    served_at: Served, ray_cluster: str, service_pairs: list[Any]
) -> None:
    """The documented upgrade: `imgsim serve --engine ray --detach` with the new models, run
    while the service is under load. Ray Serve starts the new replica before it stops the old
    ones, so even one replica (as here: 2 -> 1) upgrades without a failed request."""
    import psutil

    url = served_at.url
    old = set(_answering(url, 10))
    new_model = httpx.get(f"{url}/v1/models", timeout=10).json()["models"][1]["name"]
    image = _png(service_pairs[0].model.parent / "colours" / "test" / "red")

    def search(client: httpx.Client) -> httpx.Response:
        return client.post(f"{url}/v1/search", data={"k": "3"}, files={"file": ("q.png", image, "image/png")})

    cmd = [sys.executable, "-m", "app.cli", "serve", "--engine", "ray", "--ray-address", ray_cluster, "--replicas",
           "1", "--port", str(served_at.port), "--detach", *served_at.pairs[1]]  # fmt: skip
    env = {**os.environ, "IMGSIM_RUNTIME": "tf", "IMGSIM_RELOAD_SECONDS": "1"}
    with Load(url, call=search) as load:
        started = time.monotonic()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=START_SECONDS)
        took = time.monotonic() - started
        time.sleep(1)
    print(f"upgrade under load took {took:.1f} s: {dict(load.codes())}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not load.failures(), load.codes()
    old_pids = [int(p.rpartition(":")[2]) for p in old]
    _until(lambda: not any(psutil.pid_exists(pid) for pid in old_pids), 60)  # the old replicas are gone
    assert len(_replica_processes()) == 1 and not set(_answering(url, 10)) & old
    for _ in range(4):
        assert [m["name"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["models"]] == [new_model]


def test_autoscale_adds_a_replica_under_load(served_at: Served, ray_cluster: str, service_pairs: list[Any]) -> None:
    """`--autoscale 1:2`, deployed over the one replica left by the upgrade (an update keeps the
    running count within the bounds): a second replica once each holds more requests than a
    batch (IMGSIM_MAX_BATCH_SIZE=1 here)."""
    url = served_at.url
    cmd = [sys.executable, "-m", "app.cli", "serve", "--engine", "ray", "--ray-address", ray_cluster, "--autoscale",
           "1:2", "--port", str(served_at.port), "--detach", *served_at.pairs[0]]  # fmt: skip
    env = {**os.environ, "IMGSIM_RUNTIME": "tf", "IMGSIM_MAX_BATCH_SIZE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=START_SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    _until(lambda: len(_replica_processes()) == 1, 60)  # the old version's replica stops
    image = _png(service_pairs[0].model.parent / "colours" / "test" / "red")

    def search(client: httpx.Client) -> httpx.Response:
        return client.post(f"{url}/v1/search", data={"k": "3"}, files={"file": ("q.png", image, "image/png")})

    with Load(url, clients=8, call=search) as load:
        took = _until(lambda: len(_replica_processes()) == 2 and len(_answering(url, 10)) == 2, 150)
    print(f"autoscaled to 2 replicas after {took:.0f} s of load: {dict(load.codes())}")
    assert not load.failures(), load.codes()


def test_shutdown_stops_a_detached_deployment(served_at: Served, ray_cluster: str) -> None:
    cmd = [sys.executable, "-m", "app.cli", "serve", "--engine", "ray", "--ray-address", ray_cluster, "--shutdown"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "shut down" in done.stderr, done.stderr[-3000:]
    assert _until(lambda: not _answering(served_at.url, 2), 30) < 30  # nothing answers on the port
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "was not running" in again.stderr, again.stderr[-3000:]
