"""Searches with conditions: only items with a label, a cosine cut-off, an item left out.

A label filter runs inside FAISS (an id selector), so it finds k such items when k exist
even though most of the collection has other labels. A graph index (HNSW) can miss them
when few items qualify (its walk is cut short), and so can an IVF index probing only some
of its lists; when the filtered search returns fewer than it should, the qualifying
vectors are compared exactly, one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from indexer.faiss_index import l2_normalise
from indexer.store import IndexStore


@dataclass(frozen=True)
class Hit:
    id: int
    score: float


def ids_with_label(store: IndexStore, label: str) -> np.ndarray:
    """Ids of the items with this label name (an unknown label: none)."""
    rows = store._db.execute("SELECT id FROM items WHERE label_name = ?", (label,))
    return np.fromiter((r[0] for r in rows), dtype=np.int64)


def _exact(store: IndexStore, query: np.ndarray, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    vectors = l2_normalise(store.vectors_of(allowed))
    scores = vectors @ query[0]
    order = np.argsort(-scores)[:k]
    return scores[order][None], allowed[order][None]


def _filtered(store: IndexStore, query: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sel = faiss.IDSelectorBatch(allowed)
    base = getattr(store.index, "index", store.index)
    if isinstance(base, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=sel, nprobe=base.nprobe)
    else:
        params = faiss.SearchParameters(sel=sel)
    scores, ids = store.search(query, min(k, len(allowed)), params=params)
    if (ids[0] >= 0).sum() < min(k, len(allowed)):  # the approximate index lost some: compare exactly
        return _exact(store, query, allowed, k)
    return scores, ids


def search(
    store: IndexStore,
    vector: np.ndarray,
    k: int,
    *,
    label: str | None = None,
    min_score: float | None = None,
    exclude: int | None = None,
) -> list[Hit]:
    """The k nearest items to one vector that meet the conditions, best first (maybe fewer)."""
    query = l2_normalise(np.asarray(vector, dtype=np.float32).reshape(1, -1))
    want = k + (exclude is not None)
    if label is not None:
        allowed = ids_with_label(store, label)
        if not len(allowed):
            return []
        scores, ids = _filtered(store, query, want, allowed)
    else:
        scores, ids = store.search(query, want)
    hits = [Hit(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=False) if i >= 0 and i != exclude]
    if min_score is not None:
        hits = [h for h in hits if h.score >= min_score]
    return hits[:k]


def hits_from_result(scores: np.ndarray, ids: np.ndarray, k: int, min_score: float | None) -> list[Hit]:
    """The hits of an unfiltered search the micro-batcher already ran, with the cut-off applied."""
    hits = [Hit(int(i), float(s)) for s, i in zip(scores, ids, strict=False) if i >= 0]
    return [h for h in hits if min_score is None or h.score >= min_score][:k]
