"""(2) The service end to end over real HTTP, from a separate client process.

Starts ``imgsim serve --model M --index I --host 127.0.0.1 --port P`` as a subprocess, waits
for /readyz, then (in this process: one event loop, one httpx.AsyncClient with one keep-alive
connection per worker, bodies encoded up front) sends ``POST /v1/search`` with real JPEGs in a closed
loop at each concurrency level: C workers, each sending its next request as soon as the
previous one answered, until ``--requests`` were sent or ``--max-seconds`` passed.

Per level: p50/p95/p99 latency of the 200 answers, answers/s, status counts (503 apart),
client-side errors, the mean micro-batch size and the model's busy time (from the
service's /metrics), and CPU seconds used by the service and by this client (which shares
the machine with the service). After all levels: the service's resident memory.

``--overload-queue N`` then restarts the service with IMGSIM_MAX_QUEUE=N (and, with
``--overload-queue-ms MS``, IMGSIM_MAX_QUEUE_MS=MS) and runs the last (highest) level again,
so that the queue limits are actually hit: only 503s may appear (workers pause
``--retry-sleep`` after one, like a client honouring Retry-After), and the p99 of the
admitted requests is bounded by the queue.

Only 127.0.0.1 is ever contacted. The service is always stopped at the end.

    python -m benchmarks.service --model runs/resnet50-cifar10 --index indexes/resnet50-cifar10
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
from pathlib import Path
from typing import Any, Self

from benchmarks.common import (
    DEFAULT_DATA,
    IMAGE_SOURCES,
    describe_images,
    die_with_parent,
    latency_percentiles,
    load_jpegs,
    log,
    parse_int_list,
    quiet_tensorflow,
    read_manifest,
    sigterm_as_exit,
    summarise,
    time_calls,
    write_json,
)

HOST = "127.0.0.1"  # never anything else
FIRST_PORT = 8090
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --------------------------------------------------------------------------- the service process


def free_port(start: int = FIRST_PORT, tries: int = 100) -> int:
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + tries - 1}")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) of a process."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of the event loop (the main thread) and of all other threads (TensorFlow's
    pools, the inference thread, decode threads, FAISS).

    Where the service's CPU goes when the model is busy: every ms the event loop spends on a
    request is a ms TensorFlow's threads do not get on a 2-core machine.
    """
    out = {"event_loop": 0.0, "other_threads": 0.0}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        fields = stat[stat.rindex(")") + 2 :].split()
        out["event_loop" if task.name == str(pid) else "other_threads"] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


class Service:
    """``imgsim serve`` in a subprocess; a context manager that always stops it."""

    def __init__(
        self,
        model: Path,
        index: Path,
        port: int,
        env: dict[str, str],
        log_path: Path,
        startup_timeout: float,
    ) -> None:
        self.model, self.index, self.port = model, index, port
        self.env = env
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_seconds: float | None = None
        self.ready_body: dict[str, Any] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        exe = Path(sys.executable).parent / "imgsim"
        head = [str(exe)] if exe.is_file() else [sys.executable, "-m", "app.cli"]
        return [
            *head,
            "serve",
            "--model",
            str(self.model),
            "--index",
            str(self.index),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]

    def __enter__(self) -> Self:
        env = {**os.environ, **self.env}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.log_file = open(self.log_path, "wb")  # closed in stop()
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the client, which then stops the service in order
            preexec_fn=die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
        try:
            self._wait_ready(start)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, start: float) -> None:
        import httpx

        assert self.proc is not None
        deadline = start + self.startup_timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"service exited with code {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    r = client.get(f"{self.url}/readyz")
                    if r.status_code == 200:
                        self.ready_seconds = time.perf_counter() - start
                        self.ready_body = r.json()
                        return
                except httpx.HTTPError:
                    pass
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"service not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")
                time.sleep(0.5)

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int | None:
        """SIGINT (uvicorn's graceful shutdown), then SIGTERM, then SIGKILL; only our own child."""
        proc = self.proc
        if proc is None:
            return None
        for sig, wait in ((signal.SIGINT, 20.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
        with contextlib.suppress(Exception):
            self.log_file.close()
        return proc.poll()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- /metrics


_TOOK = re.compile(rb'"took_ms":\s*([0-9.]+)')
_METRIC = re.compile(r"^(imgsim_[a-z_]+)(?:\{[^}]*\})?\s+([0-9.eE+-]+|NaN)$")
WANTED = (
    "imgsim_batch_size_sum",
    "imgsim_batch_size_count",
    "imgsim_batch_seconds_sum",
    "imgsim_rejected_total",
    "imgsim_request_seconds_sum",
    "imgsim_request_seconds_count",
)


_BUCKET = re.compile(r'^imgsim_batch_(size|seconds)_bucket\{[^}]*le="([0-9.+Inf]+)"[^}]*\}\s+([0-9.eE+-]+)$')


def parse_metrics(text: str) -> dict[str, float]:
    """Sum of each wanted series over its labels; buckets of batch sizes as ``batch_le:<bound>``,
    of model-call seconds as ``call_le:<bound>``."""
    out = dict.fromkeys(WANTED, 0.0)
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m and m.group(1) in out and m.group(2) != "NaN":
            out[m.group(1)] += float(m.group(2))
            continue
        b = _BUCKET.match(line)
        if b:
            key = f"{'batch' if b.group(1) == 'size' else 'call'}_le:{b.group(2)}"
            out[key] = out.get(key, 0.0) + float(b.group(3))
    return out


def batch_histogram(m0: dict[str, float], m1: dict[str, float]) -> dict[str, int]:
    """Model calls per batch-size range between two scrapes (from the cumulative buckets)."""
    bounds = sorted((float(k.split(":")[1]), k) for k in m1 if k.startswith("batch_le:"))
    out: dict[str, int] = {}
    cumulative_below, lower = 0.0, 0  # calls in the buckets so far; their upper bound
    for bound, key in bounds:
        cumulative = m1[key] - m0.get(key, 0.0)
        if bound == float("inf"):
            label = f">{lower}"
        else:
            label = str(int(bound)) if int(bound) == lower + 1 else f"{lower + 1}-{int(bound)}"
            lower = int(bound)
        if cumulative > cumulative_below:
            out[label] = int(cumulative - cumulative_below)
        cumulative_below = cumulative
    return out


def longest_call_ms(m0: dict[str, float], m1: dict[str, float]) -> float | None:
    """Upper edge of the histogram bucket holding the longest model call between two scrapes."""
    buckets = sorted((float(k.split(":")[1]), m1[k] - m0.get(k, 0.0)) for k in m1 if k.startswith("call_le:"))
    if not buckets or buckets[-1][1] <= 0:
        return None
    edge = next(edge for edge, calls in buckets if calls >= buckets[-1][1])  # the first that holds every call
    return None if edge == float("inf") else edge * 1000


async def get_metrics(client: Any, url: str) -> dict[str, float]:
    try:
        r = await client.get(f"{url}/metrics")
        return parse_metrics(r.text) if r.status_code == 200 else {}
    except Exception:  # noqa: BLE001 - metrics are diagnostics only
        return {}


# --------------------------------------------------------------------------- load


UPLOADS = {
    "multipart": "multipart bodies encoded once up front",
    "raw": "raw JPEG bodies (Content-Type: image/jpeg, k in the query)",
}


def multipart(jpeg: bytes, filename: str, fields: dict[str, str]) -> tuple[bytes, str]:
    """A multipart/form-data body encoded once, up front (keeps the client lean)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + jpeg
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class RawResponse:
    """Just what run_level reads from a response."""

    def __init__(self, status_code: int, content: bytes, server_timing: str = "") -> None:
        self.status_code = status_code
        self.content = content
        self.headers = {"server-timing": server_timing} if server_timing else {}

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        import json

        return json.loads(self.content)


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams (one connection, requests in turn).

    The default client: the client shares the machine's 2 cores with the service, and
    httpx spends ~1.6 ms of CPU per request (measured), which lands on the latency at
    concurrency 1 and is taken from the model at high concurrency. This one needs ~0.2 ms,
    like wrk would; it only understands responses with Content-Length, which is what the
    service sends. httpx runs as the cross-check (``--cross-client``).
    """

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes, content_type: str) -> RawResponse:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        try:
            return await asyncio.wait_for(self._exchange(head + body), self.timeout)
        except BaseException:
            await self.aclose()  # a half-read connection cannot be reused
            raise

    async def _exchange(self, request: bytes) -> RawResponse:
        if self._rw is None:
            self._rw = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._rw
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        m = _CONTENT_LENGTH.search(head)
        body = await reader.readexactly(int(m.group(1))) if m else b""
        if re.search(rb"(?i)\r\nconnection:\s*close", head):
            await self.aclose()
        timing = _SERVER_TIMING.search(head)
        return RawResponse(status, body, timing.group(1).decode() if timing else "")

    async def aclose(self) -> None:
        if self._rw is not None:
            _, writer = self._rw
            self._rw = None
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
_SERVER_TIMING = re.compile(rb"(?i)\r\nserver-timing:\s*([^\r\n]*)")


def parse_server_timing(value: str) -> dict[str, float]:
    """'parse;dur=0.2, decode;dur=0.35' -> {'parse': 0.2, 'decode': 0.35} (ms); other parts are skipped."""
    out = {}
    for part in value.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, v = param.strip().partition("=")
            if key == "dur" and name:
                with contextlib.suppress(ValueError):
                    out[name] = float(v)
    return out


CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    TimeoutError,
    ValueError,
)


async def run_level(
    url: str,
    endpoint: str,
    payloads: list[tuple[bytes, str]],
    concurrency: int,
    n_requests: int,
    max_seconds: float,
    timeout: float,
    retry_sleep: float,
    server_pid: int,
    client_kind: str = "httpx",
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` workers; one uncounted warm-up request each, then measured."""
    import httpx

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    ok_lat: list[float] = []
    took: list[float] = []  # the service's own "took_ms" (handler start -> response built)
    stage_ms: dict[str, list[float]] = {}  # its Server-Timing header: where that time went
    rejected_lat: list[float] = []
    other_lat: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    error_samples: list[str] = []
    sample: dict[str, Any] = {}
    next_i = 0
    warmed = 0
    all_warm = asyncio.Event()
    go = asyncio.Event()
    stop_at = 0.0
    target = f"{url}{endpoint}"

    # One client (= one keep-alive connection) per worker: a single AsyncClient shared by many
    # concurrent requests spends much of its time in its connection pool (encode/httpx#3215).
    if client_kind == "raw":
        host, port = url.removeprefix("http://").rsplit(":", 1)
        clients: list[Any] = [RawClient(host, int(port), timeout) for _ in range(concurrency)]
        errors_caught: tuple[type[BaseException], ...] = CLIENT_ERRORS
    else:
        clients = [httpx.AsyncClient(limits=limits, timeout=timeout) for _ in range(concurrency)]
        errors_caught = (httpx.HTTPError,)
    async with contextlib.AsyncExitStack() as stack:
        for cl in clients:
            stack.push_async_callback(cl.aclose)
        side = await stack.enter_async_context(httpx.AsyncClient(timeout=10.0))  # /metrics

        async def post(i: int, w: int) -> Any:
            body, ctype = payloads[i % len(payloads)]
            if client_kind == "raw":
                return await clients[w].post(endpoint, body, ctype)
            return await clients[w].post(target, content=body, headers={"content-type": ctype})

        async def worker(w: int) -> None:
            nonlocal next_i, warmed
            try:  # warm-up: opens this worker's connection; not counted (measured requests count errors)
                with contextlib.suppress(Exception):
                    await post(w, w)
            finally:
                warmed += 1
                if warmed == concurrency:
                    all_warm.set()
            await go.wait()
            while next_i < n_requests and time.perf_counter() < stop_at:
                i = next_i
                next_i += 1
                t0 = time.perf_counter()
                try:
                    r = await post(i, w)
                except errors_caught as exc:
                    errors[type(exc).__name__] += 1
                    if len(error_samples) < 3:
                        error_samples.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                dt = time.perf_counter() - t0
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    ok_lat.append(dt)
                    m = _TOOK.search(r.content)
                    if m:
                        took.append(float(m.group(1)) / 1000.0)
                    for name, ms in parse_server_timing(r.headers.get("server-timing", "")).items():
                        stage_ms.setdefault(name, []).append(ms)
                    if not sample:
                        try:
                            body = r.json()
                            sample.update(model=body.get("model"), results=len(body.get("results", [])))
                        except ValueError as exc:
                            sample["unparseable"] = str(exc)[:200]
                elif r.status_code == 503:
                    rejected_lat.append(dt)
                    if retry_sleep > 0:
                        await asyncio.sleep(retry_sleep)
                else:
                    other_lat.append(dt)
                    if len(error_samples) < 3:
                        error_samples.append(f"HTTP {r.status_code}: {r.text[:200]}")

        tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
        hard_cap = max_seconds + timeout + 30.0  # the level ends even if something hangs
        try:  # every worker has its connection and the service has answered once
            await asyncio.wait_for(all_warm.wait(), timeout + 30.0)
        except TimeoutError:
            for t in tasks:
                t.cancel()
            raise RuntimeError(f"warm-up of {concurrency} workers did not finish in {timeout + 30:.0f} s") from None
        m0 = await get_metrics(side, url)
        cpu_srv0, cpu_cli0 = proc_cpu_seconds(server_pid), time.process_time()
        threads0 = thread_cpu_seconds(server_pid)
        start = time.perf_counter()
        stop_at = start + max_seconds
        go.set()
        done, pending = await asyncio.wait(tasks, timeout=hard_cap)
        for t in pending:
            t.cancel()
            errors["LevelHardCap"] += 1
        for t in done:
            if t.exception() is not None:
                raise t.exception()
        wall = time.perf_counter() - start
        cpu_srv1, cpu_cli1 = proc_cpu_seconds(server_pid), time.process_time()
        threads1 = thread_cpu_seconds(server_pid)
        m1 = await get_metrics(side, url)

    n_ok = len(ok_lat)
    out: dict[str, Any] = {
        "concurrency": concurrency,
        "sent": next_i,
        "wall_s": round(wall, 3),
        "ok": n_ok,
        "rejected_503": statuses.get(503, 0),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "client_errors": dict(errors),
        "other_errors": sum(v for k, v in statuses.items() if k not in (200, 503)) + sum(errors.values()),
        "error_samples": error_samples,
        "latency_ok": latency_percentiles(ok_lat),
        "latency_503": latency_percentiles(rejected_lat),
        "service_took_ms": latency_percentiles(took),
        "server_timing_p50_ms": {name: round(statistics.median(v), 3) for name, v in stage_ms.items()},
        "ok_per_s": round(n_ok / wall, 2) if wall > 0 else 0.0,
        "answers_per_s": round(sum(statuses.values()) / wall, 2) if wall > 0 else 0.0,
        "stopped_by_time_cap": next_i < n_requests,
        "sample_response": sample,
        "server_cpu_s": round(cpu_srv1 - cpu_srv0, 2) if cpu_srv0 is not None and cpu_srv1 is not None else None,
        "client_cpu_s": round(cpu_cli1 - cpu_cli0, 2),
    }
    out["server_cpu_cores"] = round(out["server_cpu_s"] / wall, 2) if out["server_cpu_s"] is not None else None
    out["client_cpu_cores"] = round(out["client_cpu_s"] / wall, 2)
    # Per answered request: CPU ms of each kind of service thread, and of this client.
    answered = max(sum(statuses.values()), 1)
    out["cpu_ms_per_request"] = {
        **{k: round((threads1[k] - threads0[k]) * 1000 / answered, 2) for k in threads0},
        "client": round(out["client_cpu_s"] * 1000 / answered, 2),
    }
    # Model calls during the measured part of the level, from the service's own counters.
    if m0 and m1:
        calls = m1["imgsim_batch_size_count"] - m0["imgsim_batch_size_count"]
        images = m1["imgsim_batch_size_sum"] - m0["imgsim_batch_size_sum"]
        busy = m1["imgsim_batch_seconds_sum"] - m0["imgsim_batch_seconds_sum"]
        out["server"] = {
            "model_calls": int(calls),
            "images": int(images),
            "mean_batch": round(images / calls, 2) if calls else None,
            "model_busy_s": round(busy, 3),
            "model_busy_fraction": round(busy / wall, 3) if wall > 0 else None,
            "model_ms_per_image": round(1000 * busy / images, 3) if images else None,
            "rejected": int(m1["imgsim_rejected_total"] - m0["imgsim_rejected_total"]),
            "batch_sizes": batch_histogram(m0, m1),
            "longest_call_ms_at_most": longest_call_ms(m0, m1),
        }
        n_req = m1["imgsim_request_seconds_count"] - m0["imgsim_request_seconds_count"]
        if n_req > 0:
            # Middleware-measured (whole ASGI app) mean; includes the /metrics request itself once.
            out["server"]["app_mean_ms"] = round(
                1000 * (m1["imgsim_request_seconds_sum"] - m0["imgsim_request_seconds_sum"]) / n_req, 2
            )
    return out


def level_line(r: dict[str, Any]) -> str:
    lat = r["latency_ok"]
    srv = r.get("server", {})
    p = (
        f"p50 {lat['p50_ms']:8.1f}  p95 {lat['p95_ms']:8.1f}  p99 {lat['p99_ms']:8.1f} ms"
        if lat.get("n")
        else "no successful answers"
    )
    return (
        f"c={r['concurrency']:3d}: {r['ok']:5d} ok, {r['rejected_503']:4d} x 503, {r['other_errors']} errors; {p}; "
        f"{r['ok_per_s']:8.1f} req/s; mean batch {srv.get('mean_batch')}; "
        f"service-side mean {srv.get('app_mean_ms')} ms, took_ms p50 {r['service_took_ms'].get('p50_ms')}; "
        f"CPU cores used: service {r['server_cpu_cores']}, client {r['client_cpu_cores']}"
    ) + _timing_line(r)


def _timing_line(r: dict[str, Any]) -> str:
    """The medians of the service's Server-Timing parts, and what the client saw beyond them."""
    stages = r.get("server_timing_p50_ms") or {}
    if not stages:
        return ""
    parts = " ".join(f"{k} {v:.2f}" for k, v in stages.items())
    beyond = ""
    if "total" in stages and r["latency_ok"].get("n"):
        beyond = f"; client p50 - server total p50 = {r['latency_ok']['p50_ms'] - stages['total']:.2f} ms"
    return f"\n        server timing, p50 of each part (ms): {parts}{beyond}"


def effective_settings(env: dict[str, str]) -> dict[str, Any]:
    """The micro-batching settings the service will use (same env -> same pydantic settings)."""
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        from app.config import ServiceSettings

        s = ServiceSettings()
        return {
            "max_batch_size": s.max_batch_size,
            "max_queue": s.max_queue,
            "max_queue_ms": s.max_queue_ms,
            "model_streams": s.model_streams,
            "faiss_threads": s.faiss_threads,
        }
    finally:
        os.environ.clear()
        os.environ.update(saved)


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


class BareModel:
    """The bare model in this (client) process, for references measured between service runs.

    This VM's speed drifts by up to 16 % within minutes, so a reference measured minutes
    before or after the service compares two moments as much as two programs. ``--paired``
    alternates short service runs with these measurements while the service sits idle, and
    compares each service run with the reference taken just before it.
    """

    def __init__(self, model_dir: Path, images: list[tuple[str, bytes]]) -> None:
        import numpy as np

        from models.data import decode_image
        from models.inference import Embedder, load_trained

        quiet_tensorflow()
        self.embedder = Embedder(load_trained(model_dir))
        self.size = self.embedder.input_size
        self.jpeg = images[0][1]
        self._decode = decode_image
        decoded = [decode_image(data, self.size) for _, data in images]
        self.batches = {b: np.stack([decoded[i % len(decoded)] for i in range(b)]) for b in (16, 32)}
        self.embedder(self.batches[16][:1])

    def c1_reference_ms(self, seconds: float) -> float:
        """decode + preprocess + batch-1 forward, back to back (as benchmarks.model defines it)."""

        def call() -> None:
            self.embedder(self._decode(self.jpeg, self.size)[None])

        return summarise(time_calls(call, min_reps=10, max_reps=1000, budget_s=seconds))["median_ms"]

    def best_batched_img_s(self, seconds: float) -> tuple[int, float]:
        """The best of batch 16 and 32, one call at a time (as benchmarks.model defines it)."""
        rates = {}
        for b, batch in self.batches.items():
            ms = summarise(
                time_calls(lambda batch=batch: self.embedder(batch), min_reps=3, max_reps=100, budget_s=seconds)
            )
            rates[b] = b / (ms["median_ms"] / 1000.0)
        best = max(rates, key=lambda b: rates[b])
        return best, rates[best]


def run_service_bench(args: argparse.Namespace) -> dict[str, Any]:
    env = dict(kv.split("=", 1) for kv in args.env)
    manifest = read_manifest(args.model)
    images = load_jpegs(args.images, args.n_images, args.data)
    if args.upload == "raw":  # the image as the body, k in the query
        payloads = [(data, "image/jpeg") for _, data in images]
        target = f"{args.endpoint}?k={args.k}"
    else:
        payloads = [multipart(data, Path(name).name, {"k": str(args.k)}) for name, data in images]
        target = args.endpoint
    levels = parse_int_list(args.concurrency)
    port = args.port or free_port()
    loop = new_loop()
    http = (
        "httpx.AsyncClient per worker (HTTP/1.1 keep-alive, one connection each)"
        if args.client == "httpx"
        else "raw asyncio-streams HTTP/1.1 client, one keep-alive connection per worker"
    )
    result: dict[str, Any] = {
        "kind": "service",
        "model_dir": str(args.model),
        "index_dir": str(args.index),
        "backbone": manifest["backbone"],
        "input_size": manifest["input_size"],
        "endpoint": args.endpoint,
        "k": args.k,
        "images": {"source": args.images, **describe_images(images)},
        "client": {
            "process": "separate (this one), sharing the machine's CPUs with the service",
            "event_loop": type(loop).__module__.split(".")[0],
            "http": f"{http}; {UPLOADS[args.upload]}",
            "upload": args.upload,
            "kind": args.client,
            "requests_per_level": args.requests,
            "max_seconds_per_level": args.max_seconds,
            "retry_sleep_after_503_s": args.retry_sleep,
        },
        "env": env,
        "settings": effective_settings(env),
        "levels": [],
    }

    def level(svc: Service, c: int, client: str = args.client, requests: int | None = None) -> dict[str, Any]:
        if svc.proc is not None and svc.proc.poll() is not None:
            raise RuntimeError(f"the service exited (code {svc.proc.returncode}):\n{svc.log_tail()}")
        r = loop.run_until_complete(
            run_level(
                svc.url,
                target,
                payloads,
                c,
                max(requests or args.requests, 2 * c),
                args.max_seconds,
                args.timeout,
                args.retry_sleep,
                svc.pid,
                client,
            )
        )
        r["client_kind"] = client
        r["rss_kb_after"] = proc_status(svc.pid)
        if svc.proc is not None and svc.proc.poll() is not None:
            raise RuntimeError(f"the service exited during c={c} (code {svc.proc.returncode}):\n{svc.log_tail()}")
        return r

    try:
        with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="imgsim-bench-") as tmp:
            log(f"starting the service on {HOST}:{port} ({args.model}, {args.index})")
            with Service(args.model, args.index, port, env, Path(tmp) / "service.log", args.startup_timeout) as svc:
                result["startup_seconds"] = round(svc.ready_seconds or 0, 2)
                result["ready"] = svc.ready_body
                result["rss_kb_idle"] = proc_status(svc.pid)
                log(f"ready after {svc.ready_seconds:.1f} s; RSS {result['rss_kb_idle'].get('VmRSS', 0) / 1024:.0f} MB")
                for c in levels:
                    r = level(svc, c)
                    result["levels"].append(r)
                    log(level_line(r))
                if args.paired:
                    result["paired"] = paired_runs(args, images, lambda c, n: level(svc, c, requests=n))
                if args.cross_client != "none" and args.cross_client != args.client:
                    r = level(svc, 1, args.cross_client)
                    result["cross_check"] = r
                    log(f"cross-check with the {args.cross_client} client: " + level_line(r))
                result["rss_kb_final"] = proc_status(svc.pid)
                result["server_exit_code"] = svc.stop()
                result["server_log_tail"] = svc.log_tail(10)
            if args.overload_queue:
                c = max(levels)
                env2 = {**env, "IMGSIM_MAX_QUEUE": str(args.overload_queue)}
                if args.overload_queue_ms:
                    env2["IMGSIM_MAX_QUEUE_MS"] = str(args.overload_queue_ms)
                limits = ", ".join(f"{k}={v}" for k, v in env2.items() if k.startswith("IMGSIM_MAX_QUEUE"))
                log(f"overload: restarting with {limits}, concurrency {c}")
                log_path = Path(tmp) / "service-overload.log"
                with Service(args.model, args.index, port, env2, log_path, args.startup_timeout) as svc:
                    r = level(svc, c)
                    r["settings"] = effective_settings(env2)
                    result["overload"] = r
                    log("overload " + level_line(r))
    finally:
        loop.close()
    return result


def paired_runs(args: argparse.Namespace, images: list[tuple[str, bytes]], level: Any) -> dict[str, Any]:
    """``--paired`` rounds: the bare reference, then a short service run, alternately.

    c=1: median latency against decode + batch-1 forward; c=16: answers/s against the best
    batched forward. The ratio reported is the median of the rounds' ratios.
    """
    import statistics

    bare = BareModel(args.model, images)
    out: dict[str, Any] = {"rounds": args.paired, "c1": [], "c16": []}
    for r in range(args.paired):
        ref = bare.c1_reference_ms(2.0)
        lv = level(1, args.paired_requests)
        p50 = lv["latency_ok"]["p50_ms"]
        out["c1"].append({"reference_ms": round(ref, 3), "p50_ms": p50, "ratio": round(p50 / ref, 4)})
        log(f"paired round {r + 1}: c=1 p50 {p50:.1f} ms vs reference {ref:.2f} ms -> {p50 / ref:.3f}")
    for r in range(args.paired):
        b, rate = bare.best_batched_img_s(2.0)
        lv = level(16, args.paired_requests * 2)
        ok = lv["ok_per_s"]
        out["c16"].append(
            {"reference_img_s": round(rate, 2), "reference_batch": b, "ok_per_s": ok, "ratio": round(ok / rate, 4)}
        )
        log(f"paired round {r + 1}: c=16 {ok:.1f} req/s vs batch-{b} forward {rate:.1f} img/s -> {ok / rate:.3f}")
    for key in ("c1", "c16"):
        out[f"{key}_ratio"] = round(statistics.median(x["ratio"] for x in out[key]), 4)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.service",
        description="End-to-end HTTP benchmark of `imgsim serve` (started here as a subprocess on "
        "127.0.0.1): latency percentiles and throughput per concurrency level, status codes, memory.",
    )
    p.add_argument("--model", type=Path, required=True, help="MODEL_DIR")
    p.add_argument("--index", type=Path, required=True, help="INDEX_DIR built from that model")
    p.add_argument("--port", type=int, default=None, help=f"port on {HOST} (default: first free from {FIRST_PORT})")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels (default %(default)s)")
    p.add_argument(
        "--requests",
        type=int,
        default=400,
        help="measured requests per level, at least 2x the level (default %(default)s)",
    )
    p.add_argument("--max-seconds", type=float, default=60.0, help="time cap per level (default %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s (default %(default)s)")
    p.add_argument("--endpoint", default="/v1/search", help="default %(default)s")
    p.add_argument(
        "--upload",
        choices=tuple(UPLOADS),
        default="multipart",
        help="how the JPEG is sent: multipart field 'file' (as the web page and curl -F do), or as the raw "
        "body with k in the query (default %(default)s)",
    )
    p.add_argument(
        "--client",
        choices=("httpx", "raw"),
        default="raw",
        help="raw: minimal asyncio HTTP/1.1 client, ~0.2 ms CPU per request (default); httpx: "
        "httpx.AsyncClient per worker, ~1.6 ms CPU per request, which on a 2-core machine is taken from the service",
    )
    p.add_argument(
        "--cross-client",
        choices=("httpx", "raw", "none"),
        default="httpx",
        help="after the levels, run concurrency 1 again with this client, as a cross-check (default %(default)s)",
    )
    p.add_argument("--k", type=int, default=5, help="neighbours asked for (default %(default)s)")
    p.add_argument("--images", choices=IMAGE_SOURCES, default="cifar", help="JPEG source (default %(default)s)")
    p.add_argument("--n-images", type=int, default=64, help="distinct JPEGs (default %(default)s)")
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 JPEG archive (default %(default)s)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the service, e.g. IMGSIM_MAX_WAIT_MS=2 (repeatable)",
    )
    p.add_argument(
        "--overload-queue",
        type=int,
        default=0,
        help="then rerun the highest level with IMGSIM_MAX_QUEUE=N to provoke 503s (0: off, default)",
    )
    p.add_argument(
        "--overload-queue-ms",
        type=float,
        default=0.0,
        help="and with IMGSIM_MAX_QUEUE_MS=MS, the queue's time limit (0: none, default)",
    )
    p.add_argument(
        "--retry-sleep", type=float, default=0.1, help="a worker's pause after a 503, s (default %(default)s)"
    )
    p.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="then alternate ROUNDS times: the bare model in this process (service idle), then a short "
        "service run, at c=1 and at c=16; ratios free of the machine's drift (0: off, default)",
    )
    p.add_argument(
        "--paired-requests", type=int, default=200, help="requests per paired c=1 run; c=16 runs twice as many"
    )
    p.add_argument("--startup-timeout", type=float, default=300.0, help="s to wait for /readyz (default %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="few requests per level (smoke run)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for kv in args.env:
        if "=" not in kv:
            print(f"--env wants KEY=VALUE, got {kv!r}", file=sys.stderr)
            return 2
    if args.quick:
        args.requests = min(args.requests, 40)
        args.max_seconds = min(args.max_seconds, 15.0)
        args.n_images = min(args.n_images, 16)
    result = run_service_bench(args)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
