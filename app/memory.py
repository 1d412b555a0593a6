"""Giving memory back: after loading, and after bursts of large uploads.

glibc's malloc keeps freed memory for reuse, and its mmap threshold rises to the largest
block freed (up to 32 MB), so once a few large images have come and gone their memory stays
with the process for good. Two measures, measured by ``benchmarks/worst_uploads.py``:

- Pillow allocates images in blocks of 64 MB instead of 16 MB: blocks over glibc's highest
  threshold are always mmapped, so a large image's memory goes back to the OS when it is freed.
- When the service has been idle for a moment after serving requests, ``malloc_trim``
  returns what the heaps still hold (TensorFlow's batch buffers, small images).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time

from PIL import Image

log = logging.getLogger("imgsim.app")
PILLOW_BLOCK_BYTES = 64 * 2**20


def use_large_image_blocks() -> None:
    Image.core.set_block_size(PILLOW_BLOCK_BYTES)  # what PILLOW_BLOCK_SIZE=64m does at import time


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


class RequestCounter:
    """Requests started and in flight, kept by the middleware for the idle trimmer."""

    def __init__(self) -> None:
        self.started = 0
        self.in_flight = 0


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
