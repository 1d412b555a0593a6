"""(4) FAISS: build time, search latency and recall@5 at 10k / 100k / 1M vectors.

Indexes come from the product's own ``indexer.store.new_faiss_index`` with the defaults of
`imgsim index build` (HNSW M=32, efConstruction=80, efSearch=64; IVF nlist=256, nprobe=16),
filled with ``add_with_ids`` as the indexer does. The vectors (1024-d, the embedding size)
are a mixture of ``--clusters`` Gaussian blobs around random unit centres, normalised: a
rough stand-in for real embeddings, which are clustered by class (uniformly random
directions in 1024-d would be a worst case no real embedding set looks like). Per size and
type: build time (all cores), median latency of 1 and of 32 queries with 1 OpenMP thread
and with all cores, and recall@5 against the flat (exact) index.

    python -m benchmarks.faiss_bench --sizes 10k,100k,1M
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.common import log, summarise, time_calls, write_json

HNSW_PARAMS = {"hnsw_m": 32, "ef_construction": 80, "ef_search": 64}
PARAMS = {"flat": {}, "hnsw": HNSW_PARAMS, "hnsw-fp16": HNSW_PARAMS, "ivf": {"nlist": 256, "nprobe": 16}}
CHUNK = 50_000


def make_vectors(n: int, centres: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors near the centres (float32), generated in chunks to bound peak memory."""
    from indexer.faiss_index import l2_normalise

    dim = centres.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        x = rng.standard_normal((m, dim), dtype=np.float32) * (spread / math.sqrt(dim))
        out[start : start + m] = l2_normalise(x + centres[rng.integers(0, len(centres), m)])
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=False))
    return round(hits / truth.size, 4)


def bench_type(index_type: str, xb: np.ndarray, xq: np.ndarray, k: int, threads: list[int], budget: float) -> dict:
    import faiss

    from indexer.faiss_index import new_faiss_index

    faiss.omp_set_num_threads(max(threads))
    t0 = time.perf_counter()
    index = new_faiss_index(xb.shape[1], index_type, PARAMS[index_type], xb)
    index.add_with_ids(xb, np.arange(len(xb), dtype=np.int64))
    entry: dict[str, Any] = {"build_seconds": round(time.perf_counter() - t0, 3), "search": {}}
    entry["found"] = index.search(xq, k)[1]
    for t in threads:
        faiss.omp_set_num_threads(t)
        one = time_calls(lambda: index.search(xq[:1], k), min_reps=5, max_reps=len(xq), budget_s=budget)
        many = time_calls(lambda: index.search(xq[:32], k), min_reps=5, max_reps=len(xq) // 4, budget_s=budget)
        entry["search"][str(t)] = {"batch1": summarise(one), "batch32": summarise(many)}
    return entry


def bench_size(n: int, types: list[str], args: argparse.Namespace, centres: np.ndarray, threads: list[int]) -> dict:
    rng = np.random.default_rng(args.seed + n)
    xb = make_vectors(n, centres, args.spread, rng)
    xq = make_vectors(args.queries, centres, args.spread, rng)
    result: dict[str, Any] = {"n": n, "dim": xb.shape[1], "types": {}}
    truth = None
    for index_type in types:  # flat first: it is the ground truth for recall
        entry = bench_type(index_type, xb, xq, args.k, threads, args.budget)
        found = entry.pop("found")
        truth = found if truth is None else truth
        entry["recall_at_5"] = recall_at_k(found, truth)
        s = entry["search"]
        log(
            f"n={n:,} {index_type:9s} build {entry['build_seconds']:8.2f} s  recall@5 {entry['recall_at_5']:.3f}  "
            + "  ".join(f"[{t} thr] 1 query {v['batch1']['median_ms']:.3f} ms" for t, v in s.items())
        )
        result["types"][index_type] = entry
        gc.collect()
    return result


def parse_size(text: str) -> int:
    """'10k' -> 10000, '1M' -> 1000000, '2500' -> 2500."""
    t = text.strip().lower()
    mult = {"k": 1000, "m": 1_000_000}.get(t[-1:], 1)
    return int(float(t.rstrip("km")) * mult)


def main(argv: list[str] | None = None) -> int:
    import faiss

    from indexer.faiss_index import l2_normalise

    p = argparse.ArgumentParser(prog="python -m benchmarks.faiss_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10k,100k,1M", help="comma-separated, k/M suffixes (default %(default)s)")
    p.add_argument("--types", default="flat,hnsw,hnsw-fp16,ivf", help="index types (default %(default)s)")
    p.add_argument("--clusters", type=int, default=1000, help="Gaussian blobs (default %(default)s)")
    p.add_argument("--spread", type=float, default=1.0, help="blob noise / centre norm (default %(default)s)")
    p.add_argument("--queries", type=int, default=200, help="queries for recall and latency (default %(default)s)")
    p.add_argument("--k", type=int, default=5, help="neighbours (default %(default)s)")
    p.add_argument("--budget", type=float, default=10.0, help="seconds per latency measurement (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="sizes 2k,10k, 50 queries, short budgets (smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.budget = "2k,10k", min(args.queries, 50), 1.0
    types = [t for t in args.types.split(",") if t]
    if unknown := set(types) - set(PARAMS):
        p.error(f"unknown index type {', '.join(sorted(unknown))}; choose from {', '.join(PARAMS)}")
    types = ["flat", *[t for t in types if t != "flat"]]
    threads = sorted({1, len(psutil.Process().cpu_affinity() or [1])})
    centres = l2_normalise(np.random.default_rng(args.seed).standard_normal((args.clusters, 1024), dtype=np.float32))
    sizes = [bench_size(parse_size(s), types, args, centres, threads) for s in args.sizes.split(",")]
    out = {
        "kind": "faiss",
        "faiss_version": faiss.__version__,
        "data": "clustered",
        "clusters": args.clusters,
        "queries": args.queries,
        "k": args.k,
        "threads_compared": threads,
        "sizes": sizes,
    }
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
