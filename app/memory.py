"""Giving memory back: after loading, and after bursts of large uploads.

glibc's malloc keeps freed memory for reuse, and its mmap threshold rises to the largest
block freed (up to 32 MB), so once a few large images have come and gone their memory stays
with the process for good. Two measures, measured by ``benchmarks/worst_uploads.py``:

- Pillow allocates images in blocks of 64 MB instead of 16 MB: blocks over glibc's highest
  threshold are always mmapped, so a large image's memory goes back to the OS when it is freed.
- A replaced index version is closed as soon as no request can still use it (RequestCounter).
- When the service has been idle for a moment after serving requests, ``malloc_trim``
  returns what the heaps still hold (TensorFlow's batch buffers, small images).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import threading
import time
from collections.abc import Callable

from PIL import Image

log = logging.getLogger("imgsim.app")
PILLOW_BLOCK_BYTES = 64 * 2**20


def use_large_image_blocks() -> None:
    Image.core.set_block_size(PILLOW_BLOCK_BYTES)  # what PILLOW_BLOCK_SIZE=64m does at import time


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RequestCounter:
    """Requests started and in flight (kept by the middleware), and replaced index versions
    waiting for the requests that may still use them.

    An index version replaced by a live write is released (its FAISS index and item table
    closed) once every request that started before the swap has ended: later requests read
    the new version. Waiting for Python's garbage collector instead left dozens of replaced
    versions in memory after a burst of adds (a stored exception, a finished future or a
    reference cycle is enough to keep one alive).
    Background work on a version (near-duplicates) holds a token like a request.
    """

    def __init__(self) -> None:
        self.started = 0
        self._open: dict[int, float] = {}  # token -> when it started (time.monotonic)
        self._next = 0
        self._retired: list[tuple[float, Callable[[], None]]] = []
        self._lock = threading.Lock()  # versions are retired from worker threads

    @property
    def in_flight(self) -> int:
        return len(self._open)

    def enter(self) -> int:
        with self._lock:
            self.started += 1
            self._next += 1
            self._open[self._next] = time.monotonic()
            return self._next

    def exit(self, token: int) -> None:
        with self._lock:
            self._open.pop(token, None)
        if self._retired:
            self.release_unused()

    def retire(self, release: Callable[[], None]) -> None:
        """Call ``release`` once the requests in flight now have all ended (at once if none)."""
        with self._lock:
            self._retired.append((time.monotonic(), release))
        self.release_unused()

    def release_unused(self) -> None:
        with self._lock:
            oldest = min(self._open.values(), default=float("inf"))
            due = [r for t, r in self._retired if t < oldest]
            self._retired = [(t, r) for t, r in self._retired if t >= oldest]
        for release in due:
            release()


async def trim_when_idle(requests: RequestCounter, seconds: float = 2.0) -> None:
    """Every ``seconds``: if requests were served since the last trim and none is running, trim."""
    seen = requests.started
    while True:
        await asyncio.sleep(seconds)
        if requests.started != seen and requests.in_flight == 0:
            seen = requests.started
            start = time.perf_counter()
            await asyncio.to_thread(release_free_memory)
            log.info("heap trimmed in %.0f ms", (time.perf_counter() - start) * 1000)
