"""Everything an index holds, out of it: vectors and item rows in one .npz file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from indexer.faiss_index import l2_normalise
from indexer.store import IndexStore
from models.errors import BadInput

COLUMNS = ("key", "source", "label_name", "split", "sha256", "width", "height", "file_size", "added", "meta")


def export_index(index_dir: Path, out: Path) -> int:
    """Write ``out`` (.npz: ids, vectors, one array per item column); the number of items."""
    if Path(out).suffix != ".npz":
        raise BadInput(f"export writes .npz files; got {out}")
    store = IndexStore.open(index_dir)
    try:
        ids, vectors = store.live_vectors()
        order = np.argsort(ids)
        ids, vectors = ids[order], l2_normalise(vectors[order])
        rows = {int(i): store.item(int(i)) for i in ids}
        columns = {c: np.array([str(rows[int(i)].get(c) or "") for i in ids]) for c in COLUMNS}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, ids=ids, vectors=vectors, **columns)  # type: ignore[arg-type]  # numpy's stub: **arrays vs allow_pickle
        return len(ids)
    finally:
        store.close()
