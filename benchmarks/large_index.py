"""Compressed (ivfpq) index at 1M and 10M vectors: recall@5, latency, memory, build time.

The vectors are made from real embeddings (:mod:`benchmarks.synthetic_vectors`: ResNet50
embeddings of CIFAR-10 as cluster centres plus noise shaped like the real data) and streamed
in seeded chunks, so 10M x 1024-d (41 GB as float32) is never in memory. One pass over the
chunks fills the index, writes the float16 vector file and keeps the exact top-5 of every
query (brute force, the ground truth). The result is a real INDEX_DIR, opened memory-mapped
exactly as the service opens it (``IndexStore.open(mmap=True)``) and searched through
``IndexStore.search`` (IVF-PQ candidates re-ranked by exact vectors).

Then: the memory of 1 and of 3 processes that open the index this way and answer queries
(RSS counts shared pages in every process; PSS splits them between the processes sharing
them), against processes that read it into RAM (``mmap=False``).

    python -m benchmarks.large_index --n 1M --out docs/large_index-1m.json
    python -m benchmarks.large_index --n 10M --out docs/large_index-10m.json --processes 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from benchmarks.common import latency_percentiles, log, machine_info, parse_int_list, write_json
from benchmarks.synthetic_vectors import CHUNK, VectorSource, source_from_index

K = 5


def parse_count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * scale)


def build(src: VectorSource, n: int, out: Path, params: dict[str, int], queries: np.ndarray) -> dict[str, Any]:
    """Write INDEX_DIR ``out`` from n streamed vectors; returns timings and the exact top-K."""
    from indexer.faiss_index import new_faiss_index
    from indexer.items_table import create_items_db
    from indexer.store import write_index_files
    from indexer.vector_file import VECTORS_FILE, put_rows
    from indexer.versions import new_version

    t0 = time.perf_counter()
    sample = np.concatenate([c for _, c in src.chunks(min(n, 64 * params["nlist"] + CHUNK))])
    index = new_faiss_index(src.dim, "ivfpq", params, sample)
    del sample
    train_s = time.perf_counter() - t0
    heap = faiss.ResultHeap(len(queries), K, keep_max=True)
    with new_version(out) as tmp:
        db = create_items_db(tmp / "items.sqlite")
        for start, x in src.chunks(n):
            ids = np.arange(start, start + len(x), dtype=np.int64)
            index.add_with_ids(x, ids)
            put_rows(tmp / VECTORS_FILE, ids, x, start + len(x))
            db.executemany("INSERT INTO items (id, key, source, label, sha256) VALUES (?, ?, 'synthetic', -1, '')",
                           [(int(i), f"v{i}") for i in ids])  # fmt: skip
            scores, found = faiss.knn(queries, x, K, metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(scores, found + start)
            if start // CHUNK % 10 == 0:
                log(f"  {start + len(x):,} / {n:,} vectors")
        db.commit()
        db.close()
        write_index_files(tmp, index, _manifest(n, src.dim, params, index))
    heap.finalize()
    return {"train_s": round(train_s, 1), "build_s": round(time.perf_counter() - t0, 1), "truth": heap.I}


def _manifest(n: int, dim: int, params: dict[str, int], index: faiss.Index) -> Any:
    from models.manifests import IndexDataset, IndexManifest, ModelIdentity

    model = ModelIdentity(name="synthetic", path="-", backbone="synthetic", model_sha256="-",
                          embedding_layer="-", embedding_dim=dim, input_size=0)  # fmt: skip
    dataset = IndexDataset(spec="synthetic", kind="synthetic", fingerprint="-", splits=["train"], class_names=[],
                           images_stored=False)  # fmt: skip
    return IndexManifest(model=model, embedding_layer="-", embedding_dim=dim, count=n, next_id=n, dataset=dataset,
                         index_type="ivfpq", index_params=params, faiss_index=type(index).__name__,
                         embedding_path="synthetic")  # fmt: skip


def measure(
    out: Path, queries: np.ndarray, truth: np.ndarray, nprobes: list[int], reranks: list[int]
) -> dict[str, Any]:
    """Recall@5 and single-query latency per (nprobe, rerank), through the store as the service uses it."""
    from indexer.store import IndexStore

    rows = {}
    with closing(IndexStore.open(out, mmap=True)) as store:
        ivf = faiss.extract_index_ivf(store.index)
        for nprobe, rerank in [(n, r) for r in reranks for n in nprobes]:
            ivf.nprobe = nprobe
            store.manifest.index_params["rerank"] = rerank  # both are search-time knobs
            store.search(queries[:50], K)  # warm the page cache as a running service would be
            _, found = store.search(queries, K)
            recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=False)]))
            lat: dict[str, Any] = {}
            for threads in (1, 2):
                faiss.omp_set_num_threads(threads)
                times = []
                for q in queries[:300]:
                    t = time.perf_counter()
                    store.search(q[None], K)
                    times.append(time.perf_counter() - t)
                lat[f"{threads}_threads"] = latency_percentiles(times)
            rows[f"nprobe={nprobe},rerank={rerank}"] = {"recall_at_5": round(recall, 4), "latency": lat}
            log(
                f"  nprobe {nprobe}, rerank {rerank}: recall@5 {recall:.4f}, p50 {lat['1_threads']['p50_ms']} ms, "
                f"p99 {lat['1_threads']['p99_ms']} ms (1 thread)"
            )
    return rows


_CHILD = """
import sys, time, numpy as np, psutil
from indexer.store import IndexStore
q = np.load(sys.argv[3])
before = psutil.Process().memory_full_info()
store = IndexStore.open(sys.argv[1], mmap=sys.argv[2] == "mmap")
for i in range(0, len(q), 10):
    store.search(q[i:i + 10], 5)
m = psutil.Process().memory_full_info()
print(f"{m.rss - before.rss} {m.uss - before.uss} {m.pss - before.pss}", flush=True)
sys.stdin.read()
"""


def shared_memory(out: Path, queries: np.ndarray, processes: int, how: str) -> dict[str, Any]:
    """What opening and searching the index added to the RSS, USS and PSS (MB) of
    ``processes`` processes holding it open at once (the imports' memory left out)."""
    qfile = out.parent / "queries.npy"
    np.save(qfile, queries)
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(out), how, str(qfile)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(processes)]  # fmt: skip
    try:
        stats = [tuple(int(v) / 1e6 for v in p.stdout.readline().split()) for p in procs]  # type: ignore[union-attr]
    finally:
        for p in procs:
            p.communicate("")
    rss, uss, pss = (round(sum(s[i] for s in stats), 1) for i in range(3))
    return {"processes": processes, "open": how, "rss_mb_added": rss, "uss_mb_added": uss, "pss_mb_added": pss}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="1M", help="vectors (1M, 10M, ...)")
    ap.add_argument("--centres", type=Path, default=Path("indexes/resnet50-cifar10-hnsw16"),
                    help="an imgsim index whose vectors are the real embeddings to imitate")  # fmt: skip
    ap.add_argument("--max-index-memory", default=None, help="plan the index within this RAM (default: pq_m 64)")
    ap.add_argument("--nprobe", default="64,128", help="lists probed per query, one measurement each")
    ap.add_argument("--rerank", default="10,40", help="candidates re-ranked per result, one measurement each")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=3, help="memory of this many processes sharing it (0: skip)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/imgsim-large-index"), help="where the index is written")
    ap.add_argument("--keep", action="store_true", help="keep the index afterwards")
    ap.add_argument("--reuse", action="store_true", help="measure the index --keep left in --work, no rebuild")
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    args = ap.parse_args(argv)

    from indexer.index_plan import PQ_DEFAULT, ivfpq_params, parse_bytes, plan

    n = parse_count(args.n)
    info = machine_info()
    src = source_from_index(args.centres)
    queries = src.queries(args.queries)
    if args.max_index_memory:
        chosen = plan(n, src.dim, parse_bytes(args.max_index_memory), "ivfpq")
        params = chosen.params
    else:
        params = ivfpq_params(n, src.dim, PQ_DEFAULT)
    log(f"{n:,} vectors of {src.dim}-d from {len(src.centres):,} real centres (noise scale {src.scale:.3f}); {params}")
    out = args.work / "index"
    if args.reuse and (args.work / "built.json").is_file():  # measure again, e.g. on a quieter machine
        built = json.loads((args.work / "built.json").read_text())
        built["truth"] = np.load(args.work / "truth.npy")
    else:
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
        built = build(src, n, out, params, queries)
        np.save(args.work / "truth.npy", built["truth"])
        (args.work / "built.json").write_text(json.dumps({k: v for k, v in built.items() if k != "truth"}))
    files = {p.name: p.stat().st_size for p in out.resolve().iterdir()}
    result: dict[str, Any] = {
        "n": n,
        "dim": src.dim,
        "vectors": f"synthetic: {len(src.centres)} real embeddings ({args.centres}) as centres, noise scale "
        f"{src.scale:.4f} along their top principal components; median cosine to the nearest real neighbour matched",
        "params": params,
        "train_s": built["train_s"],
        "build_s": built["build_s"],
        "ram_bytes_per_vector": round(files["index.faiss"] / n, 1),
        "disk_bytes_per_vector": round(sum(files.values()) / n, 1),
        "files_bytes": files,
        "search": measure(out, queries, built["truth"], parse_int_list(args.nprobe), parse_int_list(args.rerank)),
        "machine": info,
    }
    if args.processes:
        result["shared_memory"] = [shared_memory(out, queries, p, how) for how in ("mmap", "read") for p in
                                   sorted({1, args.processes})]  # fmt: skip
    log(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    write_json(args.out, result)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
