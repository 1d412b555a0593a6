"""Retrieval evaluation: query every test image against an index (see :mod:`indexer.metrics`)."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.embedding import embed_split
from indexer.faiss_index import l2_normalise
from indexer.metrics import average_precision_at_k, knn_vote, per_class, precision_at_k, relevance
from indexer.store import IndexStore
from models.encoders import describe, open_encoder
from models.errors import ImgsimError
from models.inference import open_as_trained
from models.settings import Settings, get_settings

K_MAX = 10


def exact_recall_at_k(store: IndexStore, queries: np.ndarray, approx_ids: np.ndarray, k: int = 5) -> float:
    """Share of the exact top-k (brute force over the stored vectors) the index returned."""
    ids, vectors = store.live_vectors()
    k = min(k, len(ids))  # an index smaller than k: FAISS would pad with -1, i.e. ids[-1]
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    _, pos = flat.search(queries, k)
    exact = ids[pos]
    hits = [len(set(a[:k]) & set(e)) for a, e in zip(approx_ids, exact, strict=False)]
    return float(np.mean(hits)) / k


def evaluate(
    model_dir: Path,
    index_dir: Path,
    data: str,
    split: str = "test",
    *,
    settings: Settings | None = None,
    batch_size: int = 32,
    use_cache: bool = True,
    progress: bool = True,
    val_fraction: float | None = None,
    seed: int | None = None,
    max_per_class: int | None = None,
    labels: str = "auto",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics dict (JSON-ready) and the raw per-query arrays (for plots)."""
    settings = settings or get_settings()
    manifest, identity = describe(model_dir, settings)
    store = IndexStore.open(index_dir, expect_model=identity)
    dataset = open_as_trained(manifest, data, settings, val_fraction, seed, max_per_class, labels)
    if dataset.class_names != store.manifest.dataset.class_names:
        raise ImgsimError("the dataset's classes differ from the index's")
    if split not in dataset.splits():
        raise ImgsimError(f"{data} has no {split!r} split (has {', '.join(dataset.splits())})")
    embedder = open_encoder(model_dir, settings=settings)
    tta = store.manifest.tta  # queries are embedded as the index's items were
    embedded = embed_split(embedder, dataset, dataset.select(split), batch_size, settings, use_cache, progress, tta)
    keys, truth = embedded.keys, embedded.labels
    queries = l2_normalise(embedded.vectors)
    t0 = time.perf_counter()
    scores, ids = store.search(queries, K_MAX)
    search_seconds = time.perf_counter() - t0
    per_query = _per_query(store, truth, embedded.probs, scores, ids, len(dataset.class_names))
    result: dict[str, Any] = {
        "model": manifest.name,
        "index": str(Path(index_dir)),
        "index_type": store.manifest.index_type,
        "index_count": store.manifest.count,
        "split": split,
        "n_queries": len(keys),
        **{k: round(float(v.mean()), 4) for k, v in per_query.items()},
        "embedding_path": embedded.path_taken,
        "runtime": "tf" if embedded.path_taken == "cached-features" else embedder.runtime,
        "tta": tta,
        "search_seconds": round(search_seconds, 3),
        "per_class": per_class(per_query, truth, dataset.class_names),
    }
    if store.manifest.index_type != "flat":
        result["recall_at_5_vs_exact"] = round(exact_recall_at_k(store, queries, ids, 5), 4)
    raw: dict[str, Any] = {
        "keys": np.array(keys),
        "labels": truth,
        "ids": ids,
        "scores": scores,
        "class_names": dataset.class_names,
        "dataset": dataset,
    }
    store.close()
    return result, raw


def _per_query(
    store: IndexStore, labels: np.ndarray, probs: np.ndarray, scores: np.ndarray, ids: np.ndarray, n_classes: int
) -> dict[str, np.ndarray]:
    """Each metric per query (1 or 0, or a precision), to average overall and per class."""
    retrieved = store.labels(ids)
    rel = relevance(retrieved, labels)
    n_rel = store.label_counts(n_classes)[labels]
    return {
        "precision_at_1": precision_at_k(rel, 1),
        "precision_at_5": precision_at_k(rel, 5),
        "precision_at_10": precision_at_k(rel, 10),
        "map_at_5": average_precision_at_k(rel, 5, n_rel),
        "knn_accuracy": (knn_vote(retrieved, scores, n_classes, 5) == labels).astype(float),
        # A model without a classifier of these classes (ImageNet features) has no accuracy.
        **({"classifier_accuracy": (probs.argmax(1) == labels).astype(float)} if probs.shape[1] == n_classes else {}),
    }


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def format_summary(r: dict[str, Any]) -> str:
    lines = [
        f"{r['model']} on {r['n_queries']} {r['split']} queries against {r['index_count']} indexed images "
        f"({r['index_type']} index{', flip TTA' if r.get('tta', 'none') == 'flip' else ''}; "
        f"queries embedded on runtime {r.get('runtime', 'tf')}):",
        f"  precision@1 {r['precision_at_1']:.4f}  precision@5 {r['precision_at_5']:.4f}  "
        f"precision@10 {r['precision_at_10']:.4f}  mAP@5 {r['map_at_5']:.4f}",
        f"  kNN accuracy (top-5 vote) {r['knn_accuracy']:.4f}  classifier accuracy {_f(r.get('classifier_accuracy'))}",
    ]
    if "recall_at_5_vs_exact" in r:
        lines.append(f"  recall@5 vs exact search {r['recall_at_5_vs_exact']:.4f}")
    width = max(len(c["class"]) for c in r["per_class"]) + 2
    lines.append(f"  {'class':<{width}}{'queries':>8}{'P@5':>8}{'mAP@5':>8}{'kNN':>8}{'clf':>8}")
    for c in r["per_class"]:
        lines.append(
            f"  {c['class']:<{width}}{c['n_queries']:>8}{c['precision_at_5']:>8.4f}{c['map_at_5']:>8.4f}"
            f"{c['knn_accuracy']:>8.4f}{_f(c.get('classifier_accuracy')):>8}"
        )
    return "\n".join(lines)


def plot_queries(raw: dict[str, Any], index_dir: Path, path: Path, n: int = 6, seed: int = 0) -> None:
    """Random queries (left) next to their top-5 results with score and label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from indexer.images import load_item_image

    store = IndexStore.open(index_dir)
    dataset = raw["dataset"]
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(raw["keys"]), size=min(n, len(raw["keys"])), replace=False).tolist())
    by_key = {k: i for i, k in enumerate(raw["keys"])}
    wanted = [it for it in dataset.select(None) if it.key in {raw["keys"][p] for p in picks}]
    query_imgs = {it.key: raw_img for it, raw_img in dataset.iter_raw(wanted)}
    names = raw["class_names"]
    fig, axes = plt.subplots(len(picks), 6, figsize=(12, 2.2 * len(picks)), squeeze=False)
    for row, p in enumerate(picks):
        key = raw["keys"][p]
        q = query_imgs[key]
        img = Image.fromarray(q) if isinstance(q, np.ndarray) else Image.open(io.BytesIO(q))
        axes[row][0].imshow(img.convert("RGB"))
        axes[row][0].set_title(f"query: {names[raw['labels'][by_key[key]]]}", fontsize=8, color="blue")
        rows = store.rows(raw["ids"][p][:5].tolist())
        for j, (item_id, score) in enumerate(zip(raw["ids"][p][:5], raw["scores"][p][:5], strict=False)):
            ax = axes[row][j + 1]
            if item_id >= 0:
                ax.imshow(load_item_image(store, int(item_id)).convert("RGB"))
                label = rows[int(item_id)].label_name
                ok = rows[int(item_id)].label == raw["labels"][by_key[key]]
                ax.set_title(f"{label} {score:.3f}", fontsize=8, color="green" if ok else "red")
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    store.close()
