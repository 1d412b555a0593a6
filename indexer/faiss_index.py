"""The FAISS side of an index: an index of each type, every vector read back, unit-length rows.

Flat and HNSW indexes sit inside an ``IndexIDMap2`` so they take our item ids; IVF keeps ids
itself. Everything about items, versions and manifests is in :mod:`indexer.store`.
"""

from __future__ import annotations

import faiss
import numpy as np

from models.encoders.registry import l2_normalise  # noqa: F401 - re-exported: the index's unit-length rows
from models.errors import ImgsimError

INDEX_TYPES = ("flat", "hnsw", "hnsw-fp16", "ivf", "ivfpq")
TRAIN_PER_LIST = 64  # training vectors per IVF list (FAISS uses at most 256; more costs time, not recall)
HNSW_TYPES = ("hnsw", "hnsw-fp16")  # graphs that cannot delete: deletions are filtered until compaction


def new_faiss_index(dim: int, index_type: str, params: dict[str, int], train_vectors: np.ndarray) -> faiss.Index:
    """An inner-product index taking our ids (IVF is trained on ``train_vectors``).

    Flat and HNSW sit inside an ``IndexIDMap2``; IVF stores ids itself (an id map on top of
    IVF would break on removal, as IVF does not renumber its internal ids).
    """
    if index_type == "flat":
        base = faiss.IndexFlatIP(dim)
    elif index_type in HNSW_TYPES:
        m = params.get("hnsw_m", 32)
        if index_type == "hnsw":
            base = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        else:
            # Vectors stored as float16: half the memory, and a search right after a forward pass
            # (caches evicted) reads half the bytes from memory (docs/performance.md, D8).
            base = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = params.get("ef_construction", 80)
        base.hnsw.efSearch = params.get("ef_search", 64)
    elif index_type == "ivf":
        nlist = min(params.get("nlist", 256), max(1, len(train_vectors) // 39))  # FAISS wants ~39 points per list
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        base.train(train_vectors)
        base.nprobe = min(params.get("nprobe", 16), nlist)
        base.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct(id) and remove_ids by our ids
        return base
    elif index_type == "ivfpq":
        return _ivfpq(dim, params, train_vectors)
    else:
        raise ImgsimError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    return faiss.IndexIDMap2(base)


def ivfpq_key(dim: int, params: dict[str, int]) -> str:
    """The FAISS factory string of a compressed index (see :mod:`indexer.index_plan`)."""
    nlist, pq = params.get("nlist", 1024), params.get("pq_m", 64)
    if dim % pq:
        raise ImgsimError(f"pq_m={pq} must divide the embedding dimension {dim}")
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 1000 else f"IVF{nlist}"
    return f"{coarse},PQ{pq}x8"


def _ivfpq(dim: int, params: dict[str, int], train_vectors: np.ndarray) -> faiss.Index:
    """IVF-PQ storing our ids; no direct map (a hash map of every id would cost more RAM than
    the codes): item vectors come from the float16 vector file instead."""
    index = faiss.index_factory(dim, ivfpq_key(dim, params), faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if len(train_vectors) < max(ivf.nlist, 256):
        raise ImgsimError(
            f"an ivfpq index ({ivf.nlist} lists, 256 codes per sub-vector) needs at least "
            f"{max(ivf.nlist, 256)} vectors to train on, not {len(train_vectors)}: use flat or hnsw"
        )
    sample = np.random.default_rng(0).permutation(len(train_vectors))[: max(TRAIN_PER_LIST * ivf.nlist, 10_000)]
    ivf.cp.min_points_per_centroid = ivf.pq.cp.min_points_per_centroid = 1  # small collections: no warnings
    index.train(train_vectors[np.sort(sample)])
    ivf.nprobe = min(params.get("nprobe", 64), ivf.nlist)
    return index


def ivf_ids(index: faiss.Index) -> np.ndarray:
    """Every id stored in an IVF index (inside a transform or not)."""
    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    parts = [faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).copy() for i in range(ivf.nlist) if inv.list_size(i)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def all_vectors(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of everything stored in a flat, HNSW or IVF-flat index (ivfpq: see the store)."""
    if isinstance(index, faiss.IndexIVF):
        ids = ivf_ids(index)
        return ids, np.stack([index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, index.d), "f4")
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    if len(ids) == 0:
        return ids, np.zeros((0, index.d), np.float32)
    return ids, index.index.reconstruct_n(0, index.ntotal)
