"""Worst-case uploads within the limits: does the service stay responsive and inside its memory ceiling?

Small files that decode to the most memory the pixel limit allows (16-bit RGBA and grey PNGs,
palette and bilevel PNGs, a progressive JPEG, a lossless RGBA WebP, a GIF), sent
``--concurrency`` at a time in ``--bursts`` bursts to a real ``imgsim serve``. Meanwhile
``/healthz`` is timed every 50 ms and the process's RSS sampled every 20 ms. Reports the idle,
peak and after-burst RSS against the ceiling docs/operations.md documents, and /healthz's latency.

    .venv/bin/python -m benchmarks.worst_uploads --model runs/resnet50-cifar10 --index indexes/resnet50-cifar10-hnsw16
"""

from __future__ import annotations

import argparse
import asyncio
import io
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks.common import latency_percentiles, log, write_json
from benchmarks.service import Service

# The costliest decodes measured, in bytes per pixel: a 16-bit RGBA PNG (8.1, under the pixel
# limit) and a lossless RGBA WebP (16.1, under the WebP limit); docs/operations.md, "Limits and guarantees".
BYTES_PER_PIXEL = 9
WEBP_BYTES_PER_PIXEL = 17


def _png16_rgba(side: int) -> bytes:
    """Pillow cannot write 16-bit RGBA: a constant-colour one by hand (it compresses to ~0.5 MB)."""
    row = b"\x00" + struct.pack(">4H", 12345, 54321, 30000, 40000) * side

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * side, 9)) + chunk(b"IEND", b"")
    )


def _save(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def worst_images(max_pixels: int, max_webp_pixels: int) -> dict[str, bytes]:
    """One file per expensive kind, each just under its pixel limit."""
    side, webp_side = int(max_pixels**0.5) - 1, int(min(max_pixels, max_webp_pixels) ** 0.5) - 1
    ramp = np.tile(np.linspace(0, 255, side).astype(np.uint8), (side, 1))
    return {
        "rgba16.png": _png16_rgba(side),
        "grey16.png": _save(Image.fromarray(np.full((side, side), 40000, np.uint16)), "PNG"),
        "palette.png": _save(Image.new("P", (side, side), 3), "PNG"),
        "bilevel.png": _save(Image.new("1", (side, side), 1), "PNG"),
        "progressive.jpg": _save(Image.fromarray(ramp).convert("RGB"), "JPEG", quality=60, progressive=True),
        "rgba.webp": _save(Image.new("RGBA", (webp_side, webp_side), (10, 200, 30, 128)), "WEBP", lossless=True),
        "palette.gif": _save(Image.new("P", (side, side), 1), "GIF"),
    }


def _decode_peak(data: bytes, size: int, max_pixels: int, max_webp_pixels: int) -> tuple[float, float]:
    """In a fresh process: (RSS growth in MB while one decode runs, its seconds)."""
    import psutil

    from app.imaging import decode_upload
    from app.memory import use_large_image_blocks

    use_large_image_blocks()  # as the service does
    proc, stop = psutil.Process(), threading.Event()
    base = peak = proc.memory_info().rss

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    decode_upload(data, size, max_pixels, max_webp_pixels)
    seconds = time.perf_counter() - start
    stop.set()
    watcher.join()
    return (peak - base) / 2**20, seconds


def decode_peaks(images: dict[str, bytes], size: int, max_pixels: int, webp: int) -> dict[str, dict[str, float]]:
    """What one decode of each kind costs, each in its own process (a clean heap)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    out = {}
    for name, data in images.items():
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            mb, seconds = pool.submit(_decode_peak, data, size, max_pixels, webp).result()
        limit = webp if name.endswith(".webp") else max_pixels
        out[name] = {"peak_mb": round(mb, 1), "bytes_per_pixel": round(mb * 2**20 / limit, 1),
                     "seconds": round(seconds, 3)}  # fmt: skip
        log(f"one decode of {name}: +{mb:.0f} MB, {seconds * 1000:.0f} ms")
    return out


class Sampler(threading.Thread):
    """RSS every 20 ms and /healthz latency every 50 ms, until stopped."""

    def __init__(self, svc: Service) -> None:
        super().__init__(daemon=True)
        self.svc, self.stop_flag = svc, threading.Event()
        self.rss: list[float] = []
        self.health: list[float] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.svc.url, timeout=30) as client:
            next_health = 0.0
            while not self.stop_flag.is_set():
                self.rss.append(self.svc.rss_mb())
                if time.monotonic() >= next_health:
                    start = time.perf_counter()
                    client.get("/healthz").raise_for_status()
                    self.health.append(time.perf_counter() - start)
                    next_health = time.monotonic() + 0.05
                time.sleep(0.02)


async def burst(url: str, files: list[tuple[str, bytes]]) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        answers = await asyncio.gather(*(client.post("/v1/search", files={"file": f}) for f in files))
    return [r.status_code for r in answers]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from app.config import ServiceSettings

    settings = ServiceSettings()
    images = worst_images(settings.max_image_pixels, settings.max_webp_pixels)
    log("worst-case files: " + ", ".join(f"{k} {len(v) / 1e3:.0f} kB" for k, v in images.items()))
    peaks = decode_peaks(images, 224, settings.max_image_pixels, settings.max_webp_pixels)
    env = {"IMGSIM_MAX_DECODES": str(args.max_decodes)}
    with Service(args.model, args.index, env, args.log, timeout=300) as svc:
        asyncio.run(burst(svc.url, [("warm.png", _save(Image.new("RGB", (64, 64)), "PNG"))]))
        time.sleep(1.0)
        idle = svc.rss_mb()
        sampler = Sampler(svc)
        sampler.start()
        kinds = list(images.items())
        rounds = []
        for b in range(args.bursts):
            files = [kinds[(b + i) % len(kinds)] for i in range(args.concurrency)]
            start = time.perf_counter()
            codes = asyncio.run(burst(svc.url, files))
            seconds = time.perf_counter() - start
            time.sleep(args.settle)
            rounds.append({"seconds": round(seconds, 2), "statuses": sorted(set(codes)), "rss_after_mb": svc.rss_mb()})
            log(
                f"burst {b + 1}: {seconds:.1f} s, statuses {sorted(set(codes))}, RSS after {rounds[-1]['rss_after_mb']} MB"
            )
        sampler.stop_flag.set()
        sampler.join()
    pixels = max(BYTES_PER_PIXEL * settings.max_image_pixels, WEBP_BYTES_PER_PIXEL * settings.max_webp_pixels)
    per_decode = pixels + settings.max_upload_bytes
    ceiling = idle + args.max_decodes * per_decode / 2**20
    health = latency_percentiles(sampler.health)
    return {
        "files": {k: len(v) for k, v in images.items()},
        "one_decode": peaks,
        "concurrency": args.concurrency,
        "max_decodes": args.max_decodes,
        "idle_rss_mb": idle,
        "peak_rss_mb": max(sampler.rss),
        "ceiling_mb": round(ceiling, 1),
        "bursts": rounds,
        "healthz_ms": health,
        "healthz_max_ms": round(max(sampler.health) * 1000, 1),
        "pass": max(sampler.rss) <= ceiling and max(sampler.health) < 0.1,
    }


def add_service_options(p: argparse.ArgumentParser, name: str, what: str) -> None:
    """The options of a worst-case run against a service (also benchmarks/worst_routes.py)."""
    p.add_argument("--model", type=Path, required=True, help="model directory or backbone name (e.g. resnet50:128)")
    p.add_argument("--index", type=Path, required=True, help="index directory built from --model")
    p.add_argument("--concurrency", type=int, default=16, help=f"{what} in flight at once (default 16)")
    p.add_argument("--bursts", type=int, default=3, help="bursts (default 3)")
    p.add_argument("--max-decodes", type=int, default=2, help="IMGSIM_MAX_DECODES of the service (default 2)")
    p.add_argument("--log", type=Path, default=Path(f"out/{name}.log"), help="the service's log")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here too")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_service_options(p, "worst_uploads", "uploads")
    p.add_argument("--settle", type=float, default=3.0, help="seconds after a burst before its RSS is read")
    args = p.parse_args(argv)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    result = run(args)
    write_json(args.out, result)
    h = result["healthz_ms"]
    print(f"RSS idle {result['idle_rss_mb']} MB, peak {result['peak_rss_mb']} MB (ceiling {result['ceiling_mb']} MB), "
          f"after bursts {[r['rss_after_mb'] for r in result['bursts']]} MB")  # fmt: skip
    print(
        f"/healthz during bursts: p50 {h.get('p50_ms')} ms, p99 {h.get('p99_ms')} ms, max {result['healthz_max_ms']} ms"
    )
    print("PASS" if result["pass"] else "FAIL")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
