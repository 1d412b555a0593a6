"""Shared helpers of the benchmark scripts: machine details, test images, timing, JSON.

Nothing here imports TensorFlow, so the HTTP client (benchmarks.service) stays lean.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = "../shared/data/cifar10-jpg.tar.gz"
IMAGE_SOURCES = ("cifar", "photos")
# Single natural photos shipped inside the scikit-image wheel (no download).
PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel")
PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "faiss-cpu", "numpy", "pillow", "fastapi", "uvicorn", "httpx")
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def die_with_parent() -> None:  # pragma: no cover - runs in a child between fork and exec
    """Linux: this child gets SIGTERM when its parent dies without cleaning up (e.g. SIGKILL)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (e.g. a step timeout) unwinds like an exception, so ``finally`` blocks stop children."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays the result."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine


def _cpuinfo(field: str) -> str:
    """A field of /proc/cpuinfo (psutil does not report the CPU's model name or flags)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    return ""


def _git(*args: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return ""


def _busy_processes(limit: int = 3, min_percent: float = 20.0) -> list[str]:
    """Other processes using a lot of CPU right now, to name them in a warning."""
    procs = list(psutil.process_iter(["pid", "cmdline"]))
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(0.5)
    found = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and (cpu := p.cpu_percent(None)) >= min_percent:
                found.append((cpu, f"pid {p.pid} {cpu:.0f}% CPU: {' '.join(p.info['cmdline'] or [])[:100]}"))
    return [text for _, text in sorted(found, reverse=True)[:limit]]


def machine_info(busy_sample_seconds: float = 1.0) -> dict[str, Any]:
    """CPU model, cores, RAM, OS, versions, git commit, and how busy the CPU is right now."""
    flags = set(_cpuinfo("flags").split())
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": _cpuinfo("model name") or platform.processor() or "unknown",
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "logical_cpus": psutil.cpu_count(),
        "usable_cpus": len(psutil.Process().cpu_affinity() or []) or psutil.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": versions,
        "git": {"commit": _git("rev-parse", "HEAD") or None, "dirty": bool(_git("status", "--porcelain", "-uno"))},
        "load_average": [round(x, 2) for x in psutil.getloadavg()],
        "cpu_busy_before_start": round(psutil.cpu_percent(busy_sample_seconds) / 100, 3),
        "busy_processes": _busy_processes(),
    }


def busy_warning(info: dict[str, Any], threshold: float = 0.15) -> str | None:
    """A warning when something else was using the CPU as the run started."""
    busy = info.get("cpu_busy_before_start")
    if busy is None or busy < threshold:
        return None
    procs = "; ".join(info.get("busy_processes") or [])
    return (
        f"the CPU was {busy:.0%} busy before the benchmark started (load average {info['load_average'][0]}): "
        f"absolute numbers are not representative{' -- ' + procs if procs else ''}"
    )


# --------------------------------------------------------------------------- test images


def load_jpegs(source: str, n: int, data: str = DEFAULT_DATA, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` real JPEG files as (name, bytes).

    * ``cifar``: CIFAR-10 test images, read unchanged from the archive (32x32 JPEG, ~1 KB),
      round-robin over the classes -- the domain the models were trained and indexed on.
    * ``photos``: scikit-image's sample photos (300x451 .. 872x1000) saved as JPEG quality 90,
      each also mirrored -- closer to a typical upload (decode + downscale cost).
    """
    if source == "cifar":
        from models.data import open_dataset

        per_class = max(1, -(-n // 10))
        dataset = open_dataset(data, max_per_class=per_class, seed=seed)
        by_class: dict[int, list] = {}
        for item in dataset.select("test"):
            by_class.setdefault(item.label, []).append(item)
        ordered = [c[i] for i in range(per_class) for c in by_class.values() if i < len(c)][:n]
        out = [(item.key, bytes(raw)) for item, raw in dataset.iter_raw(ordered) if isinstance(raw, bytes)]
        if not out:
            raise RuntimeError(f"no JPEG bytes read from {data}")
        return out
    if source == "photos":
        from PIL import Image
        from skimage import data as skdata

        photos = []
        for name in PHOTO_NAMES:
            img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
            for variant, im in (("", img), ("-mirror", img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                photos.append((f"{name}{variant}.jpg", buf.getvalue()))
        return [photos[i % len(photos)] for i in range(n)]
    raise ValueError(f"unknown image source {source!r}; choose one of {IMAGE_SOURCES}")


def describe_images(images: Sequence[tuple[str, bytes]]) -> dict[str, Any]:
    from PIL import Image

    sizes = {Image.open(io.BytesIO(data)).size for _, data in images}
    return {
        "count": len(images),
        "bytes_median": int(statistics.median(len(d) for _, d in images)),
        "pixels": sorted(f"{w}x{h}" for w, h in sizes)[:8],
    }


# --------------------------------------------------------------------------- timing


def time_calls(
    fn: Callable[[], object], *, min_reps: int, max_reps: int, budget_s: float, warmup: int = 1
) -> list[float]:
    """Seconds per call: ``warmup`` untimed calls, then at least ``min_reps`` and at most
    ``max_reps`` timed ones, stopping early once ``budget_s`` has been spent."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start <= budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def threaded_rate(calls: Sequence[Callable[[Any], object]], batch: Any, seconds: float) -> float:
    """Images/s when each callable runs ``batch`` back to back in its own thread, all at once
    (one callable: one call at a time; two: the service's two model streams)."""
    calls[0](batch)  # warm-up
    counts = [0] * len(calls)
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        while time.perf_counter() < stop:
            calls[i](batch)
            counts[i] += len(batch)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def summarise(seconds: Sequence[float]) -> dict[str, float]:
    """Median and spread of a list of durations, in milliseconds."""
    a = np.asarray(seconds, dtype=np.float64) * 1000.0
    if a.size == 0:
        return {"n": 0}
    p10, p50, p90 = np.percentile(a, [10, 50, 90])
    return {"n": int(a.size), "median_ms": round(p50, 3), "p10_ms": round(p10, 3), "p90_ms": round(p90, 3)}


def latency_percentiles(seconds: Sequence[float]) -> dict[str, float | int]:
    a = np.asarray(seconds, dtype=np.float64) * 1000.0
    if a.size == 0:
        return {"n": 0}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"n": int(a.size), "p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "p99_ms": round(p99, 2)}


def parse_int_list(text: str) -> list[int]:
    values = [int(x) for x in text.replace(" ", "").split(",") if x]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected comma-separated positive integers, got {text!r}")
    return values


def write_json(path: Path | None, obj: Any) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
