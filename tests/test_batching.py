"""Micro-batching policy: how a saturated model's work is split into batches."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from app.batching import MIN_HALF, MicroBatcher, batch_limit


def test_batch_limit() -> None:
    assert batch_limit("greedy", 32, 16, waited=False) == 32
    assert batch_limit("balanced", 32, 16, waited=False) == 8  # halves of the work in flight
    assert batch_limit("balanced", 32, 17, waited=False) == 9
    assert batch_limit("balanced", 32, 100, waited=False) == 32  # never above max_batch
    assert batch_limit("balanced", 32, 16, waited=True) == 32  # after an idle moment: take all
    assert batch_limit("balanced", 32, 2 * MIN_HALF - 2, waited=False) == 32  # halves too small to pay


def _closed_loop(policy: str, clients: int, rounds: int) -> list[int]:
    """``clients`` callers that each send again as soon as they are answered; the batch sizes seen."""
    sizes: list[int] = []

    def run_batch(images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        sizes.append(len(images))
        time.sleep(0.005 + 0.002 * len(images))  # a fixed cost per call plus a cost per image
        n = len(images)
        return np.zeros((n, 4)), np.zeros((n, 2)), np.zeros((n, k)), np.zeros((n, k), dtype=np.int64)

    async def main() -> None:
        batcher = MicroBatcher(run_batch, max_batch=32, policy=policy)
        batcher.start()

        async def client(i: int) -> None:
            await asyncio.sleep(0.001 * (i > 0))  # the first request arrives alone, as it does in practice
            for _ in range(rounds):
                await batcher.submit(np.zeros((2, 2, 3), np.uint8), 1)

        await asyncio.gather(*(client(i) for i in range(clients)))
        await batcher.stop()

    asyncio.run(main())
    return sizes


def test_greedy_keeps_the_lopsided_split_of_the_first_batches() -> None:
    sizes = _closed_loop("greedy", 16, 6)
    assert sizes[:2] == [1, 15] and set(sizes[2:]) == {1, 15}


def test_balanced_settles_into_two_equal_halves() -> None:
    sizes = _closed_loop("balanced", 16, 6)
    assert sizes[0] == 1 and sum(sizes) == 16 * 6
    assert sizes[2:-2] == [8] * len(sizes[2:-2]), sizes


def test_balanced_leaves_small_loads_alone() -> None:
    assert _closed_loop("balanced", 4, 5) == _closed_loop("greedy", 4, 5)


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown batch policy 'fifo'"):
        MicroBatcher(lambda images, k: None, policy="fifo")  # type: ignore[arg-type,return-value]
