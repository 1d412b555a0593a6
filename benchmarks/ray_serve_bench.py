"""The service through Ray Serve (1 and 2 replicas) against the plain service, same machine.

Starts a local Ray head (`ray start --head`), then, one after the other: `imgsim serve`
(plain, uvicorn), `imgsim serve --engine ray --replicas 1` and `--replicas 2`; each answers
the closed-loop client of :mod:`benchmarks.service` (real JPEGs, multipart POST /v1/search)
at each concurrency level. On a 2-core machine the point is correctness and overhead, not
speed: at concurrency 1 the difference to the plain service is the proxy's cost per request.

    python -m benchmarks.ray_serve_bench --model runs/resnet50-cifar10 --index indexes/resnet50-cifar10-hnsw16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import DEFAULT_DATA, load_jpegs, log, machine_info, parse_int_list, write_json
from benchmarks.service import Service, _closed_loop, free_port, multipart

RAY = str(Path(sys.executable).parent / "ray")


def _replicas(url: str, n: int = 32) -> int:
    seen = set()
    for _ in range(n):
        with contextlib.suppress(httpx.HTTPError):
            seen.add(httpx.get(f"{url}/readyz", timeout=5).headers.get("x-imgsim-process"))
    return len(seen - {None})


def _level(svc: Service, payloads: list, c: int, args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.common import latency_percentiles

    start = time.perf_counter()
    r = asyncio.run(_closed_loop(svc, payloads, c, max(args.requests, 2 * c), args))
    wall = time.perf_counter() - start
    out = {"concurrency": c, "ok": len(r["ok"]), "errors": sum(v for k, v in r["statuses"].items() if k != 200),
           "ok_per_s": round(len(r["ok"]) / wall, 2), "latency_ok": latency_percentiles(r["ok"])}  # fmt: skip
    log(
        f"  c={c}: {out['ok_per_s']} req/s, p50 {out['latency_ok'].get('p50_ms')} p99 {out['latency_ok'].get('p99_ms')} ms"
    )
    return out


def run(args: argparse.Namespace, payloads: list, tmp: Path, address: str) -> dict[str, Any]:
    setups = {"plain": (), **{f"ray_{n}_replicas": ("--engine", "ray", "--ray-address", address, "--replicas", str(n))
                              for n in parse_int_list(args.replicas)}}  # fmt: skip
    results = {}
    for name, extra in setups.items():
        log(f"{name}: starting")
        with Service(args.model, args.index, {}, tmp / f"{name}.log", args.startup_timeout, extra) as svc:
            want = int(extra[-1]) if extra else 1
            deadline = time.monotonic() + args.startup_timeout
            while _replicas(svc.url) < want and time.monotonic() < deadline:
                time.sleep(2)
            results[name] = {"replicas_answering": _replicas(svc.url),
                             "levels": [_level(svc, payloads, c, args) for c in parse_int_list(args.concurrency)]}  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--replicas", default="1,2", help="Ray Serve replica counts (default %(default)s)")
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--endpoint", default="/v1/search")
    p.add_argument("--retry-sleep", type=float, default=0.1)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    info = machine_info()
    images = load_jpegs("cifar", 64, args.data)
    payloads = [multipart(data, Path(name).name, 5) for name, data in images]
    port = free_port(6400)
    address = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="/tmp/rsb") as tmp:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                        f"--temp-dir={tmp}/ray"], check=True, capture_output=True)  # fmt: skip
        try:
            results = run(args, payloads, Path(tmp), address)
        finally:
            subprocess.run([RAY, "stop", "--force"], capture_output=True)
    write_json(args.json, {"model": str(args.model), "index": str(args.index), "results": results, "machine": info})
    return 0


if __name__ == "__main__":
    sys.exit(main())
