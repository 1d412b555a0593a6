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
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = "../shared/data/cifar10-jpg.tar.gz"
IMAGE_SOURCES = ("cifar", "photos")
# Single natural photos shipped inside the scikit-image wheel (no download).
PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel")
PACKAGES = (
    "tensorflow-cpu",
    "tensorflow",
    "keras",
    "faiss-cpu",
    "numpy",
    "pillow",
    "fastapi",
    "uvicorn",
    "httpx",
    "python-multipart",
)


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


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "amx_tile") if f in have]
    except OSError:
        pass
    return []


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Share of all CPUs busy over ``seconds`` (from /proc/stat), before we start measuring."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except OSError:
        return None
    return round(1.0 - (i1 - i0) / max(1, t1 - t0), 3)


def busy_processes(limit: int = 3, min_cpu: float = 20.0) -> list[str]:
    """Other processes using a lot of CPU right now (``ps``), to name them in a warning."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu", "--no-headers"],
            check=False,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    me = os.getpid()
    found = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) < 4 or int(parts[0]) == me:
            continue
        if float(parts[1]) < min_cpu:
            break
        found.append(f"pid {parts[0]} {parts[1]}% CPU: {parts[3][:100]}")
        if len(found) >= limit:
            break
    return found


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty}


def machine_info(busy_sample_seconds: float = 1.0) -> dict[str, Any]:
    """CPU model, cores, RAM, OS, versions, git commit, and how busy the CPU is right now."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "ram_gb": _mem_total_gb(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": package_versions(),
        "git": git_info(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu_busy_before_start": cpu_busy_fraction(busy_sample_seconds),
        "busy_processes": busy_processes(),
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
        items = dataset.select("test")
        by_class: dict[int, list] = {}
        for item in items:
            by_class.setdefault(item.label, []).append(item)
        ordered = [c[i] for i in range(per_class) for c in by_class.values() if i < len(c)][:n]
        out = []
        for item, raw in dataset.iter_raw(ordered):
            if isinstance(raw, bytes | bytearray):
                out.append((item.key, bytes(raw)))
        if not out:
            raise RuntimeError(f"no JPEG bytes read from {data}")
        return out
    if source == "photos":
        from PIL import Image
        from skimage import data as skdata

        photos = []
        for name in PHOTO_NAMES:
            arr = getattr(skdata, name)()
            img = Image.fromarray(arr).convert("RGB")
            for variant, im in (("", img), ("-mirror", img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                photos.append((f"{name}{variant}.jpg", buf.getvalue()))
        return [photos[i % len(photos)] for i in range(n)]
    raise ValueError(f"unknown image source {source!r}; choose one of {IMAGE_SOURCES}")


def describe_images(images: Sequence[tuple[str, bytes]]) -> dict[str, Any]:
    from PIL import Image

    sizes = []
    for _, data in images:
        with Image.open(io.BytesIO(data)) as im:
            sizes.append(im.size)
    nbytes = [len(d) for _, d in images]
    return {
        "count": len(images),
        "distinct": len({d for _, d in images}),
        "bytes_median": int(statistics.median(nbytes)),
        "pixels": sorted({f"{w}x{h}" for w, h in sizes})[:8],
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
    while len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_reps and time.perf_counter() - start > budget_s:
            break
    return times


def threaded_rate(calls: Sequence[Callable[[Any], object]], batch: Any, seconds: float) -> float:
    """Images/s when each callable runs ``batch`` back to back in its own thread, all at once
    (one callable: one call at a time; two: the service's two model streams)."""
    import threading

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
    return {
        "n": int(a.size),
        "median_ms": round(float(np.median(a)), 3),
        "p10_ms": round(float(np.percentile(a, 10)), 3),
        "p90_ms": round(float(np.percentile(a, 90)), 3),
        "min_ms": round(float(a.min()), 3),
    }


def latency_percentiles(seconds: Sequence[float]) -> dict[str, float | int]:
    a = np.asarray(seconds, dtype=np.float64) * 1000.0
    if a.size == 0:
        return {"n": 0}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {
        "n": int(a.size),
        "p50_ms": round(float(p50), 2),
        "p95_ms": round(float(p95), 2),
        "p99_ms": round(float(p99), 2),
        "mean_ms": round(float(a.mean()), 2),
        "max_ms": round(float(a.max()), 2),
    }


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def parse_size(text: str) -> int:
    """'10k' -> 10000, '1M' -> 1000000, '2500' -> 2500."""
    t = text.strip().lower()
    mult = 1
    if t.endswith("k"):
        mult, t = 1000, t[:-1]
    elif t.endswith("m"):
        mult, t = 1_000_000, t[:-1]
    return int(float(t) * mult)


def write_json(path: Path | None, obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=str)
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tf_threads() -> dict[str, int]:
    import tensorflow as tf

    return {
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def read_manifest(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "manifest.json").read_text())
