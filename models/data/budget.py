"""One budget for every image decode in a process: at most ``limit`` decodes at once.

A decode's memory is set by the image's pixels, not by its file size (a 0.5 MB PNG can
decode to 300 MB), so the service bounds how many run at once, whoever asked: uploads,
thumbnails, near-duplicates' hashes, a watched folder. Command-line runs leave it unlimited
(their own worker count bounds them).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class DecodeBudget:
    """A counting semaphore whose size can be set after import (the service's setting)."""

    def __init__(self, limit: int | None = None) -> None:
        self._limit = limit
        self._running = 0
        self._changed = threading.Condition()

    def set_limit(self, limit: int | None) -> None:
        """None: unlimited."""
        if limit is not None and limit < 1:
            raise ValueError(f"the decode limit must be at least 1, got {limit}")
        with self._changed:
            self._limit = limit
            self._changed.notify_all()

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one decode slot (waits while ``limit`` decodes run)."""
        with self._changed:
            self._changed.wait_for(lambda: self._limit is None or self._running < self._limit)
            self._running += 1
        try:
            yield
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify()


DECODES = DecodeBudget()  # the process's budget; the service sets it to IMGSIM_MAX_DECODES
