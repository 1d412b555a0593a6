"""(1) The bare model: forward-pass speed in-process, the reference for everything else.

For each MODEL_DIR, loaded exactly as the service loads it (``load_trained`` + ``Embedder``):
ms per call and images/s at batch 1, 8, 16, 32; on real JPEG bytes at the model's input size,
``decode_image`` (the indexer's decode) and ``decode_upload`` (the service's); batch 1 after
10 ms of idleness (how a lone request meets the model); two calls at once at batch 8 and 16
(the service's two model streams); with ``--index``, one FAISS search as the service runs it.

The c=1 reference is decode + one batch-1 call (which includes preprocessing).

    python -m benchmarks.model --model runs/resnet50-cifar10 --json /tmp/model.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DEFAULT_DATA,
    IMAGE_SOURCES,
    describe_images,
    load_jpegs,
    log,
    parse_int_list,
    quiet_tensorflow,
    summarise,
    threaded_rate,
    time_calls,
    write_json,
)


def _decode_times(images: list[tuple[str, bytes]], size: int, budget_s: float) -> dict[str, Any]:
    from app.imaging import decode_upload
    from models.data import decode_image
    from models.settings import get_settings

    limit = get_settings().max_image_pixels
    fns = {"decode_image": lambda d: decode_image(d, size), "decode_upload": lambda d: decode_upload(d, size, limit)}
    out = {}
    for name, fn in fns.items():
        times, start = [], time.perf_counter()
        while not times or time.perf_counter() - start < budget_s / 4:
            for _, data in images:
                t = time.perf_counter()
                fn(data)
                times.append(time.perf_counter() - t)
        out[name] = summarise(times)
    return out


def bench_model(model_dir: Path, images: list[tuple[str, bytes]], batch_sizes: list[int], **reps: Any) -> dict:
    """``reps``: min_reps, max_reps, budget_s of :func:`time_calls`."""
    import numpy as np

    from models.data import decode_image
    from models.embedder import Embedder
    from models.inference import load_trained

    trained = load_trained(model_dir)
    embedder = Embedder(trained)
    size = embedder.input_size
    decoded = [decode_image(data, size) for _, data in images]
    one = np.stack(decoded[:1])
    embedder(one)  # traces the graph once (its input signature takes every batch size)
    log(f"{model_dir}: {trained.manifest.backbone} at {size} px")

    def batch_of(b: int) -> Any:
        return np.stack([decoded[i % len(decoded)] for i in range(b)])

    forward = {}
    for b in batch_sizes:
        x = batch_of(b)
        s = summarise(time_calls(lambda x=x: embedder(x), **reps))
        forward[str(b)] = {**s, "batch": b, "images_per_s": round(b / (s["median_ms"] / 1000.0), 2)}
        log(f"  batch {b:3d}: {s['median_ms']:9.2f} ms/batch  {forward[str(b)]['images_per_s']:8.1f} img/s")
    best = max(forward.values(), key=lambda s: s["images_per_s"])
    two_calls = {}
    for b in (b for b in batch_sizes if 1 < b <= 16):
        rate = threaded_rate([embedder, embedder], batch_of(b), seconds=min(reps["budget_s"], 6.0))
        two_calls[str(b)] = {"batch": b, "images_per_s": round(rate, 2)}

    idle: list[float] = []

    def after_idle() -> None:
        time.sleep(0.01)
        t = time.perf_counter()
        embedder(one)
        idle.append(time.perf_counter() - t)

    time_calls(after_idle, **{**reps, "budget_s": min(reps["budget_s"], 5.0)})
    out: dict[str, Any] = {
        "model_dir": str(model_dir),
        "name": trained.name,
        "backbone": trained.manifest.backbone,
        "input_size": size,
        **_decode_times(images, size, reps["budget_s"]),
        "forward": forward,
        "forward_batch1_after_10ms_idle": summarise(idle[1:]),
        "best_batched": {"batch": best["batch"], "images_per_s": best["images_per_s"]},
        "two_calls": two_calls,
    }
    if "1" in forward:
        out["c1_reference_ms"] = round(out["decode_image"]["median_ms"] + forward["1"]["median_ms"], 3)
    return out


def bench_search(index_dir: Path, model_dir: Path, k: int = 5) -> dict[str, Any]:
    """FAISS search as the service runs it (1 OpenMP thread), for 1 and 32 queries."""
    import faiss
    import numpy as np

    from indexer.store import IndexStore

    faiss.omp_set_num_threads(1)
    store = IndexStore.open(index_dir)
    try:
        one = np.random.default_rng(0).standard_normal((1, store.index.d)).astype(np.float32)
        many = np.repeat(one, 32, axis=0)
        return {
            "model_dir": str(model_dir),
            "count": int(store.index.ntotal),
            "index_type": store.manifest.index_type,
            "batch1_1thread": summarise(
                time_calls(lambda: store.search(one, k), min_reps=20, max_reps=500, budget_s=3)
            ),
            "batch32_1thread": summarise(
                time_calls(lambda: store.search(many, k), min_reps=5, max_reps=100, budget_s=3)
            ),
        }
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, action="append", required=True, help="MODEL_DIR (repeatable)")
    p.add_argument("--index", type=Path, action="append", default=[], help="INDEX_DIR of each --model (optional)")
    p.add_argument("--batch-sizes", default="1,8,16,32", help="comma-separated (default %(default)s)")
    p.add_argument("--min-reps", type=int, default=5, help="timed calls at least (default %(default)s)")
    p.add_argument("--max-reps", type=int, default=50, help="timed calls at most (default %(default)s)")
    p.add_argument("--budget", type=float, default=15.0, help="seconds per batch size (default %(default)s)")
    p.add_argument("--images", choices=IMAGE_SOURCES, default="cifar", help="JPEG source (default %(default)s)")
    p.add_argument("--n-images", type=int, default=64, help="distinct JPEGs (default %(default)s)")
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 JPEG archive (default %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
    args = p.parse_args(argv)
    if args.index and len(args.index) != len(args.model):
        p.error("give one --index per --model (or none)")
    quiet_tensorflow()
    reps = {"min_reps": args.min_reps, "max_reps": args.max_reps, "budget_s": args.budget}
    if args.quick:
        reps, args.n_images = {"min_reps": 3, "max_reps": 10, "budget_s": 3.0}, min(args.n_images, 16)
    images = load_jpegs(args.images, args.n_images, args.data)
    models = [bench_model(m, images, parse_int_list(args.batch_sizes), **reps) for m in args.model]
    for m, i in zip(models, args.index, strict=False):
        m["faiss_search"] = bench_search(i, Path(m["model_dir"]))
    write_json(
        args.json, {"kind": "model", "images": {"source": args.images, **describe_images(images)}, "models": models}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
