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
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ray_cluster import free_port

pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[cluster]'")
pytest.importorskip("ray.serve", reason="Ray Serve is part of the optional extra: pip install -e '.[cluster]'")

START_SECONDS = 240


@pytest.fixture(scope="module")
def served(ray_cluster: str, service_pairs: list[Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of models a and b (copies of their indexes) served by 2 replicas on the cluster."""
    root = tmp_path_factory.mktemp("serve")
    args = []
    for pair in service_pairs:
        index = root / pair.index.name
        shutil.copytree(pair.index.parent / f".{pair.index.name}.imgsim", root / f".{index.name}.imgsim", symlinks=True)
        index.symlink_to(Path(f".{index.name}.imgsim") / pair.index.resolve().name)
        args += ["--model", str(pair.model), "--index", str(index)]
    port = free_port()
    env = {**os.environ, "IMGSIM_RUNTIME": "tf", "IMGSIM_RELOAD_SECONDS": "1"}
    cmd = [sys.executable, "-m", "app.cli", "serve", "--engine", "ray", "--ray-address", ray_cluster, "--replicas", "2",
           "--port", str(port), *args]  # fmt: skip
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
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: the deployment and its actors go too
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


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


def test_a_killed_replica_is_replaced_and_requests_keep_succeeding(served: str) -> None:
    import psutil

    codes: Counter = Counter()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    codes[client.get(f"{served}/v1/models").status_code] += 1
                except httpx.HTTPError:
                    codes["error"] += 1

    replicas = [
        p for p in psutil.process_iter(["cmdline"]) if "ServeReplica:imgsim" in " ".join(p.info["cmdline"] or [])
    ]
    assert len(replicas) == 2
    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(2)
    victim = replicas[0]
    victim.kill()  # SIGKILL, as a crash
    before = sum(codes.values())
    _until(lambda: len(_answering(served, 10)) == 2 and str(victim.pid) not in "".join(_answering(served, 10)), 120)
    time.sleep(2)
    stop.set()
    for w in workers:
        w.join()
    failed = sum(n for code, n in codes.items() if code != 200)
    print(f"replica killed under load: {dict(codes)}")  # pytest -s shows the counts
    assert failed <= len(workers), codes  # at most the requests inside the killed process at that moment
    assert sum(codes.values()) > before  # and the service kept answering meanwhile


def test_a_lost_worker_node_costs_only_the_requests_inside_it(served: str) -> None:
    """The second node's raylet killed (as a machine lost): its replica is restarted on the
    head; afterwards the worker node joins again, for the tests that follow."""
    import psutil

    from tests.ray_cluster import rejoin_worker

    raylets = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"]
    worker_node = [p for p in raylets if "sockets/raylet." in " ".join(p.cmdline())]
    assert len(raylets) == 2 and len(worker_node) == 1
    codes: Counter = Counter()
    failures: list[float] = []  # when each failed request ended
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    status = client.get(f"{served}/v1/models").status_code
                except httpx.HTTPError:
                    status = "error"
                codes[status] += 1
                if status != 200:
                    failures.append(time.monotonic())

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(2)
    killed_at = time.monotonic()
    worker_node[0].kill()
    try:
        time.sleep(3)
        _until(lambda: len(_answering(served, 10)) == 2, 180)  # two replicas again, both on the head
        recovered_at, answered = time.monotonic(), sum(codes.values())
        time.sleep(2)
        assert sum(codes.values()) > answered
    finally:
        stop.set()
        for w in workers:
            w.join()
        rejoin_worker()
    print(f"worker node killed under load: {dict(codes)}")
    # Only requests caught in the lost node fail: the replica's, and (both "nodes" share this
    # host and its port) those on connections its HTTP proxy held. None before the loss, none
    # once both replicas answer again.
    assert all(killed_at <= t <= killed_at + 10 for t in failures), (codes, [t - killed_at for t in failures])
    assert not [t for t in failures if t > recovered_at], codes
