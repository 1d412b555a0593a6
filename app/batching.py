"""Micro-batching: concurrent requests for one model share a single model call.

Requests put their decoded image on a bounded asyncio queue and await a future. One
worker task per model takes everything already queued (up to ``max_batch``; optionally
waiting ``max_wait_ms`` for more), runs the forward pass and the FAISS search for the
whole batch in the model's own thread (TensorFlow and FAISS release the GIL, so the
event loop stays free), then resolves each request's future. With ``max_wait_ms=0`` a
lone request runs at once, and batches form naturally while the model is busy.

Policy ``balanced`` (the default) keeps the work in flight split into two halves when the
model is saturated. Clients that each wait for their answer before sending again (a fixed
pool of workers, the benchmark's closed loop) otherwise settle into whatever split the
first batches happened to have, often 1 and N-1: the model then alternates a batch of one,
its least efficient call, with one large batch, and that small call also absorbs all the
event loop's work of answering the large one. Halves keep every call at N/2 and spread
that work evenly. It applies only when requests were already waiting as the previous batch
finished and each half would hold at least ``MIN_HALF`` images; otherwise everything queued
is taken at once, as policy ``greedy`` always does. Measured in docs/performance.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


class QueueFull(Exception):
    """The model's queue is at its limit; the caller should answer 503 with Retry-After."""


@dataclass
class Result:
    embedding: np.ndarray  # (D,)
    probs: np.ndarray  # (C,)
    scores: np.ndarray  # (k,) cosine
    ids: np.ndarray  # (k,) item ids, -1 past the end
    batch_size: int
    infer_seconds: float


@dataclass
class _Request:
    image: np.ndarray
    k: int
    future: asyncio.Future[Result]


BatchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
BATCH_POLICIES = ("balanced", "greedy")


# Halves smaller than this are not worth it: a model call has a fixed cost of about one
# image's compute (ResNet50 128 px here: ~10 ms + ~14 ms per image), so splitting 4 requests
# into 2 + 2 measured 10 % slower than the 1 + 3 that greedy batching settles into.
MIN_HALF = 8


def batch_limit(policy: str, max_batch: int, load: int, waited: bool) -> int:
    """How many queued requests the next batch may take.

    ``load``: the previous batch's size plus the requests queued while it ran; ``waited``:
    the queue was empty when the previous batch finished (the model went idle).
    """
    half = -(-load // 2)  # ceil(load / 2)
    if policy == "greedy" or waited or half < MIN_HALF:
        return max_batch
    return min(max_batch, half)


class MicroBatcher:
    """Collects requests for one model and runs them in batches.

    ``run_batch(images, k)`` -> (embeddings, probs, scores, ids) for the whole batch.
    """

    def __init__(
        self,
        run_batch: BatchFn,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        max_queue: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "model",
        thread_init: Callable[[], None] | None = None,
        policy: str = "balanced",
    ) -> None:
        if policy not in BATCH_POLICIES:
            raise ValueError(f"unknown batch policy {policy!r}; choose one of {', '.join(BATCH_POLICIES)}")
        self._run_batch = run_batch
        self.policy = policy
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Request] | None = None
        self._task: asyncio.Task[None] | None = None
        # One thread per model: TensorFlow calls for a model are serialised, models run in parallel.
        # ``thread_init`` runs in that thread: per-thread settings (FAISS's OpenMP thread count) belong there.
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"imgsim-infer-{name}", initializer=thread_init
        )

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def full(self) -> bool:
        return self._queue is not None and self._queue.full()

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._queue is not None:
            while not self._queue.empty():
                req = self._queue.get_nowait()
                if not req.future.done():
                    req.future.set_exception(QueueFull("service is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, image: np.ndarray, k: int) -> Result:
        if self._queue is None:
            raise RuntimeError("batcher not started")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Request(image, k, future))
        except asyncio.QueueFull:
            raise QueueFull(f"queue full ({self.max_queue} images waiting)") from None
        return await future

    async def _collect(self, last_batch: int) -> list[_Request]:
        assert self._queue is not None
        waited = self._queue.empty()
        limit = batch_limit(self.policy, self.max_batch, last_batch + self._queue.qsize(), waited)
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < limit:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [r for r in batch if not r.future.cancelled()]

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        last = 0
        while True:
            batch = await self._collect(last)
            last = len(batch)
            if not batch:
                continue
            images = np.stack([r.image for r in batch])
            k = max(r.k for r in batch)
            start = time.perf_counter()
            try:
                emb, probs, scores, ids = await loop.run_in_executor(self._executor, self._run_batch, images, k)
            except Exception as exc:  # every waiting request learns what went wrong
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            took = time.perf_counter() - start
            if self._on_batch is not None:
                self._on_batch(len(batch), took)
            for i, r in enumerate(batch):
                if not r.future.done():
                    r.future.set_result(Result(emb[i], probs[i], scores[i, : r.k], ids[i, : r.k], len(batch), took))
