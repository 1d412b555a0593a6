"""Batched, pipelined embedding of dataset images.

Reading and decoding run in background threads (Pillow releases the GIL while it
decodes and resizes), so the next batch is ready while the model works on the
current one. The model call itself stays on the caller's thread.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from models.data import Item, SkipCounter, UnreadableImage, decode_image


class Payloads(Protocol):
    """What the embedding loops read images from: a Dataset, or a list of loose files."""

    def iter_raw(self, items: Sequence[Item]) -> Iterator[tuple[Item, bytes | np.ndarray | None]]: ...


T = TypeVar("T")

_DONE = object()


def prefetch(source: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Run ``source`` in a background thread, keeping up to ``depth`` results ready.

    Errors raised by the producer are re-raised in the consumer; closing the consumer
    early stops the producer.
    """
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(value: object) -> bool:
        """Queue ``value`` unless the consumer has gone (then False)."""
        while not stop.is_set():
            try:
                q.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for value in source:
                if not offer(value):
                    return
            offer(_DONE)
        except BaseException as exc:  # handed to the consumer
            offer(exc)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="imgsim-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value = q.get()
            if value is _DONE:
                return
            if isinstance(value, BaseException):
                raise value
            yield value  # type: ignore[misc]  # the queue holds T or the exception that ended the producer
    finally:
        stop.set()


def decoded_batches(
    dataset: Payloads,
    items: Sequence[Item],
    size: int,
    batch_size: int,
    skipped: SkipCounter,
    workers: int = 2,
) -> Iterator[tuple[list[Item], np.ndarray]]:
    """(items, uint8 batch) pairs; unreadable images are counted in ``skipped`` and left out."""

    def decode(pair: tuple[Item, bytes | np.ndarray | None]) -> tuple[Item, np.ndarray | str]:
        item, raw = pair
        if raw is None:
            return item, "missing"
        try:
            return item, decode_image(raw, size)
        except UnreadableImage as exc:
            return item, exc.reason

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgsim-decode") as pool:
        raw_iter = dataset.iter_raw(items)
        while True:
            chunk = [pair for _, pair in zip(range(batch_size), raw_iter, strict=False)]
            if not chunk:
                return
            good_items, arrays = [], []
            for item, result in pool.map(decode, chunk):
                if isinstance(result, str):
                    skipped.add(item, result)
                else:
                    good_items.append(item)
                    arrays.append(result)
            if arrays:
                yield good_items, np.stack(arrays)


@dataclass
class Embeddings:
    vectors: np.ndarray  # (N, D) float32
    keys: list[str]
    labels: np.ndarray  # (N,) int64
    splits: list[str]
    skipped: SkipCounter
    seconds: float
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return len(self.keys) / self.seconds if self.seconds > 0 else 0.0


def stream_forward(
    forward: Callable[[np.ndarray], T],
    dataset: Payloads,
    items: Sequence[Item],
    size: int,
    batch_size: int,
    skipped: SkipCounter,
    progress: bool = True,
    desc: str = "embedding",
) -> Iterator[tuple[list[Item], T]]:
    """(items, forward's output) per batch, decoding ahead of the model; a tqdm bar shows progress."""
    from tqdm.auto import tqdm

    with tqdm(total=len(items), unit="img", desc=desc, disable=not progress) as bar:
        for batch_items, batch in prefetch(decoded_batches(dataset, items, size, batch_size, skipped)):
            yield batch_items, forward(batch)
            bar.update(len(batch_items))
        bar.update(len(items) - bar.n)


def embed_items(
    forward: Callable[[np.ndarray], np.ndarray],
    dataset: Payloads,
    items: Sequence[Item],
    size: int,
    batch_size: int,
    progress: bool = True,
) -> Embeddings:
    """Run ``forward`` (uint8 batch -> vectors) over ``items`` with a pipelined input path."""
    skipped = SkipCounter()
    vectors: list[np.ndarray] = []
    done: list[Item] = []
    start = time.perf_counter()
    for batch_items, out in stream_forward(forward, dataset, items, size, batch_size, skipped, progress):
        vectors.append(np.asarray(out, dtype=np.float32))
        done.extend(batch_items)
    seconds = time.perf_counter() - start
    dim = vectors[0].shape[1] if vectors else 0
    return Embeddings(
        vectors=np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
        keys=[i.key for i in done],
        labels=np.array([i.label for i in done], dtype=np.int64),
        splits=[i.split for i in done],
        skipped=skipped,
        seconds=seconds,
    )


def save_embeddings(path: Path, emb: Embeddings, class_names: Sequence[str]) -> None:
    """Write an ``.npz`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npz")
    try:
        np.savez(
            tmp,
            vectors=emb.vectors,
            keys=np.array(emb.keys, dtype=str),
            labels=emb.labels,
            splits=np.array(emb.splits, dtype=str),
            class_names=np.array(list(class_names), dtype=str),
            meta=np.array(json.dumps(emb.meta)),
        )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_embeddings(path: Path) -> dict[str, object]:
    with np.load(path, allow_pickle=False) as f:
        out: dict[str, object] = {k: f[k] for k in f.files}
    out["meta"] = json.loads(str(out["meta"]))
    return out
