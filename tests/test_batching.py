"""Micro-batching: how a saturated model's work is split into batches and streams."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from app.batching import MicroBatcher, batch_limit
from models.errors import Busy


def test_batch_limit() -> None:
    assert batch_limit(32, 1, 0, 16) == 16  # one stream: everything queued
    assert batch_limit(32, 1, 0, 100) == 32  # never above max_batch
    assert batch_limit(32, 2, 8, 8) == 8  # two streams: a fair share of the work in flight and queued
    assert batch_limit(32, 2, 8, 9) == 9
    assert batch_limit(32, 2, 0, 100) == 16  # each stream's part of max_batch
    assert batch_limit(32, 2, 30, 10) == 2  # the room the other call leaves
    assert batch_limit(32, 2, 0, 1) == 1


# The fake model's cost: per call plus per image, large against a thread's wake-up delay on a busy machine.
CALL_S, IMAGE_S = 0.015, 0.006


def _closed_loop(
    clients: int, rounds: int, streams: int = 1, max_batch: int = 32, peak: list[int] | None = None
) -> list[int]:
    """``clients`` callers that each send again as soon as they are answered; the batch sizes
    seen, in the order the calls started. ``peak`` gets the most images ever in flight at once."""
    sizes: list[int] = []
    running: list[int] = []
    lock = threading.Lock()

    def run_batch(images: np.ndarray, jobs: list) -> tuple[np.ndarray, np.ndarray, list, None]:
        n = len(images)
        with lock:
            sizes.append(n)
            running.append(n)
            if peak is not None:
                peak.append(sum(running))
        time.sleep(CALL_S + IMAGE_S * n)
        with lock:
            running.remove(n)
        return np.zeros((n, 4)), np.zeros((n, 2)), list(jobs), None

    async def main() -> None:
        batcher = MicroBatcher(run_batch, max_batch=max_batch, streams=streams)
        batcher.start()

        async def client(i: int) -> None:
            await asyncio.sleep(0.001 * (i > 0))  # the first request arrives alone, as it does in practice
            for _ in range(rounds):
                await batcher.submit(np.zeros((2, 2, 3), np.uint8))

        await asyncio.gather(*(client(i) for i in range(clients)))
        await batcher.stop()

    asyncio.run(main())
    return sizes


def test_one_stream_takes_everything_queued() -> None:
    sizes = _closed_loop(16, 6)
    assert sizes[:2] == [1, 15] and sum(sizes) == 16 * 6


def test_two_streams_settle_into_two_concurrent_halves() -> None:
    peak: list[int] = []
    sizes = _closed_loop(16, 12, streams=2, peak=peak)
    assert sum(sizes) == 16 * 12
    middle = sizes[4:-4]
    # Steady state: halves of 8. A thread woken late on a busy machine splits a round (4 + 4)
    # and the next few settle again (seen in CI and in full runs here: 17 of 22 halves), so most
    # rounds, not every one, must be halves, and rounds stay large (all 1s would be no batching).
    assert middle.count(8) >= 0.6 * len(middle) and sum(middle) >= 6 * len(middle), sizes
    assert max(peak[4:-4]) == 16  # both halves run at once


def test_two_streams_lone_requests_never_wait() -> None:
    start = time.perf_counter()
    sizes = _closed_loop(1, 20, streams=2)
    assert sizes == [1] * 20
    assert time.perf_counter() - start < 20 * (CALL_S + IMAGE_S) * 1.5  # a lone request waits for no batch


def test_two_streams_share_the_max_batch_budget() -> None:
    peak: list[int] = []
    sizes = _closed_loop(40, 4, streams=2, max_batch=8, peak=peak)
    assert sum(sizes) == 40 * 4 and max(peak) == 8  # never more than max_batch images in flight
    assert max(sizes) <= 8


def test_streams_must_be_positive() -> None:
    with pytest.raises(ValueError, match="streams must be at least 1"):
        MicroBatcher(lambda images, jobs: None, streams=0)  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize("streams", [1, 2])
def test_queue_time_limit_answers_503_instead_of_running_late(streams: int) -> None:
    """With max_queue_ms, no request starts its model call after waiting longer than that: it
    gets Busy (503) instead, so an answered request takes at most the limit plus one call."""
    call_s, limit_ms = 0.05, 30.0
    ran: list[int] = []  # images per model call

    def run_batch(images: np.ndarray, jobs: list) -> tuple[np.ndarray, np.ndarray, list, None]:
        n = len(images)
        ran.append(n)
        time.sleep(call_s)
        return np.zeros((n, 4)), np.zeros((n, 2)), list(jobs), None

    async def main() -> tuple[list[float], int]:
        # One image per call: 12 requests at once need 12 x 50 ms / streams, far past 30 ms.
        batcher = MicroBatcher(run_batch, max_batch=streams, streams=streams, max_queue_ms=limit_ms)
        batcher.start()

        async def one() -> float | None:
            t = time.perf_counter()
            try:
                await batcher.submit(np.zeros((2, 2, 3), np.uint8))
            except Busy as exc:
                assert "in the queue (limit 30 ms)" in str(exc)
                return None
            return time.perf_counter() - t

        out = await asyncio.gather(*(one() for _ in range(12)))
        await batcher.stop()
        return [x for x in out if x is not None], out.count(None)

    answered, refused = asyncio.run(main())
    assert answered and refused  # some ran, the rest were refused rather than kept waiting
    assert len(answered) == sum(ran) <= 2 * streams  # the first wave, and those that started within the limit
    assert max(answered) < limit_ms / 1000 + call_s + 0.04  # the limit plus one call (+ scheduling slack)


def test_result_reports_the_time_queued_and_in_the_call() -> None:
    """What the Server-Timing header's queue and infer parts come from."""

    def run_batch(images: np.ndarray, jobs: list) -> tuple[np.ndarray, np.ndarray, list, None]:
        time.sleep(0.0305)
        n = len(images)
        return np.zeros((n, 4)), np.zeros((n, 2)), list(jobs), None

    async def main() -> list:
        batcher = MicroBatcher(run_batch, streams=1)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(np.zeros((2, 2, 3), np.uint8)))
        await asyncio.sleep(0.0102)  # the first call is running: the second request waits for it
        results = [await batcher.submit(np.zeros((2, 2, 3), np.uint8)), await first]
        await batcher.stop()
        return results

    second, first = asyncio.run(main())
    assert first.queue_seconds < 0.01 and 0.0305 <= first.infer_seconds < 0.1
    assert 0.0305 - 0.0102 - 0.001 <= second.queue_seconds < 0.08
