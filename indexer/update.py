"""Changing an existing index: append image files, remove items by id. Ids never change."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.faiss_index import HNSW_TYPES, l2_normalise, new_faiss_index
from indexer.items_table import delete_items, insert_items, set_file_stats, set_skipped, upgrade_items_table
from indexer.store import IndexStore, write_index_files
from indexer.vector_file import VECTORS_FILE, put_rows
from indexer.versions import new_version
from models.data import Item, SkipCounter
from models.embed import stream_forward
from models.encoders import ImageEncoder, open_encoder
from models.errors import BadInput, NotFound
from models.manifests import now_utc

# An HNSW graph keeps deleted items (filtered out of searches) until they exceed this share of
# it; then the next removal rebuilds it from the live vectors. Searches stay exact about what
# they return either way; the share only bounds wasted memory and graph walking.
COMPACT_SHARE = 0.2


@dataclass
class NewItem:
    """An embedded item, ready to be added: its row (without an id) and its vector."""

    key: str
    source: str
    sha256: str
    vector: np.ndarray
    label: int = -1
    label_name: str | None = None
    split: str = "added"
    width: int | None = None
    height: int | None = None
    image: bytes | None = None
    file_size: int | None = None
    mtime_ns: int | None = None
    meta: str | None = None

    def row(self, item_id: int, added: str) -> tuple:
        return (item_id, self.key, self.source, self.label, self.label_name, self.split, self.sha256, self.width,
                self.height, self.image, self.file_size, self.mtime_ns, added, self.meta)  # fmt: skip


@dataclass
class Changes:
    """What one write did: new ids in the order of the items given, ids removed, the new count."""

    added: list[int] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)  # sha256 -> the id already holding it
    removed: list[int] = field(default_factory=list)
    count: int = 0


def apply_changes(
    index_dir: Path,
    add: Sequence[NewItem] = (),
    remove: Sequence[int] = (),
    lock_timeout: float = 0.0,
    dedupe: bool = True,
    stats: dict[int, tuple[int, int]] | None = None,
    skipped: tuple[str, list[tuple], list[str]] | None = None,
) -> Changes:
    """Remove ids and add items in one new version of the index: all of it or none of it.

    ``dedupe``: an item whose bytes are already indexed is not added (the existing id is
    reported); sync turns it off, as its items are files, each at its own path. ``stats``:
    id -> (size, mtime_ns) to record for unchanged files that were touched. ``skipped``:
    (source, unreadable files to record, keys to forget), see :func:`indexer.store.set_skipped`.

    The one write path of `imgsim index add/remove/sync` and of the service. Decisions that
    depend on the index (which ids exist, which bytes are already indexed, the next id) are
    taken under the index's lock, on the version being written, so concurrent writers
    cannot lose each other's changes.
    """
    out = Changes()
    with new_version(index_dir, copy_current=True, lock_timeout=lock_timeout) as tmp:
        store = IndexStore.open(tmp)
        try:
            upgrade_items_table(store.db)
            m = store.manifest
            present = set(store.rows(remove))
            if unknown := sorted({int(i) for i in remove} - present):
                raise NotFound(f"unknown ids: {', '.join(map(str, unknown[:10]))}{' ...' if len(unknown) > 10 else ''}")
            out.removed = sorted(present)
            _remove(store, out.removed)
            known = store.existing_hash_ids([a.sha256 for a in add]) if dedupe else {}
            fresh: list[NewItem] = []
            for item in add:
                if item.sha256 in known:
                    out.duplicates[item.sha256] = known[item.sha256]
                else:
                    if dedupe:
                        known[item.sha256] = m.next_id + len(fresh)
                    fresh.append(item)
            out.added = _add(store, tmp, fresh)
            set_file_stats(store.db, stats or {})
            if skipped:
                set_skipped(store.db, *skipped)
            store.db.commit()
            m.count = store.size
            m.updated = now_utc()
            out.count = m.count
            write_index_files(tmp, store.index, m)
        finally:
            store.close()
    return out


def _add(store: IndexStore, tmp: Path, fresh: list[NewItem]) -> list[int]:
    """Append items with the next ids (and, for a compressed index, their exact vectors)."""
    if not fresh:
        return []
    m = store.manifest
    ids = np.arange(m.next_id, m.next_id + len(fresh), dtype=np.int64)
    vectors = l2_normalise(np.stack([a.vector for a in fresh]))
    store.index.add_with_ids(vectors, ids)
    if store.vectors is not None:
        put_rows(tmp / VECTORS_FILE, ids, vectors, m.next_id + len(fresh))
    insert_items(store.db, [a.row(int(i), now_utc()) for a, i in zip(fresh, ids, strict=False)])
    m.next_id += len(fresh)
    return ids.tolist()


def _remove(store: IndexStore, ids: list[int]) -> None:
    """Flat and IVF indexes delete at once; an HNSW graph cannot, so its deleted items stay in
    the graph, filtered out of every search, until they are a share worth rebuilding for."""
    if not ids:
        return
    drop = np.array(ids, dtype=np.int64)
    m = store.manifest
    if m.index_type not in HNSW_TYPES:
        store.index.remove_ids(drop)
    elif len(dead := np.union1d(store.dead, drop)) <= COMPACT_SHARE * store.index.ntotal:
        store.set_dead(dead)
    else:  # compaction: a new graph of the live vectors
        live_ids, vecs = store.live_vectors()
        keep = ~np.isin(live_ids, drop)
        store.index = new_faiss_index(m.embedding_dim, m.index_type, m.index_params, vecs[keep])
        store.index.add_with_ids(vecs[keep], live_ids[keep])
        store.set_dead(np.zeros(0, np.int64))
    delete_items(store.db, ids)
    m.deleted = len(store.dead)


def _files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise NotFound(f"not found: {', '.join(missing[:5])}")
    return files


def _embed_files(
    embedder: ImageEncoder, files: list[Path], tta: str, progress: bool
) -> tuple[list[Path], np.ndarray, int]:
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


@dataclass
class AddReport:
    added: int
    duplicates: int
    skipped: int
    count: int


def add_images(
    index_dir: Path, paths: Sequence[Path], label: str | None = None, progress: bool = True, lock_timeout: float = 0.0
) -> AddReport:
    """Embed image files and append them; exact duplicates (same bytes) are skipped."""
    with closing(IndexStore.open(index_dir)) as store:
        manifest = store.manifest
        encoder = open_encoder(manifest.model.path)
        store.check(encoder.identity)
        class_names = manifest.dataset.class_names
        if label is not None and label not in class_names:
            raise BadInput(f"unknown label {label!r}; the index's classes are: {', '.join(class_names)}")
        files = _files(paths)
        hashes = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
        known = store.existing_hash_ids(list(set(hashes.values())))
    fresh = {h: f for f, h in reversed(hashes.items()) if h not in known}  # the first file of equal ones
    if not fresh:
        return AddReport(0, len(files), 0, manifest.count)
    read, vectors, skipped = _embed_files(encoder, sorted(fresh.values()), manifest.tta, progress)
    label_id = class_names.index(label) if label is not None else -1
    items = []
    for f, vector in zip(read, vectors, strict=False):
        with Image.open(f) as img:
            w, h = img.size
        st = f.stat()
        items.append(NewItem(f.name, str(f.resolve()), hashes[f], vector, label_id, label, width=w, height=h,
                             file_size=st.st_size, mtime_ns=st.st_mtime_ns))  # fmt: skip
    changes = apply_changes(index_dir, add=items, lock_timeout=lock_timeout) if items else Changes(count=manifest.count)
    return AddReport(len(changes.added), len(files) - len(changes.added) - skipped, skipped, changes.count)


def remove_ids(index_dir: Path, ids: Sequence[int], lock_timeout: float = 0.0) -> Changes:
    """Remove items by id; unknown ids are refused, other ids never change."""
    return apply_changes(index_dir, remove=ids, lock_timeout=lock_timeout)


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
