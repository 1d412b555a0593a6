"""Build INDEX_DIR from a trained model's penultimate-layer embeddings of a dataset."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

from indexer.embedding import embed_split
from indexer.faiss_index import INDEX_TYPES, l2_normalise, new_faiss_index
from indexer.store import create_items_db, insert_items, set_skipped, write_index_files
from indexer.versions import new_version
from models.data import Dataset, Item, SkipCounter
from models.embedder import Embedder
from models.errors import ImgsimError
from models.inference import TrainedModel, check_tta, load_trained, open_as_trained
from models.manifests import IndexDataset, IndexManifest, model_identity, now_utc
from models.settings import Settings, get_settings

INDEXED_SPLITS = ("train", "val")


@dataclass
class BuildReport:
    count: int
    path_taken: str  # "cached-features" | "full-model"
    seconds: float
    embed_seconds: float
    skipped: SkipCounter
    notes: list[str] = field(default_factory=list)
    runtime: str = "tf"

    @property
    def images_per_second(self) -> float:
        return self.count / self.embed_seconds if self.embed_seconds > 0 else 0.0


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
    """key -> the item's row (COLUMNS of indexer.store), ids from ``first_id`` in dataset order."""
    rows: dict[str, tuple] = {}
    added = now_utc()
    for n, (item, raw) in enumerate(dataset.iter_raw(items)):
        sha, w, h, data = _describe(raw)
        name = dataset.class_names[item.label] if item.label >= 0 else None
        size, mtime = dataset.file_stats.get(item.key, (None, None))
        rows[item.key] = (first_id + n, item.key, dataset.spec, item.label, name, item.split, sha, w, h,
                          data if store_bytes else None, size, mtime, added)  # fmt: skip
    return rows


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
    labels: str = "auto",
    settings: Settings | None = None,
    progress: bool = True,
) -> BuildReport:
    """Embed the train and validation images of ``data`` (an unlabelled tree: all of it, see
    ``labels`` in :func:`models.data.open_dataset`) and write INDEX_DIR atomically.
    ``model_dir``: a MODEL_DIR or a backbone name (ImageNet features, no training).

    ``tta="flip"`` indexes each image by its own embedding plus its mirror image's; the
    manifest records it, so queries (``evaluate``, the service) are embedded the same way.
    """
    settings = settings or get_settings()
    check_tta(tta)
    if index_type not in INDEX_TYPES:
        raise ImgsimError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    start = time.perf_counter()
    trained = load_trained(model_dir)
    # The model's own split by default, so the training feature cache can be reused.
    dataset = open_as_trained(trained.manifest, data, settings, val_fraction, seed, max_per_class, labels)
    if dataset.labelled and trained.manifest.training and dataset.class_names != trained.manifest.class_names:
        raise ImgsimError(
            f"{data}: classes {dataset.class_names} differ from the model's {trained.manifest.class_names}"
        )
    items = dataset.select([s for s in INDEXED_SPLITS if s in dataset.splits()])
    embedder = Embedder(trained, settings=settings, collection=dataset)
    embedder(np.zeros((1, embedder.input_size, embedder.input_size, 3), np.uint8))  # trace outside the timing
    t0 = time.perf_counter()
    embedded = embed_split(embedder, dataset, items, batch_size, settings, use_cache, progress, tta)
    embed_seconds = time.perf_counter() - t0

    # Archives and array sources cannot serve one image quickly, so their bytes are stored.
    store_bytes = dataset.kind != "folder"
    by_key = _item_rows(dataset, items, 0, store_bytes)
    ordered = [by_key[k] for k in embedded.keys]
    ids = np.array([r[0] for r in ordered], dtype=np.int64)
    vectors = l2_normalise(embedded.vectors)
    index = new_faiss_index(vectors.shape[1], index_type, params or {}, vectors)
    index.add_with_ids(vectors, ids)
    spec = str(Path(data).resolve()) if Path(data).exists() else data
    manifest = _manifest(
        trained, dataset, spec, index, index_type, params or {}, embedded.path_taken, tta, store_bytes, ids
    )
    skipped = [(i.key, *dataset.file_stats.get(i.key, (None, None)), why) for i, why in embedded.skipped.skipped]
    _write(out, [(*r[:2], spec, *r[3:]) for r in ordered], index, manifest, spec, skipped)
    e, seconds = embedded, time.perf_counter() - start
    return BuildReport(len(ids), e.path_taken, seconds, embed_seconds, e.skipped, e.notes, embedder.runtime)


def _write(
    out: Path, rows: list[tuple], index: faiss.Index, manifest: IndexManifest, source: str, skipped: list[tuple]
) -> None:
    """The first version of INDEX_DIR (or a new one replacing it), published when complete."""
    with new_version(out) as tmp:
        db = create_items_db(tmp / "items.sqlite")
        insert_items(db, rows)
        set_skipped(db, source, skipped, [])
        db.commit()
        db.close()
        write_index_files(tmp, index, manifest)


def _manifest(
    trained: TrainedModel,
    dataset: Dataset,
    spec: str,
    index: faiss.Index,
    index_type: str,
    params: dict[str, int],
    path_taken: str,
    tta: str,
    store_bytes: bool,
    ids: np.ndarray,
) -> IndexManifest:
    return IndexManifest(
        model=model_identity(trained.path, trained.manifest),
        embedding_layer=trained.manifest.embedding_layer,
        embedding_dim=int(index.d),
        count=len(ids),
        next_id=int(ids.max()) + 1,
        dataset=IndexDataset(
            spec=spec,
            kind=dataset.kind,
            fingerprint=dataset.fingerprint,
            splits=list(INDEXED_SPLITS),
            class_names=dataset.class_names,
            images_stored=store_bytes,
            labels="folders" if dataset.labelled else "none",
            **dataset.options,
        ),
        index_type=index_type,  # type: ignore[arg-type]
        index_params=params,
        faiss_index=type(getattr(index, "index", index)).__name__,  # IVF is not inside an id map
        embedding_path=path_taken,
        tta=tta,  # type: ignore[arg-type]
    )
