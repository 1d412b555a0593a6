"""Changing an existing index: append image files, remove items by id. Ids never change."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.store import (
    HNSW_TYPES,
    IndexStore,
    all_vectors,
    insert_items,
    l2_normalise,
    new_faiss_index,
    write_index_files,
    writing,
)
from models.data import Item, SkipCounter
from models.embed import stream_forward
from models.errors import BadInput, NotFound
from models.inference import Embedder, load_trained
from models.manifests import model_identity, now_utc


@dataclass
class AddReport:
    added: int
    duplicates: int
    skipped: int
    count: int


@dataclass
class RemoveReport:
    removed: int
    count: int


def _files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise NotFound(f"not found: {', '.join(missing[:5])}")
    return files


def _embed_files(embedder: Embedder, files: list[Path], tta: str, progress: bool) -> tuple[list[Path], np.ndarray, int]:
    """(files that could be read, their embeddings, how many were skipped)."""
    folder = _FileList(files)
    skipped = SkipCounter()
    keys: list[str] = []
    chunks = []
    for batch_items, (emb, _) in stream_forward(
        lambda b: embedder.embed(b, tta),
        folder,
        folder.items,
        embedder.input_size,
        32,
        skipped,
        progress,
        desc="adding",
    ):
        keys += [i.key for i in batch_items]
        chunks.append(emb)
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    return [Path(k) for k in keys], vectors, skipped.total


def add_images(index_dir: Path, paths: Sequence[Path], label: str | None = None, progress: bool = True) -> AddReport:
    """Embed image files and append them; exact duplicates (same bytes) are skipped."""
    with closing(IndexStore.open(index_dir)) as store:
        manifest = store.manifest.model_copy(deep=True)
        trained = load_trained(Path(manifest.model.path))
        store.check(model_identity(trained.path, trained.manifest))
        class_names = manifest.dataset.class_names
        if label is not None and label not in class_names:
            raise BadInput(f"unknown label {label!r}; the index's classes are: {', '.join(class_names)}")
        files = _files(paths)
        hashes = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
        known = store.existing_hashes(list(set(hashes.values())))
    fresh: dict[str, Path] = {}
    for f, h in hashes.items():
        if h not in known and h not in fresh:
            fresh[h] = f
    duplicates = len(files) - len(fresh)
    if not fresh:
        return AddReport(0, duplicates, 0, manifest.count)
    read, vectors, skipped = _embed_files(Embedder(trained), list(fresh.values()), manifest.tta, progress)
    label_id = class_names.index(label) if label is not None else -1
    rows = []
    for item_id, f in enumerate(read, start=manifest.next_id):
        with Image.open(f) as img:
            w, h = img.size
        rows.append((item_id, f.name, str(f.resolve()), label_id, label, "added", hashes[f], w, h, None))
    if rows:
        with writing(index_dir, copy_from=index_dir) as tmp:
            updated = IndexStore.open(tmp)
            updated.index.add_with_ids(l2_normalise(vectors), np.array([r[0] for r in rows], dtype=np.int64))
            insert_items(updated._db, rows)
            updated._db.commit()
            manifest.count += len(rows)
            manifest.next_id += len(rows)
            manifest.updated = now_utc()
            updated.close()
            write_index_files(tmp, updated.index, manifest)
    return AddReport(len(rows), duplicates, skipped, manifest.count)


def remove_ids(index_dir: Path, ids: Sequence[int]) -> RemoveReport:
    """Remove items by id; unknown ids are refused, other ids never change."""
    with closing(IndexStore.open(index_dir)) as store:
        manifest = store.manifest.model_copy(deep=True)
        present = set(store.rows(ids))
    unknown = sorted(set(int(i) for i in ids) - present)
    if unknown:
        raise NotFound(f"unknown ids: {', '.join(map(str, unknown[:10]))}{' ...' if len(unknown) > 10 else ''}")
    drop = np.array(sorted(present), dtype=np.int64)
    with writing(index_dir, copy_from=index_dir) as tmp:
        updated = IndexStore.open(tmp)
        if manifest.index_type in HNSW_TYPES:  # HNSW graphs cannot delete: rebuild from the stored vectors
            all_ids, vecs = all_vectors(updated.index)
            keep = ~np.isin(all_ids, drop)
            updated.index = new_faiss_index(
                manifest.embedding_dim, manifest.index_type, manifest.index_params, vecs[keep]
            )
            updated.index.add_with_ids(vecs[keep], all_ids[keep])
        else:
            updated.index.remove_ids(drop)
        updated._db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in drop])
        updated._db.commit()
        manifest.count -= len(drop)
        manifest.updated = now_utc()
        updated.close()
        write_index_files(tmp, updated.index, manifest)
    return RemoveReport(len(present), manifest.count)


class _FileList:
    """A minimal dataset over loose files, so added images go through the same pipeline."""

    def __init__(self, files: list[Path]) -> None:
        self.items = [Item(str(f), 0, "added") for f in files]
        self.spec = "files"

    def iter_raw(self, items: Sequence[Item]):
        for item in items:
            try:
                yield item, Path(item.key).read_bytes()
            except OSError:
                yield item, None
