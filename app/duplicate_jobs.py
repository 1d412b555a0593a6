"""Near-duplicates for the service: computed in the background, once per index version.

Finding near-duplicates costs a range search over the whole index and perceptual hashes of
the candidate pairs' images: seconds to minutes, far too much for a request thread that any
client can start. A request starts the computation (or finds it running, or finished) and
is answered at once: ``202`` with the progress while it runs, the groups once it is done.

One computation runs at a time, in a child process at the lowest CPU priority with one FAISS
thread and one decode at a time. A thread of the service was tried first (niced, one FAISS
thread): its Python work (pairs, hashes) took the GIL from the requests, and search p99 beside
it rose 1.66x with 8 clients (``benchmarks/worst_routes.py``); a process shares no GIL, and
its memory goes back to the OS when it ends. A few more computations may wait (then 503).
Results are kept per index version (a new version starts afresh), for the few most recent
parameter pairs, with the image hashes computed so far.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from app.memory import RequestCounter
from indexer.duplicates import Group, find_duplicates
from indexer.store import IndexStore
from models.data.budget import DECODES
from models.errors import Busy, ImgsimError

log = logging.getLogger("imgsim.app")
MAX_WAITING = 4  # computations queued or running; more get 503
KEEP_RESULTS = 8  # finished results kept per index version
MAX_PAIRS = 2_000_000  # about 100 MB of pairs: a threshold that pairs more is refused (raise it)


@dataclass
class Job:
    """One computation: its phase ('queued', 'pairs', 'hashing', 'done', 'failed') and progress."""

    phase: str = "queued"
    done: int = 0
    total: int = 0
    groups: list[Group] | None = None
    error: ImgsimError | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def progress(self, phase: str, done: int, total: int) -> None:
        self.phase, self.done, self.total = phase, done, total


def compute(
    out: Connection, index_version: str, threshold: float, hash_check: bool, hashes: dict[int, Any], max_pairs: int
) -> None:
    """The child process: every message is ('progress', phase, done, total), then ('done',
    groups, hashes) or ('error', the ImgsimError)."""
    import faiss

    os.nice(19)
    faiss.omp_set_num_threads(1)  # its range search would otherwise take every core
    DECODES.set_limit(1)
    try:
        store = IndexStore.open(Path(index_version))
        groups = find_duplicates(store, threshold, hash_check=hash_check, hash_cache=hashes, max_pairs=max_pairs,
                                 on_progress=lambda *p: out.send(("progress", *p)))  # fmt: skip
        out.send(("done", groups, hashes))
    except ImgsimError as exc:
        out.send(("error", exc))
    finally:
        out.close()


class DuplicateJobs:
    def __init__(self, requests: RequestCounter) -> None:
        self._requests = requests
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="imgsim-duplicates")
        self._results: WeakKeyDictionary[IndexStore, OrderedDict[tuple[float, bool], Job]] = WeakKeyDictionary()
        self._hashes: WeakKeyDictionary[IndexStore, dict[int, Any]] = WeakKeyDictionary()
        self._waiting = 0
        self._lock = threading.Lock()

    def get(self, store: IndexStore, threshold: float, hash_check: bool) -> Job:
        """The job for these parameters on this index version, started if new."""
        key = (threshold, hash_check)
        with self._lock:
            jobs = self._results.setdefault(store, OrderedDict())
            if key in jobs:
                jobs.move_to_end(key)
                return jobs[key]
            if self._waiting >= MAX_WAITING:
                raise Busy(f"busy: {self._waiting} near-duplicate searches are running or queued; retry shortly")
            job = jobs[key] = Job()
            while len(jobs) > KEEP_RESULTS:
                jobs.popitem(last=False)
            self._waiting += 1
        token = self._requests.enter()  # the version stays open until the job is done
        self._pool.submit(self._run, job, store, threshold, hash_check, token)
        return job

    def _run(self, job: Job, store: IndexStore, threshold: float, hash_check: bool, token: int) -> None:
        try:
            cache = self._hashes.setdefault(store, {})
            job.groups = self._in_child(job, str(store.path), threshold, hash_check, cache)
            job.phase = "done"
        except ImgsimError as exc:
            job.error, job.phase = exc, "failed"
        except Exception as exc:  # reported to the client (logged); the service goes on
            log.exception("near-duplicate search failed")
            job.error, job.phase = ImgsimError(f"near-duplicate search failed: {type(exc).__name__}"), "failed"
        finally:
            with self._lock:
                self._waiting -= 1
            job.finished.set()
            self._requests.exit(token)

    def _in_child(self, job: Job, version: str, threshold: float, hash_check: bool, cache: dict) -> list[Group]:
        ctx = multiprocessing.get_context("spawn")  # no copy of the service's threads and TensorFlow
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(
            target=compute, args=(send, version, threshold, hash_check, dict(cache), MAX_PAIRS), daemon=True
        )
        child.start()
        send.close()
        try:
            while True:
                try:
                    kind, *body = receive.recv()
                except EOFError:
                    raise ImgsimError(
                        f"near-duplicate search ended without an answer (exit {child.exitcode})"
                    ) from None
                if kind == "progress":
                    job.progress(*body)
                elif kind == "error":
                    raise body[0]
                else:
                    groups, hashes = body
                    cache.update(hashes)
                    return groups
        finally:
            receive.close()
            child.join(5)
            if child.is_alive():
                child.kill()

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
