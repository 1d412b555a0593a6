"""An index directory: FAISS inner-product index + SQLite item table + manifest.

Vectors are L2-normalised before they enter the index, so inner product = cosine.
Ids are ours (FAISS ``IndexIDMap2``), so they survive removals. Every write makes a new
version of the directory, published atomically (:mod:`indexer.versions`): an interrupted
build or update leaves the previous index intact.

Layout of INDEX_DIR::

    index.faiss     the FAISS index (flat, HNSW or IVF inside an id map; IVF-PQ)
    vectors.f16     ivfpq only: every exact vector as float16, memory-mapped (indexer.vector_file)
    items.sqlite    items(id, key, source, label, label_name, split, sha256, width, height, image)
    manifest.json   model identity, embedding layer/dim, metric, counts, dataset, index type
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.faiss_index import all_vectors, ivf_ids, l2_normalise
from indexer.items_table import ids_with_label
from indexer.vector_file import VECTORS_FILE, VectorFile, rerank
from indexer.versions import current_version
from models.errors import ImgsimError
from models.manifests import MANIFEST_FILE, IndexManifest, ModelIdentity, read_index_manifest, write_manifest

INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.sqlite"


@dataclass(frozen=True)
class ItemRow:
    id: int
    key: str
    source: str
    label: int
    label_name: str | None
    split: str | None
    sha256: str
    width: int | None
    height: int | None


class IndexStore:
    """An open index directory (read-mostly; writes go through :func:`writing`)."""

    def __init__(self, path: Path, index: faiss.Index, manifest: IndexManifest) -> None:
        self.path = Path(path)
        self.index = index  # None once released (FAISS is untyped: Any)
        self.manifest = manifest
        self._db = sqlite3.connect(self.path / ITEMS_FILE, check_same_thread=False)
        self._names: dict[int, tuple[str | None, str]] | None = None
        self.dead = np.zeros(0, np.int64)  # HNSW only: ids deleted from the items but not from the graph
        self._search_params: faiss.SearchParameters | None = None
        self.vectors: VectorFile | None = None  # ivfpq only
        if manifest.index_type == "ivfpq":
            try:
                self.vectors = VectorFile(self.path / VECTORS_FILE, manifest.next_id, manifest.embedding_dim)
            except (OSError, ValueError) as exc:
                self._db.close()
                raise ImgsimError(f"index {self.path}: its vector file cannot be read ({exc}); rebuild it") from None

    # ----------------------------------------------------------------- loading
    @classmethod
    def open(cls, path: Path, expect_model: ModelIdentity | None = None, mmap: bool = False) -> IndexStore:
        """Open and cross-check manifest, FAISS index and item table (and the model, if given).

        ``mmap``: a compressed (ivfpq) index is memory-mapped read-only instead of read into
        RAM, so processes serving the same index share one copy in the page cache.
        """
        path = current_version(path)  # one version: a swap while we read does not mix two
        for name in (INDEX_FILE, ITEMS_FILE, MANIFEST_FILE):
            if not (path / name).is_file():
                raise ImgsimError(f"{path} is not an index directory ({name} missing); build one with `imgsim index`")
        manifest = read_index_manifest(path)
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap and manifest.index_type == "ivfpq" else 0
        index = faiss.read_index(str(path / INDEX_FILE), flags)
        store = cls(path, index, manifest)
        try:
            if manifest.deleted:
                store.set_dead(np.setdiff1d(faiss.vector_to_array(index.id_map), store.ids()))
            store.check(expect_model)
        except BaseException:
            store.close()
            raise
        return store

    def check(self, expect_model: ModelIdentity | None = None) -> None:
        m = self.manifest
        rows = self.count()
        problems = []
        if self.index.d != m.embedding_dim:
            problems.append(f"FAISS dimension {self.index.d} != manifest {m.embedding_dim}")
        if self.index.ntotal != m.count + m.deleted or rows != m.count or len(self.dead) != m.deleted:
            deleted = f" (deleted in the graph: {len(self.dead)}, manifest {m.deleted})" if m.deleted else ""
            problems.append(
                f"counts differ: FAISS {self.index.ntotal}, items table {rows}, manifest {m.count}{deleted}"
            )
        if expect_model is not None:
            problems += m.model.mismatches(expect_model)
        if problems:
            raise ImgsimError(f"index {self.path} does not match: " + "; ".join(problems))

    def close(self) -> None:
        self._db.close()
        if self.vectors is not None:
            self.vectors.close()

    def release(self) -> None:
        """Close it and free its FAISS index now, not when the last reference goes: the
        service's replaced versions (which a stray reference could keep in memory)."""
        self.close()
        self.index = None  # released: no method may be called after this
        self._names = None

    def set_dead(self, ids: np.ndarray) -> None:
        """Deletions an HNSW graph still holds: every search filters them out (an id selector)."""
        self.dead = np.asarray(ids, dtype=np.int64)
        if not len(self.dead):
            self._search_params = None
            return
        batch = faiss.IDSelectorBatch(self.dead)
        params = faiss.SearchParameters(sel=faiss.IDSelectorNot(batch))
        params._keep = batch  # the SWIG wrappers do not keep the selector they point to alive
        self._search_params = params

    # ----------------------------------------------------------------- reading
    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def ids(self) -> np.ndarray:
        return np.fromiter((r[0] for r in self._db.execute("SELECT id FROM items")), dtype=np.int64)

    @property
    def size(self) -> int:
        """Items the index answers with (an HNSW graph may hold deleted ones too)."""
        return int(self.index.ntotal) - len(self.dead)

    def search(
        self, vectors: np.ndarray, k: int, params: faiss.SearchParameters | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k nearest items by cosine; ids are -1 past the end.

        A compressed index ranks ``rerank`` times k candidates by their codes, then the best
        k of them by their exact vectors (``rerank`` 0: the codes' approximate scores).
        """
        k = min(k, max(1, self.size))
        queries = l2_normalise(vectors)
        factor = self.manifest.index_params.get("rerank", 0) if self.vectors is not None else 0
        if not factor:
            return self.index.search(queries, k, params=params or self._search_params)
        _, candidates = self.index.search(queries, min(k * factor, self.size), params=params)
        assert self.vectors is not None, "ivfpq indexes have their vector file"
        return rerank(self.vectors, queries, candidates, k)

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of existing ids (from the vector file of a compressed index)."""
        if self.vectors is not None:
            return self.vectors.get(ids)
        return np.stack([self.index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.index.d))

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every item, without the deleted ones an HNSW graph still holds."""
        if self.vectors is not None:
            ids = np.sort(ivf_ids(self.index))
            return ids, self.vectors.get(ids)
        ids, vectors = all_vectors(self.index)
        if len(self.dead):
            keep = ~np.isin(ids, self.dead)
            ids, vectors = ids[keep], vectors[keep]
        return ids, vectors

    def rows(self, ids: Sequence[int]) -> dict[int, ItemRow]:
        wanted = [int(i) for i in ids if i >= 0]
        out: dict[int, ItemRow] = {}
        for chunk in range(0, len(wanted), 900):  # SQLite's host-parameter limit
            part = wanted[chunk : chunk + 900]
            q = ",".join("?" * len(part))
            for r in self._db.execute(
                f"SELECT id, key, source, label, label_name, split, sha256, width, height FROM items WHERE id IN ({q})",
                part,
            ):
                out[r[0]] = ItemRow(*r)
        return out

    def labels(self, ids: np.ndarray) -> np.ndarray:
        """Labels for an array of ids (any shape); -1 for missing ids."""
        flat = ids.ravel()
        rows = self.rows(np.unique(flat[flat >= 0]).tolist())
        lookup = np.array([rows[i].label if i in rows else -1 for i in flat.tolist()], dtype=np.int64)
        return lookup.reshape(ids.shape)

    def ids_with_label(self, label: str) -> np.ndarray:
        return ids_with_label(self._db, label)

    @property
    def db(self) -> sqlite3.Connection:
        """The item table, for the writer (indexer.update) of a version being made."""
        return self._db

    def labels_and_keys(self, ids: Sequence[int]) -> list[tuple[str | None, str]]:
        """(label name, key) of ids from an in-memory map loaded on first use.

        For the service's hot path: a read-only store answers from memory instead of a
        SQLite query per request. Writers use a fresh store, so the map never goes stale.
        """
        if self._names is None:
            self._names = {r[0]: (r[1], r[2]) for r in self._db.execute("SELECT id, label_name, key FROM items")}
        return [self._names.get(int(i), (None, "")) for i in ids]

    def label_names(self, ids: Sequence[int]) -> list[str | None]:
        return [name for name, _ in self.labels_and_keys(ids)]

    def label_counts(self, n_classes: int) -> np.ndarray:
        """Indexed items per label (the R in AP@k)."""
        counts = np.zeros(n_classes, dtype=np.int64)
        for label, n in self._db.execute("SELECT label, COUNT(*) FROM items WHERE label >= 0 GROUP BY label"):
            if label < n_classes:
                counts[label] = n
        return counts

    def image_bytes(self, item_id: int) -> tuple[ItemRow, bytes | None]:
        """The stored image bytes (None when the item is served from its source path)."""
        r = self._db.execute(
            "SELECT id, key, source, label, label_name, split, sha256, width, height, image FROM items WHERE id = ?",
            (int(item_id),),
        ).fetchone()
        if r is None:
            raise KeyError(item_id)
        return ItemRow(*r[:9]), r[9]

    def item(self, item_id: int) -> dict[str, Any]:
        """Every column of one item but its image bytes (KeyError when there is none)."""
        cur = self._db.execute("SELECT * FROM items WHERE id = ?", (int(item_id),))
        row = cur.fetchone()
        if row is None:
            raise KeyError(item_id)
        return {d[0]: v for d, v in zip(cur.description, row, strict=False) if d[0] != "image"}

    def vector(self, item_id: int) -> np.ndarray:
        """The stored (normalised) vector of an item, with no forward pass."""
        if int(item_id) in self.dead:
            raise KeyError(item_id)
        if self.vectors is not None:
            if self._db.execute("SELECT 1 FROM items WHERE id = ?", (int(item_id),)).fetchone() is None:
                raise KeyError(item_id)
            return self.vectors.get(np.array([item_id]))[0]
        try:
            return self.index.reconstruct(int(item_id))
        except RuntimeError:
            raise KeyError(item_id) from None

    def existing_hash_ids(self, hashes: Sequence[str]) -> dict[str, int]:
        """sha256 -> the (lowest) id of an item with exactly those bytes, for the hashes indexed."""
        found: dict[str, int] = {}
        unique = sorted(set(hashes))
        for chunk in range(0, len(unique), 900):  # SQLite's host-parameter limit
            part = unique[chunk : chunk + 900]
            q = ",".join("?" * len(part))
            sql = f"SELECT sha256, MIN(id) FROM items WHERE sha256 IN ({q}) GROUP BY sha256"
            found.update(dict(self._db.execute(sql, part)))
        return found


def write_index_files(directory: Path, index: faiss.Index, manifest: IndexManifest) -> None:
    faiss.write_index(index, str(directory / INDEX_FILE))
    write_manifest(directory, manifest)
