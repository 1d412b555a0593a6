"""The loaded models, their indexes and batchers, and which one is active."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np

from app.batching import MicroBatcher
from app.config import ModelPair, ServiceSettings
from indexer.query import Hit, SearchSpec, search_batch
from indexer.store import IndexStore
from indexer.update import Changes, NewItem, apply_changes
from indexer.versions import current_version
from models.encoders import ImageEncoder, open_encoder
from models.errors import BadInput, Busy, NotFound, NotReady
from models.manifests import ModelIdentity, ModelManifest

log = logging.getLogger("imgsim.app")


@dataclass
class LoadedModel:
    name: str
    embedder: ImageEncoder
    store: IndexStore
    batcher: MicroBatcher
    index_dir: Path
    identity: ModelIdentity
    # Called with a replaced version's release; the app waits for its requests (app.memory).
    retire: Callable[[Callable[[], None]], None] | None = None

    @property
    def manifest(self) -> ModelManifest:
        return self.embedder.manifest

    def run_batch(
        self, images: np.ndarray, jobs: list[Sequence[SearchSpec] | None]
    ) -> tuple[np.ndarray, np.ndarray, list[list[list[Hit]]], IndexStore]:
        """One forward pass for a whole batch, then the searches its requests asked for (each
        request's job: its queries), at most one FAISS search per label (runs in the model's
        thread). A batch of embed-only requests searches nothing.

        The store is read once: the batch, and the answers built from it, use one index version
        even if a newer one is swapped in meanwhile.
        """
        store = self.store
        emb, probs = self.embedder.embed(images, store.manifest.tta)
        asked = [(n, q) for n, job in enumerate(jobs) for q in job or ()]
        hits = search_batch(store, emb[[n for n, _ in asked]], [q for _, q in asked]) if asked else []
        answers: list[list[list[Hit]]] = [[] for _ in jobs]
        for (n, _), found in zip(asked, hits, strict=True):
            answers[n].append(found)
        return emb, probs, answers, store

    def reload_if_changed(self) -> bool:
        """Swap in the index's current version if it is not the one loaded (runs in a thread).

        The new version is opened and checked completely before one reference assignment
        makes it the store: requests never see a half-loaded index. The old one is released
        once the last request that may use it has finished (``retire``).
        """
        if current_version(self.index_dir) == self.store.path:
            return False
        fresh = IndexStore.open(self.index_dir, expect_model=self.identity, mmap=True)
        fresh.labels_and_keys([])  # load the label map now, not in the first request
        old, self.store = self.store, fresh
        if self.retire is not None:
            self.retire(old.release)
        log.info("model %s: index %s is now version %s (%d items)", self.name, self.index_dir, fresh.path.name,
                 fresh.size)  # fmt: skip
        return True


class Cluster(Protocol):
    """Where the replicas of one service meet (Ray Serve: :class:`app.ray_serve.RayCluster`):
    one writer for every change of an index, one active model for all."""

    def write(self, index_dir: Path, add: Sequence[NewItem], remove: Sequence[int], lock_timeout: float) -> Changes: ...

    def active(self) -> str | None: ...

    def set_active(self, name: str) -> None: ...


ACTIVE_POLL_SECONDS = 0.5  # replicas: how often the shared active model is read


def _set_faiss_threads(n: int) -> None:
    """OpenMP's thread count is per calling thread: set it in the thread that searches.

    Set only in the event loop's thread, it left the inference thread at one OpenMP thread
    per core, whose spinning after each search slowed the next forward pass (D2).
    """
    import faiss

    faiss.omp_set_num_threads(n)


def detect_device() -> str:
    """'GPU:0 (name)' when TensorFlow sees a GPU, else 'CPU'."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return f"GPU ({', '.join(g.name for g in gpus)})"
    return "CPU"


def _shorten(text: str, limit: int = 64) -> str:
    """A user-given name as echoed in an error: never at any length."""
    return text if len(text) <= limit else text[:limit] + "..."


class ModelRegistry:
    """Name -> LoadedModel, plus the active name.

    Switching is one reference assignment under a lock: a request resolves its model
    once, at its start, and keeps that object, so in-flight requests finish on the model
    they started with while later ones see the new active model.
    """

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.models: dict[str, LoadedModel] = {}
        self._active: str | None = None
        self._lock = threading.Lock()
        self.device = "unknown"
        self._watcher: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self.on_batch = None  # set by the app: (model name, batch size, seconds) -> None
        self.cluster: Cluster | None = None  # set by the app when it runs as one of several replicas
        self.retire: Callable[[Callable[[], None]], None] | None = None  # set by the app (RequestCounter.retire)

    def load(self, pair: ModelPair) -> LoadedModel:
        embedder = open_encoder(pair.model, runtime=self.settings.runtime, settings=self.settings)
        name = pair.name or embedder.name
        if name in self.models:
            raise BadInput(f"two models are named {name!r}; give them distinct names")
        identity = embedder.identity
        store = IndexStore.open(pair.index, expect_model=identity, mmap=True)
        size = embedder.input_size
        embedder(np.zeros((1, size, size, 3), np.uint8))  # trace the graph before the first request

        def on_batch(n: int, seconds: float, name: str = name) -> None:
            if self.on_batch is not None:
                self.on_batch(name, n, seconds)

        s = self.settings
        loaded = LoadedModel(name, embedder, store, None, pair.index, identity, self.retire)  # type: ignore[arg-type]  # the batcher is made next: it needs loaded.run_batch
        loaded.batcher = MicroBatcher(
            loaded.run_batch,
            s.max_batch_size,
            s.max_queue,
            on_batch,
            name,
            thread_init=partial(_set_faiss_threads, s.faiss_threads),
            streams=s.model_streams,
            max_queue_ms=s.max_queue_ms,
        )
        self.models[name] = loaded
        if self._active is None:
            self._active = name
        log.info(
            "loaded model %s (%s, %d px, runtime %s) with %d indexed images",
            name,
            embedder.manifest.backbone,
            size,
            embedder.runtime,
            store.count(),
        )
        return loaded

    @property
    def active(self) -> str:
        if self._active is None:
            raise NotReady("no model loaded")
        return self._active

    def get(self, name: str | None) -> LoadedModel:
        """The named model, or the active one; NotFound names the loaded ones."""
        with self._lock:
            key = name or self._active
            if key is None:
                raise NotReady("no model loaded")
            if key not in self.models:
                known = ", ".join(sorted(self.models))
                if key == "ensemble":
                    raise NotFound(f"model 'ensemble' only classifies (POST /v1/classify); name one of: {known}")
                raise NotFound(f"unknown model {_shorten(key)!r}; loaded: {known}")
            return self.models[key]

    def set_active(self, name: str) -> None:
        self._active = self.get(name).name
        if self.cluster is not None:
            self.cluster.set_active(self._active)

    def write(self, index_dir: Path, add: Sequence[NewItem], remove: Sequence[int], lock_timeout: float) -> Changes:
        """Change an index: here, or through the cluster's one writer (blocking: run in a thread)."""
        try:
            if self.cluster is not None:
                return self.cluster.write(index_dir, add, remove, lock_timeout)
            return apply_changes(index_dir, add, remove, lock_timeout)
        except Busy:  # its message names the index directory and the writer's pid: not for clients
            raise Busy("the index is being changed by another writer; try again when it has finished") from None

    def start(self) -> None:
        for m in self.models.values():
            m.batcher.start()
        loop = asyncio.get_running_loop()
        if self.settings.reload_seconds > 0:
            self._watcher = loop.create_task(self._watch())
        if self.cluster is not None:
            self._follower = loop.create_task(self._follow_active())

    async def _follow_active(self) -> None:
        """Replicas: adopt the active model another replica switched to."""
        cluster = self.cluster
        assert cluster is not None, "started only with a cluster"
        while True:
            try:
                name = await asyncio.to_thread(cluster.active)
                if name is None and self._active is not None:
                    await asyncio.to_thread(cluster.set_active, self._active)
                elif name in self.models:
                    self._active = name
            except Exception as exc:  # noqa: BLE001 - keep serving with the active model we have
                log.warning("cannot read the shared active model: %s", exc)
            await asyncio.sleep(ACTIVE_POLL_SECONDS)

    async def reload(self) -> dict[str, str]:
        """Swap in every index's current version; model name -> the version now served."""
        for m in self.models.values():
            await asyncio.to_thread(m.reload_if_changed)
        return {name: m.store.path.name for name, m in self.models.items()}

    async def _watch(self) -> None:
        """Follow the indexes: a sync or rebuild publishes a new version, this swaps it in."""
        while True:
            await asyncio.sleep(self.settings.reload_seconds)
            try:
                await self.reload()
            except Exception as exc:  # noqa: BLE001 - keep serving the version we have
                log.warning("index reload failed, still serving the loaded version: %s", exc)

    async def stop(self) -> None:
        for task in (self._watcher, self._follower):
            if task is not None:
                task.cancel()
        for m in self.models.values():
            await m.batcher.stop()
            m.store.close()
