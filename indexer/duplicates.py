"""Near-duplicates: groups of items whose embeddings are at least ``threshold`` apart in cosine.

Every pair above the threshold comes from an exact FAISS range search over the stored
vectors (in chunks, so memory stays bounded); groups are the connected components of
those pairs, so a resized copy of a recompressed copy joins its original's group.

With ``hash_check`` a pair below the threshold still counts when its cosine is at least
``HASH_FLOOR``, one image is among the other's ``BAND_NEIGHBOURS`` nearest, and the two
images' perceptual hashes (pHash, 64 bits) differ in at most ``HASH_BITS`` bits: the
embedding rules out look-alikes that a hash alone would pair, the hash confirms copies that
recompression or a resize moved too far in the embedding.
Hashes are computed from the items' images when needed (only for such pairs).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
from PIL import Image

from indexer.faiss_index import l2_normalise
from indexer.images import item_image_bytes
from indexer.store import IndexStore
from models.data.decode import decode_image, decode_thumbnail
from models.errors import BadInput, ImgsimError

if TYPE_CHECKING:
    import imagehash

DEFAULT_THRESHOLD = 0.9  # docs/collections.md: with the hash check, precision and recall >= 0.95 on five sets
HASH_FLOOR = 0.65  # with hash_check: no pair below this cosine, whatever the hashes say
HASH_BITS = 10  # with hash_check: pHash bits two copies may differ in (docs/collections.md)
HASH_SIZE = 64  # pixels the image is decoded to before hashing (pHash itself looks at 32 x 32)
BAND_NEIGHBOURS = 10  # with hash_check: an item's nearest below the threshold that are hash-checked
Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class Group:
    ids: list[int]
    pairs: list[tuple[int, int, float]] = field(default_factory=list)  # (id, id, cosine)
    keys: list[str] = field(default_factory=list)  # the items' paths, in the order of ids

    @property
    def max_score(self) -> float:
        return max(s for *_, s in self.pairs)


def _find(parent: dict[int, int], x: int) -> int:
    while parent.setdefault(x, x) != x:
        parent[x] = parent[parent[x]]  # path halving
        x = parent[x]
    return x


def _image_hash(store: IndexStore, item_id: int) -> imagehash.ImageHash | None:
    """pHash of an item's image; None when the image can no longer be read."""
    import imagehash  # with SciPy: loaded by the duplicates search only, not by every `imgsim` command

    try:
        pixels = decode_image(item_image_bytes(store, item_id), HASH_SIZE)
    except ImgsimError:
        return None
    return imagehash.phash(Image.fromarray(pixels))


def _hashes(
    store: IndexStore,
    ids: set[int],
    cache: MutableMapping[int, imagehash.ImageHash | None],
    progress: bool,
    on_progress: Progress | None = None,
) -> None:
    """Fill ``cache`` for ``ids`` (decoding runs in threads: Pillow releases the GIL)."""
    from tqdm.auto import tqdm

    missing = sorted(i for i in ids if i not in cache)
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        hashes = pool.map(lambda i: _image_hash(store, i), missing)
        bar = tqdm(hashes, total=len(missing), unit="img", desc="hashing", disable=not progress)
        for n, (item_id, h) in enumerate(zip(missing, bar, strict=False), 1):
            cache[item_id] = h
            if on_progress is not None:
                on_progress("hashing", n, len(missing))


def _close(a: imagehash.ImageHash | None, b: imagehash.ImageHash | None) -> bool:
    return a is not None and b is not None and a - b <= HASH_BITS


def _chunk_pairs(
    lims: np.ndarray, scores: np.ndarray, found: np.ndarray, start: int, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A range search's results as (row, row, cosine) arrays: every pair at or above the
    threshold, and below it only each query's BAND_NEIGHBOURS nearest (a copy is among an
    image's nearest; a fine-tuned model puts thousands of same-class images above the floor)."""
    rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
    order = np.lexsort((-scores, rows))  # by query, nearest first
    rows, found, scores = rows[order], found[order], scores[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)  # position among the query's results
    keep = (found != rows) & ((scores >= threshold) | (rank <= BAND_NEIGHBOURS))  # rank 0 is the item itself
    return rows[keep], found[keep], scores[keep]


def _pairs(
    store: IndexStore,
    threshold: float,
    floor: float,
    chunk: int,
    max_pairs: int | None = None,
    on_progress: Progress | None = None,
) -> list[tuple[int, int, float]]:
    """Pairs of live items with a cosine of at least ``floor`` (see _chunk_pairs), each once;
    more than ``max_pairs`` is an error (a threshold that pairs whole classes)."""
    ids, vectors = store.live_vectors()
    if len(ids) < 2:
        return []
    vectors = l2_normalise(vectors)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    best: dict[tuple[int, int], float] = {}
    for start in range(0, len(ids), chunk):
        lims, found_scores, found_ids = flat.range_search(vectors[start : start + chunk], floor)
        rows, found, scores = _chunk_pairs(lims, found_scores, found_ids, start, threshold)
        for a, b, score in zip(rows.tolist(), found.tolist(), scores.tolist(), strict=False):
            best[(min(a, b), max(a, b))] = score  # a pair found from both of its items counts once
        if max_pairs is not None and len(best) > max_pairs:
            raise BadInput(f"more than {max_pairs} pairs at cosine >= {threshold:g} in this index: raise the threshold")
        if on_progress is not None:
            on_progress("pairs", min(start + chunk, len(ids)), len(ids))
    return [(int(ids[a]), int(ids[b]), score) for (a, b), score in sorted(best.items())]


def find_duplicates(
    store: IndexStore,
    threshold: float = DEFAULT_THRESHOLD,
    chunk: int = 4096,
    hash_check: bool = False,
    hash_cache: MutableMapping[int, imagehash.ImageHash | None] | None = None,
    progress: bool = False,
    max_pairs: int | None = None,
    on_progress: Progress | None = None,
) -> list[Group]:
    """Groups of two or more items, largest first; within a group, ids ascending.

    ``hash_cache`` (item id -> pHash) keeps hashes between calls on one index version;
    ``on_progress(phase, done, total)`` follows the pairs search, then the hashing.
    """
    floor = min(threshold, HASH_FLOOR) if hash_check else threshold
    pairs = _pairs(store, threshold, floor, chunk, max_pairs, on_progress)
    unsure = [p for p in pairs if p[2] < threshold]
    if unsure:
        cache = {} if hash_cache is None else hash_cache
        _hashes(store, {i for a, b, _ in unsure for i in (a, b)}, cache, progress, on_progress)
        confirmed = {(a, b) for a, b, _ in unsure if _close(cache[a], cache[b])}
        pairs = [p for p in pairs if p[2] >= threshold or (p[0], p[1]) in confirmed]
    parent: dict[int, int] = {}
    for a, b, _ in pairs:
        parent[_find(parent, a)] = _find(parent, b)
    groups: dict[int, Group] = {}
    for a, b, s in pairs:
        groups.setdefault(_find(parent, a), Group([])).pairs.append((a, b, round(s, 6)))
    for g in groups.values():
        g.ids = sorted({i for a, b, _ in g.pairs for i in (a, b)})
        g.keys = [key for _, key in store.labels_and_keys(g.ids)]
    return sorted(groups.values(), key=lambda g: (-len(g.ids), g.ids[0]))


def _thumbnail(store: IndexStore, item_id: int, size: int = 128) -> str:
    try:
        img = decode_thumbnail(item_image_bytes(store, item_id), size)
    except ImgsimError:  # a missing or broken file shows as a gap, the report still renders
        return ""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_contact_sheet(store: IndexStore, groups: list[Group], out: Path, limit: int = 500) -> None:
    """An HTML page with every group's thumbnails, paths and similarities (images inlined)."""
    parts = [
        "<!doctype html><meta charset=utf-8><title>imgsim near-duplicates</title>",
        "<style>body{font:14px sans-serif} .g{border-bottom:1px solid #ccc;padding:8px} figure{display:inline-block;"
        "margin:4px;width:140px;vertical-align:top} figcaption{font-size:11px;word-break:break-all}</style>",
        f"<h1>{len(groups)} groups of near-duplicates</h1>",
    ]
    for n, g in enumerate(groups[:limit], 1):
        parts.append(f"<div class=g><b>group {n}</b>: {len(g.ids)} images, cosine up to {g.max_score:.4f}<br>")
        for i, key in zip(g.ids, map(html.escape, g.keys), strict=False):
            src = _thumbnail(store, i)
            parts.append(f"<figure><img src='{src}' alt=''><figcaption>#{i} {key}</figcaption></figure>")
        parts.append("</div>")
    out.write_text("\n".join(parts))
