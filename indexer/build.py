"""Build and update an index from a trained model's penultimate-layer embeddings.

Two paths embed the images:
* cached: the training run's feature cache holds the frozen part's outputs for exactly
  this dataset (same fingerprint), so only the layers above the cut run -- seconds;
* full: every image is decoded and run through the whole network (``--no-cache``, or
  when no matching cache exists).
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from indexer.store import (
    HNSW_TYPES,
    INDEX_TYPES,
    IndexStore,
    all_vectors,
    create_items_db,
    insert_items,
    l2_normalise,
    new_faiss_index,
    write_index_files,
    writing,
)
from models.datasets import Dataset, Item, SkipCounter, open_dataset
from models.embed import stream_forward
from models.errors import ImgsimError
from models.inference import (
    Embedder,
    TrainedModel,
    check_tta,
    combine_views,
    load_trained,
    mirrored_training_cache,
    read_manifest,
    training_cache,
)
from models.settings import Settings, get_settings
from models.train import MODEL_FILE, package_version
from models.weights import file_digest

INDEXED_SPLITS = ("train", "val")


@dataclass
class BuildReport:
    count: int
    path_taken: str  # "cached-features" | "full-model"
    seconds: float
    embed_seconds: float
    skipped: SkipCounter
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.count / self.embed_seconds if self.embed_seconds > 0 else 0.0


def model_identity(model: TrainedModel | Path) -> dict[str, Any]:
    """What an index records about its model, and what loading checks against.

    Takes a loaded model or just its directory (no Keras needed: manifest + file hash).
    """
    if isinstance(model, TrainedModel):
        path, m, name = model.path, model.manifest, model.name
    else:
        path, m = Path(model), read_manifest(Path(model))
        name = str(m.get("name") or path.name)
    return {
        "name": name,
        "path": str(path.resolve()),
        "backbone": m["backbone"],
        "model_sha256": file_digest(path / MODEL_FILE),
        "imagenet_weights_sha256": (m.get("weights") or {}).get("sha256"),
        "embedding_layer": m["embedding_layer"],
        "embedding_dim": m["embedding_dim"],
        "input_size": m["input_size"],
    }


def _describe(raw: bytes | np.ndarray | None) -> tuple[str, int | None, int | None, bytes | None]:
    """Content hash, original size and storable bytes of one raw payload (header-only decode)."""
    if raw is None:
        return "", None, None, None
    if isinstance(raw, np.ndarray):
        buf = io.BytesIO()
        Image.fromarray(raw).save(buf, format="PNG")
        data = buf.getvalue()
        return hashlib.sha256(raw.tobytes()).hexdigest(), raw.shape[1], raw.shape[0], data
    try:
        with Image.open(io.BytesIO(raw)) as img:
            w, h = img.size
    except Exception:  # unreadable: the embedding pass skips and counts it
        w = h = None
    return hashlib.sha256(raw).hexdigest(), w, h, raw


def _item_rows(dataset: Dataset, items: Sequence[Item], first_id: int, store_bytes: bool) -> dict[str, tuple]:
    rows: dict[str, tuple] = {}
    for n, (item, raw) in enumerate(dataset.iter_raw(items)):
        sha, w, h, data = _describe(raw)
        rows[item.key] = (
            first_id + n,
            item.key,
            dataset.spec,
            item.label,
            dataset.class_names[item.label],
            item.split,
            sha,
            w,
            h,
            data if store_bytes else None,
        )
    return rows


def _head(embedder: Embedder, features: np.ndarray, progress: bool, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and probabilities from cached cut-layer features (only the upper layers run)."""
    from tqdm.auto import tqdm

    out = [
        embedder.head_from_features(features[i : i + 256])
        for i in tqdm(range(0, len(features), 256), desc=desc, disable=not progress)
    ]
    return np.concatenate([e for e, _ in out]), np.concatenate([p for _, p in out])


def _mirrored_views(
    embedder: Embedder,
    dataset: Dataset,
    split: str,
    keys: list[str],
    batch_size: int,
    settings: Settings,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Embeddings and probabilities of the mirrored images of ``keys`` (one split), in that order.

    From the training run's mirrored feature cache when it has this split (``--flip``
    training caches the training images), otherwise from the full model.
    """
    cached = mirrored_training_cache(embedder.trained.manifest, dataset, split, settings)
    if cached is not None and cached.keys == keys:
        e, p = _head(embedder, cached.x, progress, f"head on cached mirrored {split}")
        return e, p, f"{split}: cached mirrored features"
    wanted = {k: n for n, k in enumerate(keys)}
    emb = np.zeros((len(keys), embedder.trained.manifest["embedding_dim"]), np.float32)
    probs = np.zeros((len(keys), len(embedder.class_names)), np.float32)
    seen = 0
    items = [i for i in dataset.select(split) if i.key in wanted]
    for batch_items, (e, p) in stream_forward(
        lambda b: embedder(b[:, :, ::-1]),
        dataset,
        items,
        embedder.input_size,
        batch_size,
        SkipCounter(),
        progress,
        desc=f"mirrored {split}",
    ):
        rows = [wanted[i.key] for i in batch_items]
        emb[rows], probs[rows] = e, p
        seen += len(rows)
    if seen != len(keys):
        raise ImgsimError(f"{len(keys) - seen} {split} images could not be read again for the mirrored view")
    return emb, probs, f"{split}: full model on mirrored images"


def embed_split(
    embedder: Embedder,
    dataset: Dataset,
    items: Sequence[Item],
    batch_size: int,
    settings: Settings,
    use_cache: bool,
    progress: bool,
    tta: str = "none",
    notes: list[str] | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, str, SkipCounter]:
    """(keys, labels, embeddings, probabilities, path taken, skipped) for ``items``.

    With ``tta="flip"`` each embedding is that of the image plus that of its mirror image;
    how the mirrored views were computed is appended to ``notes``.
    """
    check_tta(tta)
    m = embedder.trained.manifest
    skipped = SkipCounter()
    splits = sorted({i.split for i in items})
    keys: list[str] = []
    labels: list[np.ndarray] = []
    embs: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    cache = training_cache(m, dataset, splits, settings) if use_cache else None
    if cache is not None:
        for s in splits:
            feats = cache[s]
            e, p = _head(embedder, feats.x, progress, f"head on cached {s}")
            if tta == "flip":
                ef, pf, how = _mirrored_views(embedder, dataset, s, feats.keys, batch_size, settings, progress)
                e, p = combine_views(e, ef, p, pf)
                if notes is not None:
                    notes.append(how)
            embs.append(e)
            probs.append(p)
            keys += feats.keys
            labels.append(feats.y)
        return keys, np.concatenate(labels), np.concatenate(embs), np.concatenate(probs), "cached-features", skipped
    for batch_items, (e, p) in stream_forward(
        lambda b: embedder.embed(b, tta), dataset, items, embedder.input_size, batch_size, skipped, progress
    ):
        keys += [i.key for i in batch_items]
        labels.append(np.array([i.label for i in batch_items], dtype=np.int64))
        embs.append(e)
        probs.append(p)
    if not keys:
        raise ImgsimError("no image could be embedded")
    if tta == "flip" and notes is not None:
        notes.append("mirrored views: full model, in the same calls as the plain ones")
    return keys, np.concatenate(labels), np.concatenate(embs), np.concatenate(probs), "full-model", skipped


def build_index(
    model_dir: Path,
    data: str,
    out: Path,
    *,
    index_type: str = "flat",
    params: dict[str, int] | None = None,
    val_fraction: float | None = None,
    seed: int | None = None,
    max_per_class: int | None = None,
    batch_size: int = 32,
    use_cache: bool = True,
    tta: str = "none",
    settings: Settings | None = None,
    progress: bool = True,
) -> BuildReport:
    """Embed the train and validation images of ``data`` and write INDEX_DIR atomically.

    ``tta="flip"`` indexes each image by its own embedding plus its mirror image's; the
    manifest records it, so queries (``evaluate``, the service) are embedded the same way.
    """
    settings = settings or get_settings()
    params = params or {}
    check_tta(tta)
    if index_type not in INDEX_TYPES:
        raise ImgsimError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    start = time.perf_counter()
    trained = load_trained(model_dir)
    t = trained.manifest["training"]
    # Default to the model's own split so the training feature cache can be reused.
    dataset = open_dataset(
        data,
        val_fraction=t["val_fraction"] if val_fraction is None else val_fraction,
        seed=t["seed"] if seed is None else seed,
        max_per_class=t["max_per_class"] if max_per_class is None else max_per_class,
        settings=settings,
    )
    if dataset.class_names != trained.manifest["class_names"]:
        raise ImgsimError(
            f"{data}: classes {dataset.class_names} differ from the model's {trained.manifest['class_names']}"
        )
    items = dataset.select([s for s in INDEXED_SPLITS if s in dataset.splits()])
    if not items:
        raise ImgsimError(f"{data} has no train/val images to index")
    embedder = Embedder(trained)
    size = embedder.input_size
    embedder(np.zeros((1, size, size, 3), np.uint8))  # trace the graph outside the timed part
    t0 = time.perf_counter()
    notes: list[str] = []
    keys, _, vectors, _, path_taken, skipped = embed_split(
        embedder, dataset, items, batch_size, settings, use_cache, progress, tta, notes
    )
    embed_seconds = time.perf_counter() - t0

    # Archives and array sources cannot serve one image quickly, so their bytes are stored.
    store_bytes = dataset.kind != "folder"
    rows = _item_rows(dataset, items, 0, store_bytes)
    ordered = [rows[k] for k in keys]
    ids = np.array([r[0] for r in ordered], dtype=np.int64)
    vectors = l2_normalise(vectors)
    index = new_faiss_index(vectors.shape[1], index_type, params, vectors)
    index.add_with_ids(vectors, ids)

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = {
        "format": 1,
        "model": model_identity(trained),
        "embedding_layer": trained.manifest["embedding_layer"],
        "embedding_dim": int(vectors.shape[1]),
        "metric": "inner_product",
        "normalisation": "l2",
        "score": "cosine",
        "count": len(ids),
        "next_id": int(ids.max()) + 1,
        "dataset": {
            "spec": str(Path(data).resolve()) if Path(data).exists() else data,
            "kind": dataset.kind,
            "fingerprint": dataset.fingerprint,
            "splits": list(INDEXED_SPLITS),
            "class_names": dataset.class_names,
            "images_stored": store_bytes,
        },
        "index_type": index_type,
        "index_params": params,
        "faiss_index": type(getattr(index, "index", index)).__name__,  # IVF is not inside an id map
        "embedding_path": path_taken,
        "tta": tta,
        "created": now,
        "updated": now,
        "package_version": package_version(),
    }
    with writing(out) as tmp:
        db = create_items_db(tmp / "items.sqlite")
        insert_items(db, [(*r[:2], manifest["dataset"]["spec"], *r[3:]) for r in ordered])
        db.commit()
        db.close()
        write_index_files(tmp, index, manifest)
    return BuildReport(len(ids), path_taken, time.perf_counter() - start, embed_seconds, skipped, notes)


def add_images(
    index_dir: Path, paths: Sequence[Path], label: str | None = None, progress: bool = True
) -> dict[str, int]:
    """Embed image files and append them; exact duplicates (same bytes) are skipped."""
    store = IndexStore.open(index_dir)
    manifest = dict(store.manifest)
    trained = load_trained(Path(manifest["model"]["path"]))
    store.check(model_identity(trained))
    class_names = manifest["dataset"]["class_names"]
    if label is not None and label not in class_names:
        store.close()
        raise ImgsimError(f"unknown label {label!r}; the index's classes are: {', '.join(class_names)}")
    label_id = class_names.index(label) if label is not None else -1

    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ImgsimError(f"not found: {', '.join(missing[:5])}")
    hashes = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    known = store.existing_hashes(list(set(hashes.values())))
    fresh: dict[str, Path] = {}
    for f, h in hashes.items():
        if h not in known and h not in fresh:
            fresh[h] = f
    duplicates = len(files) - len(fresh)
    if not fresh:
        store.close()
        return {"added": 0, "duplicates": duplicates, "skipped": 0, "count": manifest["count"]}

    folder = _FileList(list(fresh.values()), class_names, label_id)
    embedder = Embedder(trained)
    skipped = SkipCounter()
    keys: list[str] = []
    chunks = []
    tta = manifest.get("tta", "none")
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
    next_id = int(manifest["next_id"])
    rows, vecs = [], []
    for key, emb in zip(keys, np.concatenate(chunks) if chunks else []):
        f = Path(key)
        with Image.open(f) as img:
            w, h = img.size
        rows.append(
            (
                next_id,
                f.name,
                str(f.resolve()),
                label_id,
                label if label_id >= 0 else None,
                "added",
                hashes[f],
                w,
                h,
                None,
            )
        )
        vecs.append(emb)
        next_id += 1
    store.close()
    if rows:
        with writing(index_dir, copy_from=index_dir) as tmp:
            updated = IndexStore.open(tmp)
            updated.index.add_with_ids(l2_normalise(np.stack(vecs)), np.array([r[0] for r in rows], dtype=np.int64))
            insert_items(updated._db, rows)
            updated._db.commit()
            manifest.update(
                count=manifest["count"] + len(rows),
                next_id=next_id,
                updated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
            updated.close()
            write_index_files(tmp, updated.index, manifest)
    return {"added": len(rows), "duplicates": duplicates, "skipped": skipped.total, "count": manifest["count"]}


def remove_ids(index_dir: Path, ids: Sequence[int]) -> dict[str, int]:
    """Remove items by id; unknown ids are reported, other ids never change."""
    store = IndexStore.open(index_dir)
    manifest = dict(store.manifest)
    present = set(store.rows(ids))
    unknown = sorted(set(int(i) for i in ids) - present)
    store.close()
    if unknown:
        raise ImgsimError(f"unknown ids: {', '.join(map(str, unknown[:10]))}{' ...' if len(unknown) > 10 else ''}")
    with writing(index_dir, copy_from=index_dir) as tmp:
        updated = IndexStore.open(tmp)
        drop = np.array(sorted(present), dtype=np.int64)
        if manifest["index_type"] in HNSW_TYPES:  # HNSW graphs cannot delete: rebuild from the stored vectors
            all_ids, vecs = all_vectors(updated.index)
            keep = ~np.isin(all_ids, drop)
            index = new_faiss_index(
                manifest["embedding_dim"], manifest["index_type"], manifest["index_params"], vecs[keep]
            )
            index.add_with_ids(vecs[keep], all_ids[keep])
            updated.index = index
        else:
            updated.index.remove_ids(drop)
        updated._db.executemany("DELETE FROM items WHERE id = ?", [(int(i),) for i in drop])
        updated._db.commit()
        manifest.update(
            count=manifest["count"] - len(drop), updated=datetime.now(timezone.utc).isoformat(timespec="seconds")
        )
        updated.close()
        write_index_files(tmp, updated.index, manifest)
    return {"removed": len(present), "count": manifest["count"]}


class _FileList:
    """A minimal dataset over loose files, so added images go through the same pipeline."""

    def __init__(self, files: list[Path], class_names: list[str], label: int) -> None:
        self.class_names = class_names
        self.items = [Item(str(f), max(label, 0), "added") for f in files]
        self.spec = "files"

    def iter_raw(self, items: Sequence[Item]):  # noqa: ANN201
        for item in items:
            try:
                yield item, Path(item.key).read_bytes()
            except OSError:
                yield item, None
