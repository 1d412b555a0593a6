"""In-process probes behind docs/performance.md: why the service's model calls run slower than the bare model.

Two questions, each answered by alternating two conditions several times (this VM's speed
drifts by several per cent over minutes, so one A-then-B pair proves little):

* ``contention``: the model at one batch size back-to-back in a thread, alone, then with a
  second Python thread that burns ``--burst-ms`` of CPU every ``--period-ms`` (the service's
  event loop needs about 1 ms of CPU per request, i.e. one burst per image at c=16). Does a
  few per cent of one core taken from TensorFlow's two threads cost only its share, or more?
* ``batch-mix``: the model at batch 8 alone, then interleaved with every batch size from 1
  to 32 (as the service's micro-batches arrive). TensorFlow keeps its oneDNN primitives in a
  per-thread cache of 1024 entries; does cycling through many batch shapes evict them?

    python -m benchmarks.probes contention --model runs/resnet50-cifar10
    python -m benchmarks.probes batch-mix --model runs/resnet50-cifar10
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import quiet_tensorflow


def _burner(burst_ms: float, period_ms: float, stop: threading.Event, burned: list[float]) -> None:
    while not stop.is_set():
        t0 = time.thread_time()
        end = time.perf_counter() + burst_ms / 1000
        x = 0
        while time.perf_counter() < end:  # pure Python, holding the GIL like the event loop
            x += 1
        burned[0] += time.thread_time() - t0
        time.sleep(max(0.0, (period_ms - burst_ms) / 1000))


def contention(embedder, batch: int, seconds: float, rounds: int, burst_ms: float, period_ms: float) -> None:  # noqa: ANN001
    size = embedder.input_size
    imgs = np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(5):
        embedder(imgs)
    results: dict[str, list[float]] = {"alone": [], "with burner": []}
    for r in range(rounds):
        for label in results:
            stop, burned = threading.Event(), [0.0]
            th = threading.Thread(target=_burner, args=(burst_ms, period_ms, stop, burned), daemon=True)
            if label != "alone":
                th.start()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                embedder(imgs)
                n += batch
            wall = time.perf_counter() - t0
            stop.set()
            ms = wall / n * 1000
            results[label].append(ms)
            print(
                f"round {r + 1} {label:12s} {ms:6.2f} ms/img  (burner CPU {burned[0] / wall:.1%} of one core)",
                flush=True,
            )
    a, b = statistics.mean(results["alone"]), statistics.mean(results["with burner"])
    print(
        f"mean over {rounds} rounds: alone {a:.2f} ms/img, with a {burst_ms:g} ms burst every {period_ms:g} ms "
        f"{b:.2f} ms/img ({(b / a - 1) * 100:+.1f} %); the burner's own share: "
        f"{burst_ms / period_ms:.1%} of one core = {burst_ms / period_ms / 2:.1%} of the two"
    )


def batch_mix(embedder, seconds: float, rounds: int) -> None:  # noqa: ANN001
    size = embedder.input_size
    imgs = np.random.default_rng(0).integers(0, 255, (32, size, size, 3), dtype=np.uint8)
    for b in range(1, 33):  # every shape seen once, so the first mixed round is not a cold start
        embedder(imgs[:b])

    def b8_for(secs: float) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < secs:
            embedder(imgs[:8])
            n += 8
        return (time.perf_counter() - t0) / n * 1000

    alone, mixed = [], []
    for r in range(rounds):
        alone.append(b8_for(seconds))
        t_b8, n8, t0 = 0.0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for b in range(1, 33):
                embedder(imgs[:b])
                t = time.perf_counter()
                embedder(imgs[:8])
                t_b8 += time.perf_counter() - t
                n8 += 8
        mixed.append(t_b8 / n8 * 1000)
        print(
            f"round {r + 1}: batch 8 alone {alone[-1]:6.2f} ms/img; batch 8 between sizes 1..32 {mixed[-1]:6.2f} ms/img"
        )
    a, m = statistics.mean(alone), statistics.mean(mixed)
    print(f"mean over {rounds} rounds: alone {a:.2f}, mixed {m:.2f} ms/img ({(m / a - 1) * 100:+.1f} %)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=("contention", "batch-mix"))
    p.add_argument("--model", type=Path, required=True, help="MODEL_DIR")
    p.add_argument("--batch", type=int, default=8, help="contention: batch size (default %(default)s)")
    p.add_argument("--seconds", type=float, default=12.0, help="per condition and round (default %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="alternations (default %(default)s)")
    p.add_argument("--burst-ms", type=float, default=1.0, help="contention: CPU burst (default %(default)s)")
    p.add_argument("--period-ms", type=float, default=17.0, help="contention: one burst per (default %(default)s)")
    args = p.parse_args()
    quiet_tensorflow()
    from models.inference import Embedder, load_trained

    embedder = Embedder(load_trained(args.model))
    if args.probe == "contention":
        contention(embedder, args.batch, args.seconds, args.rounds, args.burst_ms, args.period_ms)
    else:
        batch_mix(embedder, args.seconds, args.rounds)


if __name__ == "__main__":
    main()
