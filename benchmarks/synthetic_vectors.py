"""Millions of embedding-like vectors made from real embeddings, generated in seeded chunks.

How: the real vectors of an index (e.g. ResNet50 embeddings of CIFAR-10's training split)
are the cluster centres. A synthetic vector is a random centre plus noise drawn from the
real vectors' own covariance (their top principal components), scaled so that a synthetic
vector is as close to its centre as a real vector is to its nearest real neighbour (median
cosine), then L2-normalised. The noise so has the real data's shape (it varies along the
directions the real embeddings vary along), not an isotropic ball, and each centre gets a
cloud of near neighbours the way a real collection has many similar photos.

Chunk ``i`` is always the same (its own seed), so a 10M set is never held in memory: it is
regenerated chunk by chunk for building, for exact search and for re-ranking.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHUNK = 100_000
COMPONENTS = 256  # principal components of the real vectors the noise is drawn from


@dataclass(frozen=True)
class VectorSource:
    """The recipe for the synthetic vectors: centres, noise basis and scale, seed."""

    centres: np.ndarray  # (c, d) unit vectors
    basis: np.ndarray  # (COMPONENTS, d): principal directions times their standard deviation
    scale: float
    seed: int

    @property
    def dim(self) -> int:
        return int(self.centres.shape[1])

    def chunk(self, i: int, n: int = CHUNK) -> np.ndarray:
        """Chunk ``i`` (``n`` unit float32 vectors); the same on every call."""
        rng = np.random.default_rng((self.seed, i))
        z = rng.standard_normal((n, len(self.basis)), dtype=np.float32)
        x = self.centres[rng.integers(0, len(self.centres), n)] + self.scale * (z @ self.basis)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunks(self, total: int, first: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, vectors) for rows [0, total) in chunks; chunk numbers start at ``first``."""
        for start in range(0, total, CHUNK):
            yield start, self.chunk(first + start // CHUNK, min(CHUNK, total - start))

    def queries(self, n: int) -> np.ndarray:
        """Query vectors from the same distribution but a chunk no database row uses."""
        return self.chunk(10**9, n)


def source_from_real(real: np.ndarray, seed: int = 0) -> VectorSource:
    """Fit centres, noise basis and scale to real (unit) embeddings."""
    real = np.ascontiguousarray(real, dtype=np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    centred = real - real.mean(axis=0)
    _, s, vt = np.linalg.svd(centred[:20_000], full_matrices=False)
    k = min(COMPONENTS, len(s))
    basis = (vt[:k] * (s[:k, None] / np.sqrt(min(len(real), 20_000)))).astype(np.float32)
    target = _nearest_neighbour_cosine(real)
    probe = VectorSource(real, basis, 1.0, seed)
    scale = _fit_scale(probe, target)
    return VectorSource(real, basis, scale, seed)


def _nearest_neighbour_cosine(real: np.ndarray, sample: int = 2_000) -> float:
    """Median cosine between a real vector and its nearest other real vector."""
    x = real[np.random.default_rng(0).choice(len(real), min(sample, len(real)), replace=False)]
    sims = x @ real.T
    sims[sims > 0.99999] = -1.0  # the vector itself (and exact duplicates)
    return float(np.median(sims.max(axis=1)))


def _fit_scale(probe: VectorSource, target: float) -> float:
    """Noise scale at which the median cosine of a synthetic vector to its centre is ``target``."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2_000, len(probe.basis)), dtype=np.float32) @ probe.basis
    c = probe.centres[rng.integers(0, len(probe.centres), 2_000)]
    lo, hi = 0.0, 10.0
    for _ in range(40):  # bisection: the cosine falls as the scale grows
        mid = (lo + hi) / 2
        x = c + mid * z
        cos = np.median(np.sum(x * c, axis=1) / np.linalg.norm(x, axis=1))
        lo, hi = (mid, hi) if cos > target else (lo, mid)
    return (lo + hi) / 2


def source_from_index(index_dir: Path, seed: int = 0) -> VectorSource:
    """A source fitted to the vectors of an existing imgsim index."""
    from contextlib import closing

    from indexer.store import IndexStore

    with closing(IndexStore.open(index_dir)) as store:
        _, vectors = store.live_vectors()
    return source_from_real(vectors, seed)
