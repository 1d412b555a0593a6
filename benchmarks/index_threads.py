"""FAISS search latency of a built index with 1 vs 2 OpenMP threads (IMGSIM_FAISS_THREADS).

python -m benchmarks.index_threads --index indexes/resnet50-cifar10
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from indexer.store import IndexStore, l2_normalise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="INDEX_DIR")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--calls", type=int, default=25, help="search calls per setting")
    args = p.parse_args()
    store = IndexStore.open(args.index)
    dim = store.index.d
    queries = l2_normalise(np.random.default_rng(0).normal(size=(max(args.batches) * args.calls, dim)))
    print(f"{args.index}: {store.index.ntotal} vectors x {dim}, {store.manifest['index_type']} index")
    for threads in args.threads:
        faiss.omp_set_num_threads(threads)
        store.search(queries[:1], 10)  # warm-up
        for bs in args.batches:
            times = []
            for i in range(args.calls):
                t = time.perf_counter()
                store.search(queries[i * bs : (i + 1) * bs], 10)
                times.append(time.perf_counter() - t)
            print(f"threads={threads} batch={bs:3d}: median {np.median(times) * 1000:8.2f} ms per search call")


if __name__ == "__main__":
    main()
