"""(4) FAISS: build time, search latency and recall@5 at 10k / 100k / 1M vectors.

Indexes are made with the product's own ``indexer.store.new_faiss_index`` (same types,
same default parameters as `imgsim index`: HNSW M=32, efConstruction=80, efSearch=64;
IVF nlist=256, nprobe=16, trained on the vectors being indexed), filled with
``add_with_ids`` as the indexer does, and searched through ``l2_normalise``-d queries.

Vectors (dim 1024 = the embedding size) are random unit vectors:

* ``clustered`` (default): a mixture of ``--clusters`` Gaussian blobs around random unit
  centres, normalised; a query's cosine to its own centre is ~0.7 and to another point of
  its blob ~0.5, a rough stand-in for real embeddings, which are clustered by class.
* ``uniform``: uniformly random directions. In 1024-d all cosines concentrate near 0, so
  the "nearest" neighbours are barely nearer than the rest: a worst case for approximate
  indexes (low recall) that no real embedding set looks like.

Queries are fresh draws from the same distribution. Per size and index type: build
time (training + adding; FAISS uses all cores), the median latency of one query
and of a batch of 32 queries with 1 OpenMP thread and with all cores, and recall@5
against the flat (exact) index. HNSW builds grow fastest: when the build at the previous
size, scaled up by n log n, predicts more than ``--hnsw-max-seconds``, the larger size is
skipped and the output says so.

    python -m benchmarks.faiss_bench --sizes 10k,100k,1M
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import log, parse_size, summarise, write_json

HNSW_PARAMS = {"hnsw_m": 32, "ef_construction": 80, "ef_search": 64}  # `imgsim index` defaults
IVF_PARAMS = {"nlist": 256, "nprobe": 16}
PARAMS = {"flat": {}, "hnsw": HNSW_PARAMS, "hnsw-fp16": HNSW_PARAMS, "ivf": IVF_PARAMS}
CHUNK = 50_000


def make_vectors(
    n: int, dim: int, kind: str, rng: np.random.Generator, centres: np.ndarray | None, spread: float
) -> np.ndarray:
    """``n`` unit vectors (float32, C order), generated in chunks to bound peak memory."""
    from indexer.store import l2_normalise

    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        if kind == "clustered":
            assert centres is not None
            x *= spread / math.sqrt(dim)
            x += centres[rng.integers(0, len(centres), m)]
        out[start : start + m] = l2_normalise(x)
    return out


def timed_searches(index: Any, queries: np.ndarray, k: int, batch: int, budget_s: float, max_reps: int) -> dict:
    from indexer.store import l2_normalise

    times: list[float] = []
    start = time.perf_counter()
    i = 0
    index.search(l2_normalise(queries[:batch]), k)  # warm-up
    while len(times) < max_reps:
        q = queries[(i * batch) % len(queries) :][:batch]
        if len(q) < batch:
            q = queries[:batch]
        i += 1
        t0 = time.perf_counter()
        index.search(l2_normalise(q), k)
        times.append(time.perf_counter() - t0)
        if len(times) >= 5 and time.perf_counter() - start > budget_s:
            break
    return summarise(times)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return round(hits / (k * len(truth)), 4)


def bench_size(
    n: int,
    dim: int,
    types: list[str],
    *,
    kind: str,
    rng: np.random.Generator,
    centres: np.ndarray | None,
    spread: float,
    n_queries: int,
    k: int,
    budget_s: float,
    threads: list[int],
    hnsw_estimate: float | None,
    hnsw_max_seconds: float,
) -> tuple[dict[str, Any], float | None]:
    import faiss

    from indexer.store import HNSW_TYPES, l2_normalise, new_faiss_index

    t0 = time.perf_counter()
    xb = make_vectors(n, dim, kind, rng, centres, spread)
    xq = make_vectors(max(n_queries, 32), dim, kind, rng, centres, spread)
    ids = np.arange(n, dtype=np.int64)
    log(f"n={n:,}: {n * dim * 4 / 1e9:.2f} GB of vectors generated in {time.perf_counter() - t0:.1f} s")
    result: dict[str, Any] = {"n": n, "dim": dim, "types": {}}
    truth: np.ndarray | None = None
    hnsw_seconds = None
    all_threads = max(threads)
    for kind_ in types:
        if kind_ in HNSW_TYPES and hnsw_estimate is not None and hnsw_estimate > hnsw_max_seconds:
            result["types"][kind_] = {
                "skipped": f"build estimated at {hnsw_estimate:.0f} s from the previous size (n log n), "
                f"over --hnsw-max-seconds {hnsw_max_seconds:.0f}"
            }
            log(f"  {kind_}: skipped (estimated build {hnsw_estimate:.0f} s > {hnsw_max_seconds:.0f} s)")
            continue
        faiss.omp_set_num_threads(all_threads)
        t0 = time.perf_counter()
        index = new_faiss_index(dim, kind_, PARAMS[kind_], xb)
        t_train = time.perf_counter() - t0
        index.add_with_ids(xb, ids)
        build = time.perf_counter() - t0
        if kind_ == "hnsw":
            hnsw_seconds = build
        entry: dict[str, Any] = {
            "params": PARAMS[kind_],
            "faiss_index": type(getattr(index, "index", index)).__name__,
            "build_seconds": round(build, 3),
            "train_seconds": round(t_train, 3),
            "build_threads": all_threads,
        }
        if kind_ == "ivf":
            entry["nlist"] = int(index.nlist)
            entry["nprobe"] = int(index.nprobe)
        found = index.search(l2_normalise(xq[:n_queries]), k)[1]
        if kind_ == "flat":
            truth = found
            entry["recall_at_5"] = 1.0
        elif truth is not None:
            entry["recall_at_5"] = recall_at_k(found, truth)
        entry["search"] = {}
        for t in threads:
            faiss.omp_set_num_threads(t)
            entry["search"][str(t)] = {
                "batch1": timed_searches(index, xq, k, 1, budget_s, max_reps=max(n_queries, 5)),
                "batch32": timed_searches(index, xq, k, 32, budget_s, max_reps=max(n_queries // 4, 5)),
            }
        s = entry["search"]
        log(
            f"  {kind_:5s} build {build:8.2f} s  recall@5 {entry.get('recall_at_5', float('nan')):.3f}  "
            + "  ".join(
                f"[{t} thr] 1 query {s[t]['batch1']['median_ms']:.3f} ms, 32 queries {s[t]['batch32']['median_ms']:.2f} ms"
                for t in s
            )
        )
        result["types"][kind_] = entry
        del index
        gc.collect()
    faiss.omp_set_num_threads(all_threads)
    del xb
    gc.collect()
    return result, hnsw_seconds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.faiss_bench",
        description="FAISS build time, search latency (1 and 32 queries, 1 thread vs all cores) and "
        "recall@5 against flat, for the product's flat/hnsw/hnsw-fp16/ivf indexes on random unit vectors.",
    )
    p.add_argument("--sizes", default="10k,100k,1M", help="comma-separated, k/M suffixes (default %(default)s)")
    p.add_argument("--dim", type=int, default=1024, help="vector dimension (default %(default)s = embedding size)")
    p.add_argument(
        "--types", default="flat,hnsw,hnsw-fp16,ivf", help=f"index types, of {','.join(PARAMS)} (default %(default)s)"
    )
    p.add_argument("--data", choices=("clustered", "uniform"), default="clustered", help="default %(default)s")
    p.add_argument("--clusters", type=int, default=1000, help="blobs for --data clustered (default %(default)s)")
    p.add_argument("--spread", type=float, default=1.0, help="blob noise / centre norm (default %(default)s)")
    p.add_argument("--queries", type=int, default=200, help="queries for recall and latency (default %(default)s)")
    p.add_argument("--k", type=int, default=5, help="neighbours (default %(default)s)")
    p.add_argument("--budget", type=float, default=10.0, help="seconds per latency measurement (default %(default)s)")
    p.add_argument("--threads", default=None, help="OpenMP thread counts to compare (default: 1 and all usable cores)")
    p.add_argument(
        "--hnsw-max-seconds",
        type=float,
        default=600.0,
        help="skip an HNSW build predicted to take longer (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="sizes 2k,10k, 50 queries, short budgets (smoke run)")
    return p


def main(argv: list[str] | None = None) -> int:
    import faiss

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = "2k,10k" if args.sizes == "10k,100k,1M" else args.sizes
        args.queries = min(args.queries, 50)
        args.budget = min(args.budget, 1.0)
    sizes = sorted(parse_size(s) for s in args.sizes.split(","))
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if unknown := [t for t in types if t not in PARAMS]:
        parser.error(f"unknown index type {', '.join(unknown)}; choose from {', '.join(PARAMS)}")
    if "flat" in types:  # flat first: it is the ground truth for recall
        types = ["flat", *[t for t in types if t != "flat"]]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = sorted({int(t) for t in args.threads.split(",")}) if args.threads else sorted({1, cores})
    rng = np.random.default_rng(args.seed)
    centres = None
    if args.data == "clustered":
        from indexer.store import l2_normalise

        centres = l2_normalise(rng.standard_normal((args.clusters, args.dim), dtype=np.float32))
    results = []
    hnsw_prev: tuple[int, float] | None = None
    for n in sizes:
        estimate = None
        if hnsw_prev is not None:
            n0, s0 = hnsw_prev
            estimate = s0 * (n * math.log(n)) / (n0 * math.log(n0))
        res, hnsw_s = bench_size(
            n,
            args.dim,
            types,
            kind=args.data,
            rng=rng,
            centres=centres,
            spread=args.spread,
            n_queries=args.queries,
            k=args.k,
            budget_s=args.budget,
            threads=threads,
            hnsw_estimate=estimate,
            hnsw_max_seconds=args.hnsw_max_seconds,
        )
        if hnsw_s is not None:
            hnsw_prev = (n, hnsw_s)
        results.append(res)
    out = {
        "kind": "faiss",
        "faiss_version": faiss.__version__,
        "data": args.data,
        "clusters": args.clusters if args.data == "clustered" else None,
        "spread": args.spread if args.data == "clustered" else None,
        "queries": args.queries,
        "k": args.k,
        "threads_compared": threads,
        "hnsw_max_seconds": args.hnsw_max_seconds,
        "sizes": results,
    }
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
