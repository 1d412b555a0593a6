"""On-disk cache of frozen-layer outputs, so training runs the frozen CNN once per image.

On a 2-core CPU the frozen part of the network is nearly all of the compute; caching its
output turns an epoch from tens of minutes into seconds. The cache key covers everything
that changes those outputs: backbone, ImageNet-weights hash, input size, cut layer,
dataset fingerprint and the flip augmentation. A cache is written into a temporary
directory and renamed into place when complete, so an interrupted run leaves nothing
half-written behind.

Trade-off: cached features cannot see random crops or colour jitter. Two augmentations
survive caching (see :mod:`models.train`): a horizontal flip, by caching the features of
the mirrored training images as a second cache (one more pass over the training set),
and small translations, by shifting the cached spatial feature map by whole cells (one
cell of ResNet50's conv4 output is 16 input pixels). The simple CNN, which caches raw
pixels, augments freely inside the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.architecture import Architecture, split_model
from models.backbones import Preprocessing, preprocess
from models.data import Dataset, SkipCounter
from models.embed import stream_forward
from models.errors import ImgsimError
from models.settings import Settings

if TYPE_CHECKING:
    import keras

    from models.train import TrainOptions


@dataclass
class FeatureSplit:
    x: np.ndarray  # (N, ...) memory-mapped
    y: np.ndarray  # (N,) int64 labels
    keys: list[str]
    x_flip: np.ndarray | None = None  # features of the mirrored images, when flip augmentation is on

    def __len__(self) -> int:
        return len(self.y)


def cache_key(**parts: object) -> str:
    """Stable hex key of the inputs that determine the cached outputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def features_key(
    *,
    backbone: str,
    weights: str | None,
    input_size: int,
    cut: str | None,
    dataset: str,
    splits: list[str],
    flip: bool,
) -> str:
    """Key of a training feature cache; training writes it, the indexer finds it again by it."""
    return cache_key(
        backbone=backbone, weights=weights, input_size=input_size, cut=cut, dataset=dataset, splits=splits, flip=flip
    )


def load_cache(directory: Path) -> dict[str, FeatureSplit] | None:
    """The cached splits in ``directory``, or None when it is absent or incomplete."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    out = {}
    for split, info in meta["splits"].items():
        n = info["count"]
        x = np.load(directory / f"{split}.npy", mmap_mode="r")[:n]
        out[split] = FeatureSplit(x, np.load(directory / f"{split}_labels.npy"), info["keys"])
    return out


def build_cache(
    directory: Path,
    lower: Callable[[np.ndarray], np.ndarray],
    dataset: Dataset,
    splits: list[str],
    input_size: int,
    batch_size: int,
    *,
    describe: dict[str, object] | None = None,
    progress: bool = True,
) -> tuple[dict[str, FeatureSplit], SkipCounter]:
    """Run ``lower`` (uint8 batch -> features) over ``splits`` and store the outputs."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    skipped = SkipCounter()
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".part-", dir=directory.parent))
    try:
        meta: dict[str, object] = {"describe": describe or {}, "splits": {}}
        for split in splits:
            items = dataset.select(split)
            array: np.memmap | None = None
            keys: list[str] = []
            labels: list[int] = []
            for batch_items, out in stream_forward(
                lower, dataset, items, input_size, batch_size, skipped, progress, desc=f"features {split}"
            ):
                if array is None:
                    dtype = np.uint8 if out.dtype == np.uint8 else np.float16
                    array = np.lib.format.open_memmap(
                        tmp / f"{split}.npy", mode="w+", dtype=dtype, shape=(len(items), *out.shape[1:])
                    )
                array[len(keys) : len(keys) + len(out)] = out
                keys.extend(i.key for i in batch_items)
                labels.extend(i.label for i in batch_items)
            if array is not None:
                array.flush()
                del array
            if keys:
                np.save(tmp / f"{split}_labels.npy", np.array(labels, dtype=np.int64))
                meta["splits"][split] = {"count": len(keys), "keys": keys}  # type: ignore[index]  # meta["splits"] is the dict made above
        (tmp / "meta.json").write_text(json.dumps(meta))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache = load_cache(directory)
    assert cache is not None
    return cache, skipped


@dataclass
class Features:
    """Cached outputs of the frozen layers per split, and how they were obtained."""

    splits: dict[str, FeatureSplit]
    key: str
    hit: bool
    messages: list[str]
    seconds: float


def extract_features(
    arch: Architecture,
    opts: TrainOptions,
    dataset: Dataset,
    test_set: Dataset | None,
    settings: Settings,
    progress: bool,
) -> Features:
    """Train and val features (and test, from ``dataset`` or from ``test_set``)."""
    t0 = time.perf_counter()
    splits = ["train", "val"] + (["test"] if "test" in dataset.splits() and not test_set else [])
    feats, key, hit, messages = _features(arch, opts, dataset, splits, settings, progress)
    if test_set:
        test_splits = ["test"] if "test" in test_set.splits() else ["train"]
        test_feats, _, _, more = _features(arch, opts, test_set, test_splits, settings, progress)
        feats["test"] = next(iter(test_feats.values()))
        messages += more
    seconds = time.perf_counter() - t0
    messages.append(f"feature extraction: {seconds:.1f} s")
    return Features(feats, key, hit, messages, seconds)


def _forward_fn(model: keras.Model | None, preprocessing: Preprocessing) -> Any:
    """uint8 batch -> model output; the identity (raw pixels, uint8) when there is no lower model."""
    if model is None:
        return lambda batch: batch
    return lambda batch: np.asarray(model.predict_on_batch(preprocess(batch, preprocessing)))


def _features(
    arch: Architecture, opts: TrainOptions, dataset: Dataset, splits: list[str], settings: Settings, progress: bool
) -> tuple[dict[str, FeatureSplit], str, bool, list[str]]:
    """Cached outputs of the frozen layers; with ``flip``, also those of the mirrored training images.

    The mirrored features are a separate cache, so turning flip on reuses the plain one.
    """
    lower, _ = split_model(arch.model, arch.cut)
    forward = _forward_fn(lower, arch.preprocessing)
    describe = {"backbone": opts.backbone, "cut": arch.cut, "data": opts.data}

    def cached(parts: list[str], mirrored: bool) -> tuple[dict[str, FeatureSplit], str, bool, list[str]]:
        key = features_key(
            backbone=opts.backbone,
            weights=arch.weights.sha256 if arch.weights else None,
            input_size=opts.input_size,
            cut=arch.cut,
            dataset=dataset.fingerprint,
            splits=parts,
            flip=mirrored,
        )
        directory = settings.cache_dir / "features" / key
        found = load_cache(directory)
        if found is not None:
            return found, key, True, []
        fn = (lambda batch: forward(batch[:, :, ::-1, :])) if mirrored else forward
        built, skipped = build_cache(
            directory,
            fn,
            dataset,
            parts,
            opts.input_size,
            opts.extract_batch_size,
            describe={**describe, "mirrored": mirrored},
            progress=progress,
        )
        return built, key, False, [skipped.summary()] if skipped.total and not mirrored else []

    feats, key, hit, messages = cached(splits, False)
    messages.insert(0, f"feature cache {'hit' if hit else 'built'}: {key}")
    if opts.flip and "train" in feats:
        mirror, mirror_key, mirror_hit, _ = cached(["train"], True)
        if mirror["train"].keys != feats["train"].keys:
            raise ImgsimError(f"mirrored feature cache {mirror_key} does not match {key}; delete both and rerun")
        feats["train"].x_flip = mirror["train"].x
        messages.append(f"mirrored feature cache {'hit' if mirror_hit else 'built'}: {mirror_key}")
        hit = hit and mirror_hit
    return feats, key, hit, messages
