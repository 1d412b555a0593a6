"""Searches with conditions: only items with a label, a cosine cut-off, an item left out.

A label filter runs inside FAISS (an id selector), so it finds k such items when k exist
even though most of the collection has other labels. A graph index (HNSW) can miss them
when few items qualify (its walk is cut short), and so can an IVF index probing only some
of its lists; when the filtered search returns fewer than it should, the qualifying
vectors are compared exactly, one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from indexer.faiss_index import l2_normalise
from indexer.store import IndexStore


@dataclass(frozen=True)
class Hit:
    id: int
    score: float


def _exact(store: IndexStore, query: np.ndarray, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    vectors = l2_normalise(store.vectors_of(allowed))
    scores = vectors @ query
    order = np.argsort(-scores)[:k]
    return scores[order], allowed[order]


def _filtered(store: IndexStore, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One FAISS search of every query restricted to ``allowed``; rows the approximate index
    left short are compared exactly."""
    sel = faiss.IDSelectorBatch(allowed)
    base = getattr(store.index, "index", store.index)
    if isinstance(base, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=sel, nprobe=base.nprobe)
    else:
        params = faiss.SearchParameters(sel=sel)
    want = min(k, len(allowed))
    scores, ids = store.search(queries, want, params=params)
    for row in np.flatnonzero((ids >= 0).sum(axis=1) < want):  # the approximate index lost some
        scores[row, :want], ids[row, :want] = _exact(store, queries[row], allowed, want)
    return scores, ids


@dataclass(frozen=True)
class SearchSpec:
    """One search: the k nearest items that meet the conditions (maybe fewer)."""

    k: int
    label: str | None = None  # only items with this label name
    min_score: float | None = None  # only items at least this close (cosine)
    exclude: int | None = None  # leave this item out (more like this)


def _hits(scores: np.ndarray, ids: np.ndarray, q: SearchSpec) -> list[Hit]:
    hits = [Hit(int(i), float(s)) for s, i in zip(scores, ids, strict=True) if i >= 0 and i != q.exclude]
    return [h for h in hits if q.min_score is None or h.score >= q.min_score][: q.k]


def search_batch(store: IndexStore, vectors: np.ndarray, queries: Sequence[SearchSpec]) -> list[list[Hit]]:
    """The hits of each query (row i of ``vectors`` with ``queries[i]``), best first.

    One FAISS search per label among the queries (all unfiltered queries together), for the
    largest k of the group: the service runs a whole batch's searches at once."""
    vectors = l2_normalise(np.asarray(vectors, dtype=np.float32).reshape(len(queries), -1))
    out: list[list[Hit]] = [[] for _ in queries]
    for label in dict.fromkeys(q.label for q in queries):
        rows = [n for n, q in enumerate(queries) if q.label == label]
        want = max(queries[n].k + (queries[n].exclude is not None) for n in rows)
        if label is None:
            scores, ids = store.search(vectors[rows], want)
        else:
            allowed = store.ids_with_label(label)
            if not len(allowed):
                continue  # an unknown label: no hits
            scores, ids = _filtered(store, vectors[rows], want, allowed)
        for r, n in enumerate(rows):
            out[n] = _hits(scores[r], ids[r], queries[n])
    return out


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
    return search_batch(store, np.asarray(vector).reshape(1, -1), [SearchSpec(k, label, min_score, exclude)])[0]
