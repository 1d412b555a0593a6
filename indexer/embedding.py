"""Embeddings of dataset items for an index: from the training feature cache, or the full model.

Two paths:
* cached: the training run's feature cache holds the frozen part's outputs for exactly
  this dataset (same fingerprint), so only the layers above the cut run -- seconds;
* full: every image is decoded and run through the whole network (``--no-cache``, or
  when no matching cache exists).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from models.data import Dataset, Item, SkipCounter
from models.embed import stream_forward
from models.encoders import ImageEncoder
from models.errors import ImgsimError
from models.inference import check_tta, combine_views, mirrored_training_cache, training_cache
from models.settings import Settings


@runtime_checkable
class CachedHead(ImageEncoder, Protocol):
    """An encoder that can run its layers above the training cut on cached features (Keras)."""

    def head_from_features(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class Embedded:
    """Embeddings and class probabilities of the items that could be read, in one order."""

    keys: list[str]
    labels: np.ndarray
    vectors: np.ndarray
    probs: np.ndarray
    path_taken: str  # "cached-features" | "full-model"
    skipped: SkipCounter = field(default_factory=SkipCounter)
    notes: list[str] = field(default_factory=list)


def embed_split(
    embedder: ImageEncoder,
    dataset: Dataset,
    items: Sequence[Item],
    batch_size: int,
    settings: Settings,
    use_cache: bool,
    progress: bool,
    tta: str = "none",
) -> Embedded:
    """Embed ``items``; with ``tta="flip"`` each embedding is the image's plus its mirror image's."""
    check_tta(tta)
    splits = sorted({i.split for i in items})
    # The cached features (TensorFlow fp32) win over any runtime: only the small head runs.
    cache = training_cache(embedder.manifest, dataset, splits, settings) if use_cache else None
    if cache is not None and isinstance(embedder, CachedHead):
        return _from_cache(embedder, dataset, cache, splits, batch_size, settings, progress, tta)
    keys: list[str] = []
    labels, embs, probs = [], [], []
    skipped = SkipCounter()
    for batch_items, (e, p) in stream_forward(
        lambda b: embedder.embed(b, tta), dataset, items, embedder.input_size, batch_size, skipped, progress
    ):
        keys += [i.key for i in batch_items]
        labels.append(np.array([i.label for i in batch_items], dtype=np.int64))
        embs.append(e)
        probs.append(p)
    if not keys:
        raise ImgsimError("no image could be embedded")
    notes = ["mirrored views: full model, in the same calls as the plain ones"] if tta == "flip" else []
    return Embedded(
        keys, np.concatenate(labels), np.concatenate(embs), np.concatenate(probs), "full-model", skipped, notes
    )


def _from_cache(
    embedder: CachedHead,
    dataset: Dataset,
    cache: dict,
    splits: list[str],
    batch_size: int,
    settings: Settings,
    progress: bool,
    tta: str,
) -> Embedded:
    keys: list[str] = []
    labels, embs, probs, notes = [], [], [], []
    for s in splits:
        feats = cache[s]
        e, p = _head(embedder, feats.x, progress, f"head on cached {s}")
        if tta == "flip":
            ef, pf, how = _mirrored_views(embedder, dataset, s, feats.keys, batch_size, settings, progress)
            e, p = combine_views(e, ef, p, pf)
            notes.append(how)
        embs.append(e)
        probs.append(p)
        keys += feats.keys
        labels.append(feats.y)
    return Embedded(
        keys, np.concatenate(labels), np.concatenate(embs), np.concatenate(probs), "cached-features", notes=notes
    )


def _head(embedder: CachedHead, features: np.ndarray, progress: bool, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and probabilities from cached cut-layer features (only the upper layers run)."""
    from tqdm.auto import tqdm

    out = [
        embedder.head_from_features(features[i : i + 256])
        for i in tqdm(range(0, len(features), 256), desc=desc, disable=not progress)
    ]
    return np.concatenate([e for e, _ in out]), np.concatenate([p for _, p in out])


def _mirrored_views(
    embedder: CachedHead,
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
    cached = mirrored_training_cache(embedder.manifest, dataset, split, settings)
    if cached is not None and cached.keys == keys:
        e, p = _head(embedder, cached.x, progress, f"head on cached mirrored {split}")
        return e, p, f"{split}: cached mirrored features"
    wanted = {k: n for n, k in enumerate(keys)}
    emb = np.zeros((len(keys), embedder.manifest.embedding_dim), np.float32)
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
