"""(2) The service end to end over real HTTP, from a separate client process.

Starts ``imgsim serve`` on 127.0.0.1 as a subprocess, waits for /readyz, then sends
``POST /v1/search`` (multipart, as curl -F and the web page do) with real JPEGs in a closed
loop at each concurrency level: C workers, each with its own keep-alive connection, each
sending its next request as soon as the previous one is answered, until ``--requests``
were sent or ``--max-seconds`` passed.

Per level: p50/p95/p99 latency of the 200s, answers/s, status counts (503 apart), client
errors, the medians of the service's Server-Timing parts, model calls by batch size and
the model's busy time (from /metrics), CPU ms per request of the service's event loop, its
other threads and this client. ``--overload-queue N`` then restarts the service with
IMGSIM_MAX_QUEUE=N (and IMGSIM_MAX_QUEUE_MS) and reruns the highest level, so that the
queue limits are hit: only 503s may appear, and the p99 of admitted requests is bounded.

Only 127.0.0.1 is ever contacted. The service is always stopped at the end.

    python -m benchmarks.service --model runs/resnet50-cifar10 --index indexes/resnet50-cifar10-hnsw16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import (
    DEFAULT_DATA,
    IMAGE_SOURCES,
    describe_images,
    die_with_parent,
    latency_percentiles,
    load_jpegs,
    log,
    parse_int_list,
    sigterm_as_exit,
    write_json,
)

HOST = "127.0.0.1"  # never anything else


def free_port(start: int = 8090) -> int:
    for port in range(start, start + 100):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind((HOST, port))
            return port
    raise RuntimeError(f"no free port in {start}..{start + 99}")


class Service:
    """``imgsim serve`` in a subprocess; a context manager that always stops it."""

    def __init__(
        self, model: Path, index: Path, env: dict[str, str], log_path: Path, timeout: float, extra: tuple = ()
    ) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        exe = Path(sys.executable).parent / "imgsim"
        self.command = [str(exe), "serve", "--model", str(model), "--index", str(index), "--host", HOST,
                        "--port", str(self.port), "--log-level", "warning", *extra]  # fmt: skip
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env}
        self.log_path, self.timeout = log_path, timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        start = time.perf_counter()
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509
            )  # fmt: skip
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"service exited with code {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    r = httpx.get(f"{self.url}/readyz", timeout=2.0)
                    if r.status_code == 200:
                        self.ready_seconds, self.ready_body = time.perf_counter() - start, r.json()
                        self.ps = psutil.Process(self.proc.pid)
                        return self
                if time.perf_counter() - start > self.timeout:
                    raise RuntimeError(f"service not ready after {self.timeout:.0f} s:\n{self.log_tail()}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def rss_mb(self) -> float:
        return round(self.ps.memory_info().rss / 2**20, 1)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds of the event loop (the main thread) and of all other threads."""
        out = {"event_loop": 0.0, "other_threads": 0.0}
        for t in self.ps.threads():
            out["event_loop" if t.id == self.ps.pid else "other_threads"] += t.user_time + t.system_time
        return out

    def stop(self) -> None:
        """SIGINT (uvicorn's graceful shutdown), then SIGTERM, then SIGKILL; only our own child."""
        for sig, wait in ((signal.SIGINT, 20.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc is None or self.proc.poll() is not None:
                return
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scrape(url: str) -> dict[str, float]:
    """The service's /metrics: each sample summed over its labels but ``le``."""
    out: Counter[str] = Counter()
    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name + (f":{s.labels['le']}" if "le" in s.labels else "")] += s.value
    return out


def model_calls(m0: dict[str, float], m1: dict[str, float], wall: float) -> dict[str, Any]:
    """Model calls between two scrapes: mean batch, busy share, calls by batch size, longest call."""
    d = {k: m1[k] - m0.get(k, 0.0) for k in m1}
    calls, images = d.get("imgsim_batch_size_count", 0), d.get("imgsim_batch_size_sum", 0)
    buckets = sorted((float(k.split(":")[1]), v) for k, v in d.items() if k.startswith("imgsim_batch_size_bucket:"))
    sizes, below, lower = {}, 0.0, 0
    for bound, cumulative in buckets:
        if bound == float("inf"):
            label = f">{lower}"
        else:
            label = str(int(bound)) if int(bound) == lower + 1 else f"{lower + 1}-{int(bound)}"
            lower = int(bound)
        if cumulative > below:
            sizes[label] = int(cumulative - below)
        below = cumulative
    edges = sorted((float(k.split(":")[1]), v) for k, v in d.items() if k.startswith("imgsim_batch_seconds_bucket:"))
    longest = next((e for e, v in edges if v >= calls), None) if calls else None
    busy = d.get("imgsim_batch_seconds_sum", 0.0)
    return {
        "mean_batch": round(images / calls, 2) if calls else None,
        "model_busy_fraction": round(busy / wall, 3),
        "batch_sizes": sizes,
        "longest_call_ms_at_most": None if longest in (None, float("inf")) else longest * 1000,
    }


def multipart(jpeg: bytes, filename: str, k: int) -> tuple[bytes, str]:
    """A multipart/form-data body encoded once, up front (keeps the client lean)."""
    b = uuid.uuid4().hex
    body = (
        (
            f'--{b}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + jpeg
        + f"\r\n--{b}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={b}"


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams (one connection, requests in turn).

    Written by hand because the client shares the machine's 2 cores with the service: httpx
    spends several times more CPU per request, which lands on the latency at concurrency 1
    and is taken from the model at high concurrency. This one only understands responses
    with Content-Length, which is what the service sends.
    """

    def __init__(self, url: str, timeout: float) -> None:
        self.host, port = url.removeprefix("http://").rsplit(":", 1)
        self.port, self.timeout = int(port), timeout
        self._rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes, str]:
        """(status, body, Server-Timing header)."""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        try:
            return await asyncio.wait_for(self._exchange(head + body), self.timeout)
        except BaseException:
            self.close()  # a half-read connection cannot be reused
            raise

    async def _exchange(self, request: bytes) -> tuple[int, bytes, str]:
        if self._rw is None:
            self._rw = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._rw
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        body = await reader.readexactly(int(length.group(1))) if length else b""
        timing = re.search(rb"(?i)\r\nserver-timing:\s*([^\r\n]*)", head)
        return int(head.split(b" ", 2)[1]), body, timing.group(1).decode() if timing else ""

    def close(self) -> None:
        if self._rw is not None:
            self._rw[1].close()
            self._rw = None


def parse_server_timing(value: str) -> dict[str, float]:
    """'parse;dur=0.2, decode;dur=0.35' -> {'parse': 0.2, 'decode': 0.35} (ms)."""
    return {n: float(d[4:]) for n, _, d in (p.strip().partition(";") for p in value.split(",")) if d.startswith("dur=")}


async def _closed_loop(
    svc: Service, payloads: list, c: int, n: int, args: argparse.Namespace, on_warm: Callable[[], None]
) -> dict[str, Any]:
    """``c`` workers, one warm-up request each (neither counted nor timed: ``on_warm`` runs after
    them, before the measured part), then ``n`` measured requests."""
    clients = [RawClient(svc.url, args.timeout) for _ in range(c)]
    statuses: Counter[int] = Counter()
    ok, stages, samples = [], {}, []
    sent = 0
    await asyncio.gather(*(cl.post(args.endpoint, *payloads[i % len(payloads)]) for i, cl in enumerate(clients)))
    on_warm()
    stop_at = time.perf_counter() + args.max_seconds

    async def worker(cl: RawClient) -> None:
        nonlocal sent
        while sent < n and time.perf_counter() < stop_at:
            sent += 1
            t0 = time.perf_counter()
            try:
                status, body, timing = await cl.post(args.endpoint, *payloads[sent % len(payloads)])
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                statuses[-1] += 1
                samples.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            statuses[status] += 1
            if status == 200:
                ok.append(time.perf_counter() - t0)
                for name, ms in parse_server_timing(timing).items():
                    stages.setdefault(name, []).append(ms)
            elif status == 503:
                await asyncio.sleep(args.retry_sleep)  # as a client honouring Retry-After
            else:
                samples.append(f"HTTP {status}: {body[:200]!r}")

    await asyncio.gather(*(worker(cl) for cl in clients))
    for cl in clients:
        cl.close()
    return {"statuses": statuses, "ok": ok, "stages": stages, "samples": samples[:3], "sent": sent}


def run_level(svc: Service, payloads: list, c: int, args: argparse.Namespace) -> dict[str, Any]:
    mark: dict[str, Any] = {}

    def on_warm() -> None:  # the counters and the clock start once every connection is warm
        mark.update(m0=scrape(svc.url), cpu0=svc.cpu_seconds(), client0=time.process_time())
        mark["start"] = time.perf_counter()

    r = asyncio.run(_closed_loop(svc, payloads, c, max(args.requests, 2 * c), args, on_warm))
    wall = time.perf_counter() - mark["start"]
    m0, cpu0, client0 = mark["m0"], mark["cpu0"], mark["client0"]
    cpu1, client_s, m1 = svc.cpu_seconds(), time.process_time() - client0, scrape(svc.url)
    answered = max(1, sum(r["statuses"].values()))
    level = {
        "concurrency": c,
        "ok": len(r["ok"]),
        "rejected_503": r["statuses"][503],
        "other_errors": sum(v for k, v in r["statuses"].items() if k not in (200, 503)),
        "error_samples": r["samples"],
        "latency_ok": latency_percentiles(r["ok"]),
        "ok_per_s": round(len(r["ok"]) / wall, 2),
        "server_timing_p50_ms": {k: round(statistics.median(v), 3) for k, v in r["stages"].items()},
        "stopped_by_time_cap": r["sent"] < max(args.requests, 2 * c),
        "cpu_ms_per_request": {
            **{k: round((cpu1[k] - cpu0[k]) * 1000 / answered, 2) for k in cpu0},
            "client": round(client_s * 1000 / answered, 2),
        },
        "server": model_calls(m0, m1, wall),
        "rss_mb_after": svc.rss_mb(),
    }
    lat = level["latency_ok"]
    log(
        f"c={c:3d}: {level['ok']} ok, {level['rejected_503']} x 503, {level['other_errors']} errors; "
        f"p50 {lat.get('p50_ms')} p99 {lat.get('p99_ms')} ms; {level['ok_per_s']} req/s; "
        f"mean batch {level['server']['mean_batch']}; server timing {level['server_timing_p50_ms']}"
    )
    return level


def settings_of(env: dict[str, str]) -> dict[str, Any]:
    """The service settings that environment gives (the same pydantic settings the service reads)."""
    from app.config import ServiceSettings

    with contextlib.ExitStack() as stack:
        saved = dict(os.environ)
        stack.callback(lambda: (os.environ.clear(), os.environ.update(saved)))
        os.environ.update(env)
        s = ServiceSettings()
    keys = ("max_batch_size", "max_queue", "max_queue_ms", "model_streams", "faiss_threads")
    return {k: getattr(s, k) for k in keys}


def run_service_bench(args: argparse.Namespace) -> dict[str, Any]:
    from models.encoders import describe

    env = dict(kv.split("=", 1) for kv in args.env)
    m, _ = describe(args.model)  # a MODEL_DIR, a backbone name or any encoder --model takes
    images = load_jpegs(args.images, args.n_images, args.data)
    payloads = [multipart(data, Path(name).name, args.k) for name, data in images]
    levels = parse_int_list(args.concurrency)
    result: dict[str, Any] = {
        "kind": "service", "model_dir": str(args.model), "index_dir": str(args.index), "backbone": m.backbone,
        "input_size": m.input_size, "endpoint": args.endpoint, "k": args.k,
        "images": {"source": args.images, **describe_images(images)},
        "client": {"requests_per_level": args.requests, "max_seconds_per_level": args.max_seconds},
        "env": env, "settings": settings_of(env), "levels": [],
    }  # fmt: skip
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="imgsim-bench-") as tmp:
        with Service(args.model, args.index, env, Path(tmp) / "service.log", args.startup_timeout) as svc:
            result.update(startup_seconds=round(svc.ready_seconds, 1), ready=svc.ready_body, rss_mb_idle=svc.rss_mb())
            result["runtime"] = next(iter((svc.ready_body.get("runtimes") or {"": "?"}).values()))
            result["levels"] = [run_level(svc, payloads, c, args) for c in levels]
        if args.overload_queue:
            env2 = {
                **env,
                "IMGSIM_MAX_QUEUE": str(args.overload_queue),
                "IMGSIM_MAX_QUEUE_MS": str(args.overload_queue_ms),
            }
            log(f"overload: IMGSIM_MAX_QUEUE={args.overload_queue}, IMGSIM_MAX_QUEUE_MS={args.overload_queue_ms}")
            with Service(args.model, args.index, env2, Path(tmp) / "overload.log", args.startup_timeout) as svc:
                result["overload"] = {**run_level(svc, payloads, max(levels), args), "settings": settings_of(env2)}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.service", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="MODEL_DIR, backbone name or any encoder --model takes")
    p.add_argument("--index", type=Path, required=True, help="INDEX_DIR built from that model")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels (default %(default)s)")
    p.add_argument("--requests", type=int, default=400, help="measured requests per level (default %(default)s)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="time cap per level (default %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s (default %(default)s)")
    p.add_argument("--endpoint", default="/v1/search", help="default %(default)s")
    p.add_argument("--k", type=int, default=5, help="neighbours asked for (default %(default)s)")
    p.add_argument("--images", choices=IMAGE_SOURCES, default="cifar", help="JPEG source (default %(default)s)")
    p.add_argument("--n-images", type=int, default=64, help="distinct JPEGs (default %(default)s)")
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 JPEG archive (default %(default)s)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="service environment (repeatable)")
    p.add_argument("--overload-queue", type=int, default=0, help="then rerun the top level with IMGSIM_MAX_QUEUE=N")
    p.add_argument("--overload-queue-ms", type=float, default=250.0, help="and IMGSIM_MAX_QUEUE_MS (default 250)")
    p.add_argument("--retry-sleep", type=float, default=0.1, help="a worker's pause after a 503, s (default 0.1)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="s to wait for /readyz (default 300)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="few requests per level (smoke run)")
    args = p.parse_args(argv)
    if bad := [kv for kv in args.env if "=" not in kv]:
        p.error(f"--env wants KEY=VALUE, got {bad[0]!r}")
    if args.quick:
        args.requests, args.max_seconds, args.n_images = min(args.requests, 40), 15.0, 16
    write_json(args.json, run_service_bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
