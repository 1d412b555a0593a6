"""(5) Inference runtimes side by side: the bare batched forward and batch-1 latency per runtime.

For each MODEL_DIR, one ``Embedder`` per runtime (TensorFlow fp32, OpenVINO bf16, OpenVINO
int8; converted on first use and cached next to the model), all on the same decoded CIFAR-10
images at the model's input size. The runtimes are measured in alternating rounds (tf, bf16,
int8, tf, ...), so the machine's drift hits each one alike; each figure is the median over
rounds, and every ratio is against TensorFlow fp32 of the same model.

    python -m benchmarks.runtimes_bench --model runs/resnet50-cifar10 --json /tmp/runtimes.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_DATA, load_jpegs, log, parse_int_list, quiet_tensorflow, write_json

RUNTIMES = ("tf", "bf16", "int8")


def _rate(fn: Any, batch: Any, seconds: float) -> float:
    """Images/s of back-to-back calls on ``batch`` for about ``seconds``."""
    fn(batch)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(batch)
        n += len(batch)
    return n / (time.perf_counter() - start)


def _latency_ms(fn: Any, one: Any, seconds: float) -> float:
    times: list[float] = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(times) < 5:
        t = time.perf_counter()
        fn(one)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def bench_runtimes(model_dir: Path, images: list[tuple[str, bytes]], batches: list[int], rounds: int,
                   seconds: float) -> dict[str, Any]:  # fmt: skip
    import numpy as np

    from models.data import decode_image
    from models.embedder import Embedder
    from models.inference import load_trained

    trained = load_trained(model_dir)
    embedders = {r: Embedder(trained, runtime=r) for r in RUNTIMES}
    size = trained.manifest.input_size
    decoded = [decode_image(data, size) for _, data in images]
    batch_of = {b: np.stack([decoded[i % len(decoded)] for i in range(b)]) for b in batches}
    rates: dict[str, dict[int, list[float]]] = {r: {b: [] for b in batches} for r in RUNTIMES}
    latency: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    log(f"{model_dir}: {trained.manifest.backbone} at {size} px; runtimes {[e.runtime for e in embedders.values()]}")
    for n in range(rounds):
        for r, e in embedders.items():
            for b in batches:
                rates[r][b].append(_rate(e, batch_of[b], seconds))
            latency[r].append(_latency_ms(e, batch_of[1] if 1 in batch_of else batch_of[batches[0]][:1], seconds))
        log(f"  round {n + 1}: " + ", ".join(f"{r} {max(statistics.median(v) for v in rates[r].values()):.0f} img/s"
                                               for r in RUNTIMES))  # fmt: skip
    out: dict[str, Any] = {"model_dir": str(model_dir), "backbone": trained.manifest.backbone, "input_size": size,
                           "rounds": rounds, "runtimes": {}}  # fmt: skip
    for r, e in embedders.items():
        per_batch = {str(b): round(statistics.median(v), 1) for b, v in rates[r].items()}
        best = max(per_batch, key=lambda b: per_batch[b])
        out["runtimes"][r] = {
            "ran": e.runtime,  # differs from r when that runtime fell back (see the log)
            "images_per_s": per_batch,
            "best_batched": {"batch": int(best), "images_per_s": per_batch[best]},
            "batch1_ms": round(statistics.median(latency[r]), 2),
            "check": e.runtime_record.check.model_dump() if e.runtime_record and e.runtime_record.check else None,
        }
    tf = out["runtimes"]["tf"]
    for row in out["runtimes"].values():
        row["forward_ratio_vs_tf"] = round(row["best_batched"]["images_per_s"] / tf["best_batched"]["images_per_s"], 2)
        row["batch1_speedup_vs_tf"] = round(tf["batch1_ms"] / row["batch1_ms"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.runtimes_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, action="append", required=True, help="MODEL_DIR (repeatable)")
    p.add_argument("--batch-sizes", default="1,16,32", help="comma-separated (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default %(default)s)")
    p.add_argument("--seconds", type=float, default=3.0, help="per runtime, batch size and round (default 3)")
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 JPEG archive (default %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="one short round (smoke run)")
    args = p.parse_args(argv)
    quiet_tensorflow()
    if args.quick:
        args.rounds, args.seconds = 1, 0.5
    images = load_jpegs("cifar", 64, args.data)
    batches = parse_int_list(args.batch_sizes)
    models = [bench_runtimes(m, images, batches, args.rounds, args.seconds) for m in args.model]
    write_json(args.json, {"kind": "runtimes", "models": models})
    return 0


if __name__ == "__main__":
    sys.exit(main())
