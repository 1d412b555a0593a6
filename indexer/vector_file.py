"""Exact vectors of a compressed index, on disk as float16 and memory-mapped.

A compressed (IVF-PQ) index keeps only short codes in RAM; its search ranks candidates by
approximate scores. This file keeps every vector at half precision so that the top
candidates can be re-ranked exactly, and so that an item's vector (more like this, export,
a rebuild) is its real embedding rather than a PQ reconstruction.

Row ``i`` holds the vector of item id ``i`` (ids are handed out in increasing order, so the
file only grows; rows of deleted ids are never read). It is append-only and shared between
index versions by a hard link: a version reads only rows below its own ``next_id``, so a
writer appending rows for the next version (or a crash half-way through) never changes what
an older version reads. Being memory-mapped, every process serving the index shares one copy
in the page cache, and rows never touched are never read from disk.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

VECTORS_FILE = "vectors.f16"
DTYPE = np.float16


class VectorFile:
    """Read-only view of the first ``rows`` rows."""

    def __init__(self, path: Path, rows: int, dim: int) -> None:
        self.path = Path(path)
        self.dim = dim
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < rows * dim * 2:
            raise ValueError(f"{path}: {size} bytes, fewer than the {rows} rows of {dim} float16 the manifest needs")
        self._rows = np.memmap(self.path, DTYPE, "r", shape=(rows, dim)) if rows else np.zeros((0, dim), DTYPE)
        if (mm := getattr(self._rows, "_mmap", None)) is not None:
            # Re-ranking reads a few scattered rows: without this hint each row read from disk
            # brings the device's whole read-ahead window (often megabytes) with it.
            mm.madvise(mmap.MADV_RANDOM)

    def get(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows of these ids (any shape of ids; negative ids give zero rows)."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.ravel()
        out = np.zeros((len(flat), self.dim), np.float32)
        ok = (flat >= 0) & (flat < len(self._rows))
        out[ok] = self._rows[flat[ok]]
        return out.reshape(*ids.shape, self.dim)

    def close(self) -> None:
        mm = getattr(self._rows, "_mmap", None)
        self._rows = np.zeros((0, self.dim), DTYPE)
        if mm is not None:
            mm.close()


def put_rows(path: Path, ids: np.ndarray, vectors: np.ndarray, total_rows: int) -> None:
    """Write the rows of these ids into a file of ``total_rows`` rows (created or extended).

    Rows past ``total_rows`` (left by a crashed writer) are cut off; rows below the smallest
    id written are never touched, so a version reading the file meanwhile sees no change.
    """
    path = Path(path)
    data = np.asarray(vectors, dtype=DTYPE)
    with open(path, "r+b" if path.exists() else "w+b") as f:
        f.truncate(total_rows * data.shape[1] * 2)  # extends with zeros (sparse), or drops a crash's leftovers
    if len(ids):
        rows = np.memmap(path, DTYPE, "r+", shape=(total_rows, data.shape[1]))
        rows[np.asarray(ids, dtype=np.int64)] = data
        rows.flush()
        del rows
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def rerank(vector_file: VectorFile, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the k best candidates by exact cosine (queries are unit rows)."""
    vectors = vector_file.get(ids)
    scores = np.einsum("qcd,qd->qc", vectors, queries)
    scores[ids < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(scores, order, 1)
    found = np.take_along_axis(ids, order, 1)
    found[~np.isfinite(best)] = -1
    best[~np.isfinite(best)] = -1.0
    return best.astype(np.float32), found
