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

* ``freeze``: ms per image at batch 1, 8, 16 and 32 for the Keras variables graph and the
  frozen graph (weights as constants; ``IMGSIM_FREEZE_GRAPH``), alternating.
* ``streams``: ms per image of one call at batch 8, 16 and 32, against two threads each
  calling at batch 8 or 16 at once (the service's two model streams), alternating; and the
  cores each case keeps busy (process CPU time / wall time) with its CPU ms per image.

    python -m benchmarks.probes contention --model runs/resnet50-cifar10
    python -m benchmarks.probes batch-mix --model runs/resnet50-cifar10
    python -m benchmarks.probes freeze --model runs/resnet50-cifar10 --rounds 2 --seconds 4
    python -m benchmarks.probes streams --model runs/resnet50-cifar10 --rounds 3 --seconds 4
    python -m benchmarks.probes search-cold --model runs/vgg16-cifar10 --index indexes/vgg16-cifar10-hnsw
    python -m benchmarks.probes app-overhead
    python -m benchmarks.probes idle-wake --model runs/resnet50-cifar10 --rounds 3

* ``search-cold``: one FAISS search (k=10, 1 OpenMP thread) back to back, then right after a
  batch-1 forward pass, as every search at concurrency 1 runs in the service; for an HNSW
  index, the same for a float16 copy of it, with both copies' recall@10 against exact search.
* ``app-overhead``: the FastAPI app's own time for one multipart ``POST /v1/search``, in
  process, with a stub model that answers at once (no TensorFlow, no HTTP server), and
  where that time goes (cProfile, cumulative). Also for the same image sent as the raw body.
* ``idle-wake``: JPEG decoding (real CIFAR-10 JPEGs, ``--data``) and the batch-1 forward, each
  back to back, then after a sleep (``--gap-ms``): at concurrency 1 the service is idle for
  the client's round trip between requests, and the reference (back to back) never is.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_DATA, load_jpegs, quiet_tensorflow, threaded_rate


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


def _ms_per_image(calls: list, batch: np.ndarray, seconds: float) -> float:  # noqa: ANN001
    return 1000.0 / threaded_rate(calls, batch, seconds)


def freeze(model_dir: Path, seconds: float, rounds: int) -> None:
    from models.inference import Embedder, load_trained

    trained = load_trained(model_dir)
    graphs = {"variables": Embedder(trained, freeze=False), "frozen": Embedder(trained, freeze=True)}
    size = graphs["frozen"].input_size
    imgs = np.random.default_rng(0).integers(0, 255, (32, size, size, 3), dtype=np.uint8)
    for r in range(rounds):
        for b in (1, 8, 16, 32):
            ms = {name: _ms_per_image([e], imgs[:b], seconds) for name, e in graphs.items()}
            print(
                f"round {r + 1} batch {b:2d}: variables {ms['variables']:6.2f}  frozen {ms['frozen']:6.2f} ms/img "
                f"({(ms['frozen'] / ms['variables'] - 1) * 100:+.1f} %)",
                flush=True,
            )


def streams(embedder, seconds: float, rounds: int) -> None:  # noqa: ANN001
    """Also the CPU each case keeps busy: whatever a bare call shape leaves idle, the service
    cannot use for the model either (the c=16 budget in docs/performance.md)."""
    size = embedder.input_size
    imgs = np.random.default_rng(0).integers(0, 255, (32, size, size, 3), dtype=np.uint8)
    cases = [("1 call  b8", 1, 8), ("2 calls b8", 2, 8), ("1 call  b16", 1, 16), ("2 calls b16", 2, 16)]
    cases.append(("1 call  b32", 1, 32))
    for r in range(rounds):
        ms, cpu = {}, {}
        for label, n, b in cases:
            wall0, cpu0 = time.perf_counter(), time.process_time()
            ms[label] = _ms_per_image([embedder] * n, imgs[:b], seconds)
            cpu[label] = (time.process_time() - cpu0) / (time.perf_counter() - wall0)  # cores busy
        b32 = ms["1 call  b32"]
        print(
            f"round {r + 1}: " + "  ".join(f"{k} {v:.2f}" for k, v in ms.items()) + " ms/img; "
            "throughput vs 1 call b32: " + "  ".join(f"{k.strip()} {b32 / v:.3f}" for k, v in ms.items() if v != b32),
            flush=True,
        )
        print(
            f"round {r + 1}: cores busy "
            + "  ".join(f"{k.strip()} {c:.2f}" for k, c in cpu.items())
            + "; CPU ms/img "
            + "  ".join(f"{k.strip()} {cpu[k] * v:.2f}" for k, v in ms.items()),
            flush=True,
        )


def search_cold(embedder, index_dir: Path, rounds: int) -> None:  # noqa: ANN001
    """For an HNSW index, also a float16 copy of it: the search reads the vectors it visits
    from DRAM after a forward pass, and half the bytes should show."""
    import faiss

    from benchmarks.faiss_bench import recall_at_k
    from indexer.store import IndexStore, all_vectors

    store = IndexStore.open(index_dir)
    faiss.omp_set_num_threads(1)
    size = embedder.input_size
    imgs = np.random.default_rng(0).integers(0, 255, (64, 1, size, size, 3), dtype=np.uint8)
    embs = [embedder(im)[0] for im in imgs]

    def warm_cold(search) -> tuple[float, float]:  # noqa: ANN001
        warm, cold = [], []
        for _ in range(rounds):
            for e in embs:
                t = time.perf_counter()
                search(e)
                warm.append(time.perf_counter() - t)
            for im, e in zip(imgs, embs):
                embedder(im)
                t = time.perf_counter()
                search(e)
                cold.append(time.perf_counter() - t)
        return statistics.median(warm) * 1000, statistics.median(cold) * 1000

    warm, cold = warm_cold(lambda e: store.search(e, 10))
    print(
        f"{store.manifest.get('index_type')} index of {store.index.ntotal}: one search back to back "
        f"{warm:.3f} ms, right after a forward pass {cold:.3f} ms (median of {rounds * len(embs)})",
        flush=True,
    )
    hnsw = faiss.downcast_index(getattr(store.index, "index", store.index))
    if not isinstance(hnsw, faiss.IndexHNSWFlat):
        return
    _, vectors = all_vectors(store.index)
    half = faiss.IndexHNSWSQ(
        vectors.shape[1], faiss.ScalarQuantizer.QT_fp16, hnsw.hnsw.nb_neighbors(1), hnsw.metric_type
    )
    half.hnsw.efConstruction, half.hnsw.efSearch = hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch
    half.train(vectors)
    half.add(vectors)
    queries = vectors[np.random.default_rng(0).choice(len(vectors), min(500, len(vectors)), replace=False)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    truth = exact.search(queries, 10)[1]
    recall = {
        name: recall_at_k(index.search(queries, 10)[1], truth) for name, index in (("float32", hnsw), ("float16", half))
    }
    warm16, cold16 = warm_cold(lambda e: half.search(e, 10))
    print(
        f"float16 copy (IndexHNSWSQ, same M/efConstruction/efSearch; vectors {vectors.shape[1] * 2} instead of "
        f"{vectors.shape[1] * 4} bytes): back to back {warm16:.3f} ms, right after a forward pass {cold16:.3f} ms; "
        f"recall@10 of {len(queries)} indexed vectors against exact search: float32 {recall['float32']:.3f}, float16 {recall['float16']:.3f}",
        flush=True,
    )


def idle_wake(embedder, jpegs: list[bytes], rounds: int, gap_ms: float) -> None:  # noqa: ANN001
    from models.data import decode_image

    size = embedder.input_size
    x = np.random.default_rng(0).integers(0, 255, (1, size, size, 3), dtype=np.uint8)

    def median_us(fn, n: int, gap: float) -> float:  # noqa: ANN001
        out = []
        for i in range(n):
            if gap:
                time.sleep(gap)
            t = time.perf_counter()
            fn(i)
            out.append(time.perf_counter() - t)
        return statistics.median(out) * 1e6

    def decode(i: int) -> None:
        decode_image(jpegs[i % len(jpegs)], size)

    def forward(i: int) -> None:
        embedder(x)

    gap = gap_ms / 1000
    for r in range(rounds):
        d_hot, d_idle = median_us(decode, 300, 0.0), median_us(decode, 150, gap)
        f_hot, f_idle = median_us(forward, 100, 0.0) / 1000, median_us(forward, 100, gap) / 1000
        print(
            f"round {r + 1}: decode {d_hot:.0f} us back to back, {d_idle:.0f} us after {gap_ms:g} ms idle; "
            f"batch-1 forward {f_hot:.2f} ms back to back, {f_idle:.2f} ms after {gap_ms:g} ms idle "
            f"({f_idle / f_hot - 1:+.1%})",
            flush=True,
        )


def app_overhead(requests: int, rounds: int) -> None:
    """The app's time per search request with a stub model: routing, multipart, decode, response."""
    import asyncio
    import cProfile
    import io
    import pstats

    from PIL import Image

    from app.batching import Result
    from app.config import ServiceSettings
    from app.main import create_app

    class Batcher:
        full, max_queue, depth = False, 256, 0

        async def submit(self, image: np.ndarray, k: int) -> Result:
            scores = np.linspace(1, 0.5, k).astype(np.float32)
            return Result(np.zeros(1024, np.float32), np.full(10, 0.1, np.float32), scores, np.arange(k), 1, 0.0)

    class Loaded:
        name, batcher = "stub", Batcher()
        store = type("Store", (), {"label_names": lambda self, ids: ["cat"] * len(ids)})()
        embedder = type("Emb", (), {"input_size": 64, "class_names": [f"c{i}" for i in range(10)]})()

    app = create_app(ServiceSettings(models=[]))
    loaded = Loaded()
    app.state.registry = type("Registry", (), {"models": {"stub": loaded}, "get": lambda self, name: loaded})()
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    boundary = b"imgsimprobe"
    multipart = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="q.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + buf.getvalue() + b"\r\n--" + boundary + b"--\r\n"
    )
    bodies = {
        "multipart": (b"multipart/form-data; boundary=" + boundary, multipart),
        "raw body": (b"image/jpeg", buf.getvalue()),
    }

    async def one(content_type: bytes, body: bytes) -> int:
        headers = [
            (b"host", b"probe"),
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
        ]
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/search", "raw_path": b"/v1/search", "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
            "state": {}, "app": app,
        }  # fmt: skip
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        status = [0]

        async def receive() -> dict:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]

        await app(scope, receive, send)
        return status[0]

    async def timed(kind: str) -> list[float]:
        assert await one(*bodies[kind]) == 200
        out = []
        for _ in range(requests):
            t = time.perf_counter()
            await one(*bodies[kind])
            out.append(time.perf_counter() - t)
        return out

    for r in range(rounds):
        for kind in bodies:
            us = statistics.median(asyncio.run(timed(kind))) * 1e6
            print(f"round {r + 1}: {kind:9s} {us:4.0f} us per request (median)")
    prof = cProfile.Profile()
    prof.runcall(asyncio.run, timed("multipart"))
    total = pstats.Stats(prof).total_tt
    stats = pstats.Stats(prof)
    print(f"cProfile of the multipart requests, cumulative share of {total:.2f} s (profiling inflates all times):")
    wanted = {
        "decode_upload": "decode the upload (Pillow)",
        "_get_form": "multipart parsing (Starlette + python-multipart)",
        "request_body_to_args": "form fields -> parameters (FastAPI)",
        "solve_dependencies": "dependency solving, incl. form fields -> parameters (FastAPI)",
        "serialize_response": "response model -> JSON (FastAPI)",
    }
    for (_, _, name), row in stats.stats.items():  # type: ignore[attr-defined]
        if name in wanted:
            print(f"  {row[3] / total:6.1%}  {wanted.pop(name)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "probe", choices=("contention", "batch-mix", "freeze", "streams", "search-cold", "app-overhead", "idle-wake")
    )
    p.add_argument("--model", type=Path, help="MODEL_DIR (every probe but app-overhead)")
    p.add_argument("--index", type=Path, help="search-cold: INDEX_DIR")
    p.add_argument("--requests", type=int, default=2000, help="app-overhead: per round (default %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="contention: batch size (default %(default)s)")
    p.add_argument("--seconds", type=float, default=12.0, help="per condition and round (default %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="alternations (default %(default)s)")
    p.add_argument("--burst-ms", type=float, default=1.0, help="contention: CPU burst (default %(default)s)")
    p.add_argument("--period-ms", type=float, default=17.0, help="contention: one burst per (default %(default)s)")
    p.add_argument(
        "--gap-ms", type=float, default=10.0, help="idle-wake: idle time before each call (default %(default)s)"
    )
    p.add_argument("--data", default=DEFAULT_DATA, help="idle-wake: CIFAR-10 JPEG archive (default %(default)s)")
    args = p.parse_args()
    if args.probe == "app-overhead":
        app_overhead(args.requests, args.rounds)
        return
    if args.model is None or (args.probe == "search-cold" and args.index is None):
        p.error(f"{args.probe} needs --model" + (" and --index" if args.probe == "search-cold" else ""))
    quiet_tensorflow()
    from models.inference import Embedder, load_trained

    if args.probe == "freeze":
        freeze(args.model, args.seconds, args.rounds)
        return
    embedder = Embedder(load_trained(args.model))
    if args.probe == "streams":
        streams(embedder, args.seconds, args.rounds)
    elif args.probe == "idle-wake":
        idle_wake(embedder, [data for _, data in load_jpegs("cifar", 64, args.data)], args.rounds, args.gap_ms)
    elif args.probe == "search-cold":
        search_cold(embedder, args.index, args.rounds)
    elif args.probe == "contention":
        contention(embedder, args.batch, args.seconds, args.rounds, args.burst_ms, args.period_ms)
    else:
        batch_mix(embedder, args.seconds, args.rounds)


if __name__ == "__main__":
    main()
