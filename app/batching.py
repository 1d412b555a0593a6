"""Micro-batching: concurrent requests for one model share a single model call.

Requests put their decoded image (and an opaque ``job``: what else the model's worker should
do with it, e.g. searches) on a queue and await a future. Each of ``streams`` worker tasks
per model takes queued requests and runs the batch function for the whole batch in its own
thread (TensorFlow and FAISS release the GIL, so the event loop stays free), then resolves
each request's future. A lone request runs at once; batches form while the model is busy.
The batcher only schedules: what a batch runs is the caller's (app.registry.LoadedModel).

Two streams (the default) let two model calls share TensorFlow's thread pool: one call's
small ops leave cores idle that the other call's ops fill (docs/performance.md, D3). A
free worker starts at once when no other call is running; while one is, waiting costs
nothing (the running call has the cores), so the worker waits until a fair share of the
work (in flight and queued, split between the streams) is queued, or until that call
ends. Without that wait, the first free worker would take whatever is queued and the
streams would settle into one large and one tiny batch. Each call takes at most
``max_batch / streams`` images, so at most ``max_batch`` are in flight.

With ``max_queue_ms`` set, a request still queued after that long is refused (Busy, 503)
when a worker reaches it instead of being run late: an answered request then waited at
most that long before its model call started.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.errors import Busy


@dataclass
class Result:
    embedding: np.ndarray  # (D,)
    probs: np.ndarray  # (C,)
    answer: Any  # what the batch function answered for this request's job (e.g. its searches' hits)
    batch_size: int
    infer_seconds: float  # the model call this request rode in: hand-off, forward pass, searches, hand-back
    queue_seconds: float = 0.0  # from submit to the start of that call
    context: Any = None  # what the batch function returned for the whole batch, e.g. its index version


@dataclass
class _Request:
    image: np.ndarray
    job: Any
    future: asyncio.Future[Result]
    queued_at: float  # time.perf_counter(): uvloop's loop.time() ticks in whole milliseconds


# (images, each request's job) -> (embeddings, probs, each request's answer, context)
BatchFn = Callable[[np.ndarray, list[Any]], tuple[np.ndarray, np.ndarray, list[Any], Any]]


def batch_limit(max_batch: int, streams: int, in_flight: int, queued: int) -> int:
    """How many queued requests the next call may take: a fair share of the work in flight and
    queued, within its stream's part of ``max_batch`` and the room the other calls leave."""
    room = max(1, max_batch - in_flight)
    per_stream = -(-max_batch // streams)  # so that the streams' calls together fit max_batch
    return min(room, per_stream, max(1, -(-(in_flight + queued) // streams)))


class MicroBatcher:
    """Collects requests for one model and runs them in batches.

    ``run_batch(images, jobs)`` -> (embeddings, probs, answers, context) for the whole batch.
    """

    def __init__(
        self,
        run_batch: BatchFn,
        max_batch: int = 32,
        max_queue: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "model",
        thread_init: Callable[[], None] | None = None,
        streams: int = 2,
        max_queue_ms: float = 0.0,
    ) -> None:
        if streams < 1:
            raise ValueError(f"streams must be at least 1, got {streams}")
        self._run_batch = run_batch
        self.streams = streams
        self.max_batch = max_batch
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

    async def submit(self, image: np.ndarray, job: Any = None) -> Result:
        if self._changed is None:
            raise RuntimeError("batcher not started")
        if self.full:
            raise Busy(f"busy: queue full ({self.max_queue} images waiting); retry shortly")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._pending.append(_Request(image, job, future, time.perf_counter()))
        async with self._changed:
            self._changed.notify_all()
        return await future

    def _share(self) -> int:
        in_flight = sum(self._in_flight)
        return batch_limit(self.max_batch, self.streams, in_flight, len(self._pending))

    def _ready(self) -> bool:
        """May a free worker start a call now? (Called with the condition's lock held.)"""
        if not self._pending or sum(self._in_flight) >= self.max_batch:
            return False
        if not self._in_flight:
            return True  # the model is idle: never keep a request waiting
        # Another call is running and has the cores: wait for a fair share, or for it to end.
        return len(self._pending) >= self._share()

    def _take(self) -> list[_Request]:
        limit = self._share()
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

    async def _collect(self) -> list[_Request]:
        assert self._changed is not None
        async with self._changed:
            await self._changed.wait_for(self._ready)
            batch = self._take()
            self._in_flight.append(len(batch))
            return batch

    async def _finished(self, size: int) -> None:
        assert self._changed is not None
        async with self._changed:
            self._in_flight.remove(size)
            self._changed.notify_all()

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            try:
                if batch:
                    await self._run(loop, batch)
            finally:
                await self._finished(len(batch))

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        images = np.stack([r.image for r in batch])
        start = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executor, self._run_batch, images, [r.job for r in batch])
        except Exception as exc:  # every waiting request learns what went wrong
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(exc)
            return
        took = time.perf_counter() - start
        emb, probs, answers, context = out
        if self._on_batch is not None:
            self._on_batch(len(batch), took)
        for i, r in enumerate(batch):
            if not r.future.done():
                waited = start - r.queued_at
                r.future.set_result(Result(emb[i], probs[i], answers[i], len(batch), took, waited, context))
