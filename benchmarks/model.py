"""(1) The bare model: forward-pass speed in-process, the reference for everything else.

For each MODEL_DIR: load it exactly as the service does (``load_trained`` + ``Embedder``:
one tf.function, preprocessing included), warm up, then time one call per batch size
(1, 8, 16, 32 by default) several times and report the median ms/batch and images/s.
Also timed, on real JPEG bytes at the model's input size:

* ``decode_image`` (what the indexer runs) and ``app.imaging.decode_upload`` (what the
  service runs: header check + decode_image);
* ``preprocess`` alone (it is also inside every Embedder call);
* batch 1 after 10 ms of idleness (information: at concurrency 1 the service calls the
  model after such gaps, when TensorFlow's threads have gone to sleep);
* with ``--index``: one FAISS search of the service's kind (k=5, 1 OpenMP thread);
* two calls at once (two threads) at batch 8 and 16, as the service's two model streams
  run them: information, and a stricter reference than the issue's single call.

The service target reference at concurrency 1 is decode + Embedder(batch of 1)
(= decode + preprocess + batch-1 forward), both measured here.

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
    tf_threads,
    threaded_rate,
    time_calls,
    write_json,
)


def bench_model(
    model_dir: Path,
    images: list[tuple[str, bytes]],
    batch_sizes: list[int],
    *,
    min_reps: int,
    max_reps: int,
    budget_s: float,
    index_dir: Path | None = None,
    k: int = 5,
) -> dict[str, Any]:
    import numpy as np

    from app.imaging import decode_upload
    from models.backbones import preprocess
    from models.data import decode_image
    from models.inference import Embedder, load_trained
    from models.settings import get_settings

    t0 = time.perf_counter()
    trained = load_trained(model_dir)
    embedder = Embedder(trained)
    load_s = time.perf_counter() - t0
    m = trained.manifest
    size = embedder.input_size
    log(f"{model_dir}: {m['backbone']} at {size} px, loaded in {load_s:.1f} s")

    # Decoding: every image once per round, timed per image.
    max_pixels = get_settings().max_image_pixels
    decoded = [decode_image(data, size) for _, data in images]
    per_image = max(1, min_reps)

    def timed_each(fn: Any) -> list[float]:
        out: list[float] = []
        start = time.perf_counter()
        for _ in range(per_image):
            for _, data in images:
                t = time.perf_counter()
                fn(data)
                out.append(time.perf_counter() - t)
            if time.perf_counter() - start > budget_s:
                break
        return out

    decode = summarise(timed_each(lambda d: decode_image(d, size)))
    decode_upload_s = summarise(timed_each(lambda d: decode_upload(d, size, max_pixels)))

    one = np.stack(decoded[:1])
    preprocess_s = summarise(
        time_calls(lambda: preprocess(one, embedder.preprocessing), min_reps=20, max_reps=2000, budget_s=1.0)
    )

    # The first call traces the graph (one trace for every batch size: input_signature has None).
    t0 = time.perf_counter()
    embedder(one)
    first_call_s = time.perf_counter() - t0

    forward: dict[str, Any] = {}
    for b in batch_sizes:
        batch = np.stack([decoded[i % len(decoded)] for i in range(b)])
        times = time_calls(lambda batch=batch: embedder(batch), min_reps=min_reps, max_reps=max_reps, budget_s=budget_s)
        s = summarise(times)
        s["batch"] = b
        s["images_per_s"] = round(b / (s["median_ms"] / 1000.0), 2)
        forward[str(b)] = s
        log(f"  batch {b:3d}: {s['median_ms']:9.2f} ms/batch  {s['images_per_s']:8.1f} img/s  ({s['n']} reps)")
    best_b = max(forward.values(), key=lambda s: s["images_per_s"])

    # Two calls at once from two threads (the service's two model streams): images/s of both
    # together. Information and a stricter reference: the reference is one call.
    two_calls: dict[str, Any] = {}
    for b in [b for b in batch_sizes if 1 < b <= 16]:
        batch = np.stack([decoded[i % len(decoded)] for i in range(b)])
        rate = threaded_rate([embedder, embedder], batch, seconds=min(budget_s, 6.0))
        two_calls[str(b)] = {"batch": b, "images_per_s": round(rate, 2)}
        log(f"  2 calls of batch {b:2d} at once: {rate:8.1f} img/s")

    # Informational: batch 1 after 10 ms idle, as calls arrive at concurrency 1 in the service
    # (TensorFlow's thread pool has gone to sleep by then; back-to-back calls keep it spinning).
    def after_idle() -> None:
        time.sleep(0.01)
        t = time.perf_counter()
        embedder(one)
        idle_times.append(time.perf_counter() - t)

    idle_times: list[float] = []
    time_calls(after_idle, min_reps=min_reps, max_reps=max_reps, budget_s=min(budget_s, 5.0))
    forward_idle = summarise(idle_times[1:])

    out: dict[str, Any] = {
        "model_dir": str(model_dir),
        "name": trained.name,
        "backbone": m["backbone"],
        "input_size": size,
        "preprocessing": embedder.preprocessing,
        "embedding_dim": m.get("embedding_dim"),
        "load_seconds": round(load_s, 2),
        "first_call_seconds": round(first_call_s, 3),
        "decode_image": decode,
        "decode_upload": decode_upload_s,
        "preprocess_batch1": preprocess_s,
        "forward": forward,
        "forward_batch1_after_10ms_idle": forward_idle,
        "best_batched": {"batch": best_b["batch"], "images_per_s": best_b["images_per_s"]},
        "two_calls": two_calls,
    }
    if "1" in forward:
        ref = decode["median_ms"] + forward["1"]["median_ms"]
        out["c1_reference_ms"] = round(ref, 3)
        log(
            f"  decode {decode['median_ms']:.2f} ms + batch-1 forward {forward['1']['median_ms']:.2f} ms "
            f"= c=1 reference {ref:.2f} ms; best batched {best_b['images_per_s']:.1f} img/s at {best_b['batch']}; "
            f"batch 1 after 10 ms idle {forward_idle.get('median_ms', float('nan')):.2f} ms"
        )
    if index_dir is not None:
        out["faiss_search"] = bench_index_search(index_dir, embedder, one, k, budget_s=min(budget_s, 5.0))
    return out


def bench_index_search(index_dir: Path, embedder: Any, one: Any, k: int, budget_s: float) -> dict[str, Any]:
    """One search the way the service does it (1 OpenMP thread by default), batch 1 and 32."""
    import faiss
    import numpy as np

    from indexer.store import IndexStore

    store = IndexStore.open(index_dir)
    try:
        emb, _ = embedder(one)
        emb32 = np.repeat(emb, 32, axis=0)
        out: dict[str, Any] = {
            "index_dir": str(index_dir),
            "count": int(store.index.ntotal),
            "index_type": store.manifest.get("index_type"),
            "k": k,
        }
        before = faiss.omp_get_max_threads()
        try:
            faiss.omp_set_num_threads(1)
            out["batch1_1thread"] = summarise(
                time_calls(lambda: store.search(emb, k), min_reps=20, max_reps=500, budget_s=budget_s)
            )
            out["batch32_1thread"] = summarise(
                time_calls(lambda: store.search(emb32, k), min_reps=5, max_reps=100, budget_s=budget_s)
            )
        finally:
            faiss.omp_set_num_threads(before)
        log(
            f"  FAISS {out['index_type']} over {out['count']}: 1 query {out['batch1_1thread']['median_ms']:.2f} ms, "
            f"32 queries {out['batch32_1thread']['median_ms']:.2f} ms (1 thread)"
        )
        return out
    finally:
        store.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.model",
        description="Bare-model forward speed (in-process) per batch size, plus decode/preprocess time "
        "of real JPEGs: the reference for the service and indexer benchmarks.",
    )
    p.add_argument("--model", type=Path, action="append", required=True, help="MODEL_DIR (repeatable)")
    p.add_argument(
        "--index",
        type=Path,
        action="append",
        default=None,
        help="INDEX_DIR paired with each --model: also time one FAISS search as the service does",
    )
    p.add_argument(
        "--batch-sizes",
        default="1,8,16,32",
        help="comma-separated (default %(default)s; 16 = the largest batch concurrency 16 can form)",
    )
    p.add_argument("--min-reps", type=int, default=5, help="timed calls at least (default %(default)s)")
    p.add_argument("--max-reps", type=int, default=50, help="timed calls at most (default %(default)s)")
    p.add_argument(
        "--budget", type=float, default=15.0, help="seconds per batch size after min-reps (default %(default)s)"
    )
    p.add_argument("--images", choices=IMAGE_SOURCES, default="cifar", help="JPEG source (default %(default)s)")
    p.add_argument("--n-images", type=int, default=64, help="distinct JPEGs (default %(default)s)")
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 JPEG archive (default %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.index is not None and len(args.index) != len(args.model):
        print("give one --index per --model (or none)", file=sys.stderr)
        return 2
    quiet_tensorflow()
    if args.quick:
        args.min_reps, args.max_reps, args.budget = 3, 10, 3.0
        args.n_images = min(args.n_images, 16)
    batch_sizes = parse_int_list(args.batch_sizes)
    images = load_jpegs(args.images, args.n_images, args.data)
    results = []
    for i, model_dir in enumerate(args.model):
        results.append(
            bench_model(
                model_dir,
                images,
                batch_sizes,
                min_reps=args.min_reps,
                max_reps=args.max_reps,
                budget_s=args.budget,
                index_dir=args.index[i] if args.index else None,
            )
        )
    out = {
        "kind": "model",
        "images": {"source": args.images, **describe_images(images)},
        "tf_threads": tf_threads(),
        "settings": {
            "batch_sizes": batch_sizes,
            "min_reps": args.min_reps,
            "max_reps": args.max_reps,
            "budget_s": args.budget,
        },
        "models": results,
    }
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
