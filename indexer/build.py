"""Build INDEX_DIR from a trained model's penultimate-layer embeddings of a dataset."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

from indexer.embedding import Embedded, embed_split
from indexer.faiss_index import INDEX_TYPES, l2_normalise, new_faiss_index
from indexer.index_plan import PQ_DEFAULT, ivfpq_params, plan
from indexer.items_table import create_items_db, insert_items, set_skipped
from indexer.store import write_index_files
from indexer.vector_file import VECTORS_FILE, put_rows
from indexer.versions import new_version, store_dir
from models.data import Dataset, Item, SkipCounter
from models.encoders import describe, open_encoder
from models.errors import ImgsimError
from models.inference import check_tta, open_as_trained
from models.manifests import IndexDataset, IndexManifest, ModelIdentity, ModelManifest, now_utc
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
    index_type: str = "flat"
    nodes: dict[str, tuple[int, int]] = field(default_factory=dict)  # Ray: node id -> (decoded, embedded)

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
        w, h = None, None
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
    index_type: str | None = None,
    params: dict[str, int] | None = None,
    max_index_memory: int | None = None,
    val_fraction: float | None = None,
    seed: int | None = None,
    max_per_class: int | None = None,
    batch_size: int = 32,
    use_cache: bool = True,
    tta: str = "none",
    labels: str = "auto",
    engine: Engine | None = None,
    settings: Settings | None = None,
    progress: bool = True,
) -> BuildReport:
    """Embed the train and validation images of ``data`` (an unlabelled tree: all of it, see
    ``labels`` in :func:`models.data.open_dataset`) and write INDEX_DIR atomically.

    ``model_dir``: a MODEL_DIR or a backbone name. ``index_type`` None: flat, or the best
    index within ``max_index_memory`` bytes. ``engine``: where images are embedded (here).
    ``tta="flip"``: each image's embedding plus its mirror image's (queries do the same).
    """
    settings = settings or get_settings()
    check_tta(tta)
    if index_type is not None and index_type not in INDEX_TYPES:
        raise ImgsimError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    start = time.perf_counter()
    model = describe(model_dir, settings)  # the encoder's manifest and identity, nothing loaded yet
    dataset = _open_collection(model[0], data, settings, val_fraction, seed, max_per_class, labels)
    items = dataset.select([s for s in INDEXED_SPLITS if s in dataset.splits()])
    _choose_index(len(items), model[0].embedding_dim, index_type, params, max_index_memory)  # fail early
    if engine is not None and engine.kind == "ray":
        embedded, runtime, embed_seconds, nodes = _embed_on_ray(model, dataset, items, engine, out, batch_size,
                                                                tta, settings, progress)  # fmt: skip
    else:
        embedded, runtime, embed_seconds = _embed_here(str(model_dir), dataset, items, batch_size, settings,
                                                       use_cache, progress, tta)  # fmt: skip
        nodes = {}
    # Archives and array sources cannot serve one image quickly, so their bytes are stored.
    store_bytes = dataset.kind != "folder"
    by_key = _item_rows(dataset, items, 0, store_bytes)
    ordered = [by_key[k] for k in embedded.keys]
    ids = np.array([r[0] for r in ordered], dtype=np.int64)
    vectors = l2_normalise(embedded.vectors)
    index_type, params = _choose_index(len(ids), vectors.shape[1], index_type, params, max_index_memory)
    index = new_faiss_index(vectors.shape[1], index_type, params, vectors)
    index.add_with_ids(vectors, ids)
    spec = str(Path(data).resolve()) if Path(data).exists() else data
    manifest = _manifest(model, dataset, spec, index, index_type, params, embedded.path_taken, tta, store_bytes, ids)
    skipped = [(i.key, *dataset.file_stats.get(i.key, (None, None)), why) for i, why in embedded.skipped.skipped]
    exact = (ids, vectors) if index_type == "ivfpq" else None
    _write(out, [(*r[:2], spec, *r[3:]) for r in ordered], index, manifest, spec, skipped, exact)
    e, seconds = embedded, time.perf_counter() - start
    return BuildReport(len(ids), e.path_taken, seconds, embed_seconds, e.skipped, e.notes, runtime, index_type, nodes)


def _open_collection(
    manifest: ModelManifest,
    data: str,
    settings: Settings,
    val_fraction: float | None,
    seed: int | None,
    max_per_class: int | None,
    labels: str,
) -> Dataset:
    """The collection, split as the model was trained (so its feature cache can be reused)."""
    dataset = open_as_trained(manifest, data, settings, val_fraction, seed, max_per_class, labels)
    if dataset.labelled and manifest.training and dataset.class_names != manifest.class_names:
        raise ImgsimError(f"{data}: classes {dataset.class_names} differ from the model's {manifest.class_names}")
    return dataset


def _embed_here(
    spec: str,
    dataset: Dataset,
    items: Sequence[Item],
    batch_size: int,
    settings: Settings,
    use_cache: bool,
    progress: bool,
    tta: str,
) -> tuple[Embedded, str, float]:
    """(embeddings, runtime, seconds) from this process, the graph traced outside the timing."""
    embedder = open_encoder(spec, settings=settings, collection=dataset)
    embedder(np.zeros((1, embedder.input_size, embedder.input_size, 3), np.uint8))
    t0 = time.perf_counter()
    embedded = embed_split(embedder, dataset, items, batch_size, settings, use_cache, progress, tta)
    return embedded, embedder.runtime, time.perf_counter() - t0


@dataclass(frozen=True)
class Engine:
    """Where a build embeds its images: "local" (this process) or "ray" (a Ray cluster)."""

    kind: str = "local"
    address: str | None = None  # Ray: host:port, "auto", or None for a local Ray instance
    actors: int | None = None  # Ray: model actors (default: the cluster's CPUs / (cpus_per_actor + 1))
    cpus_per_actor: float = 1.0  # Ray: CPUs each model actor reserves (and TensorFlow threads)


def _choose_index(
    n: int, dim: int, index_type: str | None, params: dict[str, int] | None, budget: int | None
) -> tuple[str, dict[str, int]]:
    """(index type, params): as given, or planned from the memory budget; ivfpq gets its
    list count from the collection's size."""
    if budget is not None:
        chosen = plan(max(n, 1), dim, budget, index_type)
        return chosen.index_type, {**chosen.params, **(params or {})}
    index_type = index_type or "flat"
    if index_type == "ivfpq":
        return index_type, {**ivfpq_params(max(n, 1), dim, PQ_DEFAULT), **(params or {})}
    return index_type, dict(params or {})


def _embed_on_ray(
    model: tuple[ModelManifest, ModelIdentity],
    dataset: Dataset,
    items: Sequence[Item],
    engine: Engine,
    out: Path,
    batch_size: int,
    tta: str,
    settings: Settings,
    progress: bool,
) -> tuple[Embedded, str, float, dict[str, tuple[int, int]]]:
    """(embeddings, runtime, seconds) from a Ray cluster, and how many images each node decoded
    and embedded."""
    from indexer.ray_engine import embed_on_ray

    t0 = time.perf_counter()
    runtime = "tf" if settings.runtime == "auto" else settings.runtime  # each actor's CPU may differ: no auto
    shards = store_dir(out) / f"shards-{os.getpid()}"
    try:
        keys, vectors, skipped, per_node = embed_on_ray(
            model[1].path, dataset, items, model[0].input_size, shards=shards, address=engine.address,
            runtime=runtime, tta=tta, actors=engine.actors, cpus_per_actor=engine.cpus_per_actor, batch_size=batch_size, progress=progress,
        )  # fmt: skip
    finally:
        shutil.rmtree(shards, ignore_errors=True)
    label_of = {i.key: i.label for i in items}
    labels = np.array([label_of[k] for k in keys], dtype=np.int64)
    return (
        Embedded(keys, labels, vectors, np.zeros((len(keys), 0)), "full-model", skipped),
        runtime,
        time.perf_counter() - t0,
        per_node,
    )


def _write(
    out: Path,
    rows: list[tuple],
    index: faiss.Index,
    manifest: IndexManifest,
    source: str,
    skipped: list[tuple],
    exact: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """The first version of INDEX_DIR (or a new one replacing it), published when complete.
    ``exact``: (ids, vectors) for the vector file of a compressed index."""
    with new_version(out) as tmp:
        if exact is not None:
            put_rows(tmp / VECTORS_FILE, *exact, manifest.next_id)
        db = create_items_db(tmp / "items.sqlite")
        insert_items(db, rows)
        set_skipped(db, source, skipped, [])
        db.commit()
        db.close()
        write_index_files(tmp, index, manifest)


def _manifest(
    model: tuple[ModelManifest, ModelIdentity],
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
        model=model[1],
        embedding_layer=model[0].embedding_layer,
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
        index_type=index_type,
        index_params=params,
        faiss_index=type(getattr(index, "index", index)).__name__,  # IVF is not inside an id map
        embedding_path=path_taken,
        tta=tta,
    )
