"""Worst cases of the collection routes: thumbnails of costly images, near-duplicates beside
searches, and memory after a burst of live adds (issue "Hostile input, round two").

Against a real ``imgsim serve`` (a copy of ``--index``, so the adds do not change it):

1. thumbnails: the worst-case images of ``benchmarks.worst_uploads`` are added, then
   ``--concurrency`` requests for their 64 px thumbnails at a time, in ``--bursts`` bursts.
   RSS against the same ceiling as uploads; /healthz every 50 ms.
2. near-duplicates: 8 search clients for ``--seconds``, first alone, then while the service
   computes near-duplicates (the costliest parameters it accepts, new ones whenever one
   finishes): search p50/p99 side by side, and their ratio.
3. adds: 200 live adds, 16 at a time; RSS before (after a warm-up of 16 concurrent searches,
   so that the model's batch buffers count as idle), and ``--settle`` seconds after, against
   idle + the new items' size (their stored bytes and vectors).

    .venv/bin/python -m benchmarks.worst_routes --model resnet50 --index indexes/clothing-resnet50 \\
        --out docs/worst_routes.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks.common import latency_percentiles, log, write_json
from benchmarks.service import Service
from benchmarks.worst_uploads import (
    BYTES_PER_PIXEL,
    WEBP_BYTES_PER_PIXEL,
    Sampler,
    add_service_options,
    worst_images,
)

KEY = "bench-key"
HEADERS = {"X-API-Key": KEY}


def _png(seed: int, side: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


async def _add(client: httpx.AsyncClient, name: str, data: bytes) -> int:
    r = await client.post("/v1/images", files={"file": (name, data)}, headers=HEADERS)
    r.raise_for_status()
    return int(r.json()["ids"][0])


def thumbnails(svc: Service, args: argparse.Namespace, ceiling_per_decode: float) -> dict[str, Any]:
    from app.config import ServiceSettings

    settings = ServiceSettings()
    images = worst_images(settings.max_image_pixels, settings.max_webp_pixels)

    async def add_all() -> list[int]:
        async with httpx.AsyncClient(base_url=svc.url, timeout=600) as c:
            return [await _add(c, name, data) for name, data in images.items()]

    async def burst(ids: list[int]) -> list[int]:
        async with httpx.AsyncClient(base_url=svc.url, timeout=600) as c:
            rs = await asyncio.gather(*(c.get(f"/v1/images/{i}/file", params={"size": 64}) for i in ids))
        return [r.status_code for r in rs]

    ids = asyncio.run(add_all())
    time.sleep(args.settle)
    idle = svc.rss_mb()
    sampler = Sampler(svc)
    sampler.start()
    rounds = []
    for b in range(args.bursts):
        start = time.perf_counter()
        codes = asyncio.run(burst([ids[(b + i) % len(ids)] for i in range(args.concurrency)]))
        rounds.append({"seconds": round(time.perf_counter() - start, 2), "statuses": sorted(set(codes))})
        log(f"thumbnails burst {b + 1}: {rounds[-1]}")
    sampler.stop_flag.set()
    sampler.join()
    ceiling = idle + args.max_decodes * ceiling_per_decode
    health = latency_percentiles(sampler.health)
    return {"idle_rss_mb": idle, "peak_rss_mb": max(sampler.rss), "ceiling_mb": round(ceiling, 1), "bursts": rounds,
            "healthz_ms": health, "healthz_max_ms": round(max(sampler.health) * 1000, 1),
            "pass": bool(max(sampler.rss) <= ceiling and health["p99_ms"] < 100)}  # fmt: skip


async def _searches(url: str, seconds: float, clients: int, query: bytes) -> list[float]:
    took: list[float] = []
    stop = time.monotonic() + seconds

    async def one(c: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            start = time.perf_counter()
            (await c.post("/v1/search", files={"file": ("q.png", query)})).raise_for_status()
            took.append(time.perf_counter() - start)

    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        await asyncio.gather(*(one(c) for _ in range(clients)))
    return took


async def _keep_duplicates_busy(url: str, stop: asyncio.Event, done: list[float]) -> None:
    """Start a computation, poll it to the end, start another (a new threshold: not cached)."""
    threshold = 0.65
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        while not stop.is_set():
            start = time.perf_counter()
            while not stop.is_set():
                r = await c.get("/v1/duplicates", params={"threshold": threshold, "hash_check": "true"})
                if r.status_code == 200:
                    done.append(time.perf_counter() - start)
                    break
                await asyncio.sleep(0.5)
            threshold = round(threshold + 0.001, 3)


def duplicates(svc: Service, seconds: float) -> dict[str, Any]:
    query = _png(12345, 224)
    alone = latency_percentiles(asyncio.run(_searches(svc.url, seconds, 8, query)))
    log(f"8 search clients alone: {alone}")

    async def beside() -> tuple[list[float], list[float]]:
        stop, done = asyncio.Event(), []
        busy = asyncio.create_task(_keep_duplicates_busy(svc.url, stop, done))
        await asyncio.sleep(0.5)  # the first computation has started
        took = await _searches(svc.url, seconds, 8, query)
        stop.set()
        await busy
        return took, done

    took, done = asyncio.run(beside())
    during = latency_percentiles(took)
    log(f"8 search clients beside near-duplicates ({len(done)} computations finished, {done}): {during}")
    ratio = during["p99_ms"] / alone["p99_ms"]
    return {"alone": alone, "during": during, "computations": [round(s, 2) for s in done],
            "p99_ratio": round(ratio, 3), "pass": bool(ratio <= 1.5)}  # fmt: skip


def adds(svc: Service, n: int, settle: float, dim: int) -> dict[str, Any]:
    images = [_png(1000 + i) for i in range(n)]

    async def add_all() -> None:
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=svc.url, timeout=600) as c:

            async def one(i: int) -> None:
                async with limit:
                    await _add(c, f"add{i}.png", images[i])

            await asyncio.gather(*(one(i) for i in range(n)))

    async def warm_up() -> None:  # the model's buffers for batches of up to 16 belong to idle, not to the adds
        async with httpx.AsyncClient(base_url=svc.url, timeout=600) as c:
            for _ in range(3):
                query = ("q.png", _png(1, 224))
                await asyncio.gather(*(c.post("/v1/search", files={"file": query}) for _ in range(16)))

    asyncio.run(warm_up())
    time.sleep(settle)
    idle = svc.rss_mb()
    start = time.perf_counter()
    asyncio.run(add_all())
    seconds = time.perf_counter() - start
    peak = svc.rss_mb()
    time.sleep(settle)
    after = svc.rss_mb()
    open_versions = len({f.path for f in svc.ps.open_files() if f.path.endswith("items.sqlite")})
    new_mb = (sum(map(len, images)) + n * dim * 4) / 2**20
    target = idle + new_mb
    log(f"{n} adds in {seconds:.1f} s: RSS idle {idle} MB, right after {peak} MB, {settle:.0f} s later {after} MB "
        f"(idle + new items {target:.1f} MB); {open_versions} index version(s) open")  # fmt: skip
    return {"adds": n, "seconds": round(seconds, 1), "idle_rss_mb": idle, "rss_right_after_mb": peak,
            "rss_after_mb": after, "new_items_mb": round(new_mb, 2), "open_versions": open_versions,
            "pass": after <= 1.1 * target}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    from app.config import ServiceSettings

    settings = ServiceSettings()
    pixels = max(BYTES_PER_PIXEL * settings.max_image_pixels, WEBP_BYTES_PER_PIXEL * settings.max_webp_pixels)
    per_decode = (pixels + settings.max_upload_bytes) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index"
        shutil.copytree(args.index, index, symlinks=False)
        env = {"IMGSIM_MAX_DECODES": str(args.max_decodes), "IMGSIM_API_KEY": KEY,
               "IMGSIM_CACHE_DIR": str(Path(tmp) / "cache")}  # fmt: skip
        with Service(args.model, index, env, args.log, timeout=600) as svc:
            dim = httpx.get(f"{svc.url}/v1/models").json()["models"][0]["embedding_dim"]
            parts = {
                "adds": lambda: adds(svc, args.adds, args.settle, dim),
                "duplicates": lambda: duplicates(svc, args.seconds),
                "thumbnails": lambda: thumbnails(svc, args, per_decode),
            }
            result = {name: parts[name]() for name in args.parts.split(",")}
    result["pass"] = all(part["pass"] for part in result.values())
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_service_options(p, "worst_routes", "thumbnail requests")  # --index is copied: the adds leave it as it is
    p.add_argument("--seconds", type=float, default=20.0, help="each search measurement (default 20)")
    p.add_argument("--adds", type=int, default=200, help="live adds (default 200)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds of idle before RSS is read (default 5)")
    p.add_argument("--parts", default="adds,duplicates,thumbnails", help="which cases, in this order (default all)")
    args = p.parse_args(argv)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    result = run(args)
    write_json(args.out, result)
    print("PASS" if result["pass"] else "FAIL")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
