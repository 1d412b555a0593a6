"""Micro-batching: concurrent requests for one model share a single model call.

Requests put their decoded image on a bounded asyncio queue and await a future. Each of
``streams`` worker tasks per model takes queued requests (up to ``max_batch`` images in
flight in all; optionally waiting ``max_wait_ms`` for more), runs the forward pass and the
FAISS search for the whole batch in its own thread (TensorFlow and FAISS release the GIL,
so the event loop stays free), then resolves each request's future. With
``max_wait_ms=0`` a lone request runs at once, and batches form while the model is busy.

Two streams (the default) let two model calls share TensorFlow's thread pool: on this
2-core machine two concurrent batches of 8 of ResNet50 ran at 1.01-1.07 of one batch of
32's throughput, one batch of 8 at 0.91-0.98 (docs/performance.md), because one call's
small ops leave cores idle that the other call's ops fill. A free worker starts at once when no
other call is running (a lone request never waits); while one is, waiting costs nothing
(the running call has the cores), so the worker waits until a balanced share of the work
(in flight and queued, split between the streams) is queued, or until that call ends.
Each call takes at most ``max_batch / streams`` images, so at most ``max_batch`` are in
flight and a full queue implies the same latency as with one stream.

With ``max_queue_ms`` set, a request still queued after that long is refused (Busy, 503)
when a worker reaches it instead of being run late: an answered request then waited at most
that long before its model call started.

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
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from models.errors import Busy


@dataclass
class Result:
    embedding: np.ndarray  # (D,)
    probs: np.ndarray  # (C,)
    scores: np.ndarray  # (k,) cosine
    ids: np.ndarray  # (k,) item ids, -1 past the end
    batch_size: int
    infer_seconds: float  # the model call this request rode in: hand-off, forward pass, search, hand-back
    queue_seconds: float = 0.0  # from submit to the start of that call


@dataclass
class _Request:
    image: np.ndarray
    k: int
    future: asyncio.Future[Result]
    queued_at: float  # time.perf_counter(): uvloop's loop.time() ticks in whole milliseconds


BatchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
BATCH_POLICIES = ("balanced", "greedy")


# One stream only: halves smaller than this are not worth it: a model call has a fixed cost of about one
# image's compute (ResNet50 128 px here: ~10 ms + ~14 ms per image), so splitting 4 requests
# into 2 + 2 measured 10 % slower than the 1 + 3 that greedy batching settles into.
MIN_HALF = 8


def batch_limit(policy: str, max_batch: int, load: int, waited: bool, streams: int = 1, in_flight: int = 0) -> int:
    """How many queued requests the next batch may take.

    ``load``: the images in flight plus those queued (one stream: the previous batch's size
    plus the requests queued while it ran); ``waited``: one stream only, the queue was empty
    when the previous batch finished (the model went idle); ``in_flight``: images in the
    other streams' running calls, which share the ``max_batch`` budget.
    """
    room = max(1, max_batch - in_flight)
    if streams > 1:
        per_stream = -(-max_batch // streams)  # so that the streams' calls together fit max_batch
        return room if policy == "greedy" else min(room, per_stream, -(-load // streams))
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
        streams: int = 2,
        max_queue_ms: float = 0.0,
    ) -> None:
        if policy not in BATCH_POLICIES:
            raise ValueError(f"unknown batch policy {policy!r}; choose one of {', '.join(BATCH_POLICIES)}")
        if streams < 1:
            raise ValueError(f"streams must be at least 1, got {streams}")
        self._run_batch = run_batch
        self.policy = policy
        self.streams = streams
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        # A request still queued after this long gets 503 instead of a model call (0 = no limit):
        # the latency of an answered request is then at most this plus one model call.
        self.max_queue_wait = max_queue_ms / 1000.0
        self._on_batch = on_batch
        self._pending: deque[_Request] = deque()
        self._in_flight: list[int] = []  # sizes of the running calls
        self._changed: asyncio.Condition | None = None  # a request queued or a call ended
        self._tasks: list[asyncio.Task[None]] = []
        # One thread per stream: TensorFlow and FAISS run there, the event loop stays free.
        # ``thread_init`` runs in each: per-thread settings (FAISS's OpenMP thread count) belong there.
        self._executor = ThreadPoolExecutor(
            max_workers=streams, thread_name_prefix=f"imgsim-infer-{name}", initializer=thread_init
        )

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.max_queue

    def start(self) -> None:
        self._changed = asyncio.Condition()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker()) for _ in range(self.streams)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._pending:
            req = self._pending.popleft()
            if not req.future.done():
                req.future.set_exception(Busy("busy: the service is shutting down; retry shortly"))
        self._executor.shutdown(wait=True)

    async def submit(self, image: np.ndarray, k: int) -> Result:
        if self._changed is None:
            raise RuntimeError("batcher not started")
        if self.full:
            raise Busy(f"busy: queue full ({self.max_queue} images waiting); retry shortly")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._pending.append(_Request(image, k, future, time.perf_counter()))
        async with self._changed:
            self._changed.notify_all()
        return await future

    def _share(self) -> int:
        """A balanced batch: the work in flight and queued, split evenly between the streams."""
        in_flight = sum(self._in_flight)
        return batch_limit(self.policy, self.max_batch, in_flight + len(self._pending), False, self.streams, in_flight)

    def _ready(self) -> bool:
        """May a free worker start a call now? (Called with the condition's lock held.)"""
        if not self._pending or sum(self._in_flight) >= self.max_batch:
            return False
        if not self._in_flight or self.policy == "greedy":
            return True  # the model is idle: never keep a request waiting
        # Another call is running and has the cores: wait for a balanced share, or for it to end.
        return len(self._pending) >= self._share()

    def _take(self, waited: bool, last: int) -> list[_Request]:
        if self.streams > 1:
            limit = self._share()
        else:
            limit = batch_limit(self.policy, self.max_batch, last + len(self._pending), waited)
        now = time.perf_counter()
        batch: list[_Request] = []
        while self._pending and len(batch) < limit:
            r = self._pending.popleft()
            if r.future.cancelled():
                continue
            waited = now - r.queued_at
            if 0 < self.max_queue_wait < waited:  # FIFO: the oldest come first, so the batch fills with fresh ones
                limit_ms = self.max_queue_wait * 1000
                r.future.set_exception(
                    Busy(f"busy: waited {waited * 1000:.0f} ms in the queue (limit {limit_ms:.0f} ms); retry shortly")
                )
                continue
            batch.append(r)
        return batch

    async def _collect(self, last: int) -> list[_Request]:
        assert self._changed is not None
        async with self._changed:
            waited = not self._pending
            await self._changed.wait_for(self._ready)
            if self.max_wait > 0 and len(self._pending) < self.max_batch:
                # Optional extra wait for a fuller batch (IMGSIM_MAX_WAIT_MS).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: len(self._pending) >= self.max_batch), self.max_wait
                    )
            batch = self._take(waited, last)
            self._in_flight.append(len(batch))
            return batch

    async def _finished(self, size: int) -> None:
        assert self._changed is not None
        async with self._changed:
            self._in_flight.remove(size)
            self._changed.notify_all()

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        last = 0
        while True:
            batch = await self._collect(last)
            try:
                if batch:
                    await self._run(loop, batch)
            finally:
                await self._finished(len(batch))
            last = len(batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        images = np.stack([r.image for r in batch])
        k = max(r.k for r in batch)
        start = time.perf_counter()
        try:
            emb, probs, scores, ids = await loop.run_in_executor(self._executor, self._run_batch, images, k)
        except Exception as exc:  # every waiting request learns what went wrong
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(exc)
            return
        took = time.perf_counter() - start
        if self._on_batch is not None:
            self._on_batch(len(batch), took)
        for i, r in enumerate(batch):
            if not r.future.done():
                waited = start - r.queued_at
                r.future.set_result(Result(emb[i], probs[i], scores[i, : r.k], ids[i, : r.k], len(batch), took, waited))
