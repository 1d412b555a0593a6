"""Loading a trained MODEL_DIR and running it: split predictions, embeddings + probabilities."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.architecture import split_model
from models.backbones import preprocess
from models.data import Dataset, SkipCounter, open_dataset
from models.embed import decoded_batches, stream_forward
from models.errors import ImgsimError
from models.features import FeatureSplit, features_key, load_cache
from models.manifests import MODEL_FILE, ModelManifest, read_model_manifest
from models.openvino_runtime import Samples
from models.pretrained import build_pretrained, parse_spec, pretrained_manifest
from models.settings import Settings, get_settings

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    path: Path
    model: keras.Model
    manifest: ModelManifest

    @property
    def name(self) -> str:
        return self.manifest.name


def load_trained(model_dir: Path | str) -> TrainedModel:
    """A MODEL_DIR from `imgsim train`, or a backbone name (``resnet50``, ``vgg16:128``)."""
    import keras

    if parsed := parse_spec(model_dir):
        return TrainedModel(Path(str(model_dir)), build_pretrained(*parsed), pretrained_manifest(*parsed))
    manifest = read_model_manifest(Path(model_dir))
    file = Path(model_dir) / MODEL_FILE
    if not file.is_file():
        raise ImgsimError(f"{file} is missing: the model directory is incomplete")
    return TrainedModel(Path(model_dir), keras.saving.load_model(file, compile=False), manifest)


def open_as_trained(
    manifest: ModelManifest,
    data: str,
    settings: Settings,
    val_fraction: float | None = None,
    seed: int | None = None,
    max_per_class: int | None = None,
    labels: str = "auto",
) -> Dataset:
    """``data`` split as the model's training split it (unless overridden), so that its
    validation images stay out of its test set and the training feature cache applies.
    A model without training (a backbone name) takes the settings' split."""
    t = manifest.training
    return open_dataset(
        data,
        val_fraction=t.val_fraction if t and val_fraction is None else val_fraction,
        seed=t.seed if t and seed is None else seed,
        max_per_class=t.max_per_class if t and max_per_class is None else max_per_class,
        labels=labels,
        settings=settings,
    )


def training_cache(
    manifest: ModelManifest, dataset: Dataset, splits: Sequence[str], settings: Settings
) -> dict[str, FeatureSplit] | None:
    """The training run's cached cut-layer features for ``splits`` of ``dataset``, if they apply.

    They apply only to the very dataset the model was trained on (same fingerprint, so the
    same files, split and cap) and only when the cache still holds every requested split.
    """
    if not manifest.feature_cache or not manifest.dataset or manifest.dataset.fingerprint != dataset.fingerprint:
        return None
    cache = load_cache(settings.cache_dir / "features" / manifest.feature_cache)
    if cache is None or not all(s in cache for s in splits):
        return None
    return cache


def mirrored_training_cache(
    manifest: ModelManifest, dataset: Dataset, split: str, settings: Settings
) -> FeatureSplit | None:
    """Cached cut-layer features of the mirrored images of ``split``, if training built them.

    ``imgsim train --flip`` caches the mirrored training images; flip test-time
    augmentation reuses them instead of running the lower network again.
    """
    if not manifest.feature_cache or not manifest.dataset or manifest.dataset.fingerprint != dataset.fingerprint:
        return None
    key = features_key(
        backbone=manifest.backbone,
        weights=manifest.weights.sha256 if manifest.weights else None,
        input_size=manifest.input_size,
        cut=manifest.cut_layer,
        dataset=dataset.fingerprint,
        splits=[split],
        flip=True,
    )
    cache = load_cache(settings.cache_dir / "features" / key)
    return cache.get(split) if cache is not None else None


TTA_MODES = ("none", "flip")


def check_tta(tta: str) -> str:
    if tta not in TTA_MODES:
        raise ImgsimError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_MODES)}")
    return tta


def combine_views(
    emb: np.ndarray, emb_mirrored: np.ndarray, probs: np.ndarray, probs_mirrored: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flip TTA: the sum of the two views' embeddings (normalised later, like every embedding)
    and the mean of their class probabilities."""
    return emb + emb_mirrored, (probs + probs_mirrored) / 2


def predict_split(
    trained: TrainedModel,
    dataset: Dataset,
    split: str,
    settings: Settings | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, labels, class probabilities) for one split.

    Uses the training feature cache when this is the dataset the model was trained on
    (same fingerprint), so only the small upper part runs; otherwise the whole model.
    """
    settings = settings or get_settings()
    m = trained.manifest
    if dataset.class_names != m.class_names:
        raise ImgsimError(f"dataset classes {dataset.class_names} differ from model {trained.name}'s {m.class_names}")
    cache = training_cache(m, dataset, [split], settings)
    if cache is not None:
        _, upper = split_model(trained.model, m.cut_layer)
        feats = cache[split]
        probs = np.concatenate(
            [
                np.asarray(upper.predict_on_batch(np.asarray(feats.x[i : i + batch_size], dtype=np.float32)))
                for i in range(0, len(feats), batch_size)
            ]
        )
        return feats.keys, feats.y, probs

    def forward(batch: np.ndarray) -> np.ndarray:
        return np.asarray(trained.model.predict_on_batch(preprocess(batch, m.preprocessing)))

    keys: list[str] = []
    labels: list[int] = []
    outs: list[np.ndarray] = []
    for items, out in stream_forward(
        forward,
        dataset,
        dataset.select(split),
        m.input_size,
        batch_size,
        SkipCounter(),
        progress,
        desc=f"{trained.name} {split}",
    ):
        keys += [i.key for i in items]
        labels += [i.label for i in items]
        outs.append(out)
    return keys, np.array(labels, dtype=np.int64), np.concatenate(outs)


def _samples_source(manifest: ModelManifest, settings: Settings, collection: Dataset | None) -> Dataset | None:
    """IMGSIM_CALIBRATION_DATA, else the model's training data, else the collection being indexed."""
    try:
        if settings.calibration_data:
            return open_dataset(settings.calibration_data, labels="none", settings=settings)
        if manifest.training:
            return open_as_trained(manifest, manifest.training.data, settings)
    except ImgsimError as exc:
        log.info("no images for the runtime conversion: %s", exc)
        return None
    return collection


def model_samples(manifest: ModelManifest, settings: Settings, collection: Dataset | None = None) -> Samples:
    """Images for runtime conversions: ``calibration`` from the model's training split (int8),
    ``check`` from its validation split (else test), both decoded at the model's input size.

    ``IMGSIM_CALIBRATION_DATA`` replaces the training data (a service host may not have the
    data the model was trained on); a backbone name, which has none, calibrates on the
    ``collection`` it indexes.
    """

    source = functools.cache(lambda: _samples_source(manifest, settings, collection))  # listed once for both kinds

    def samples(kind: str, n: int) -> tuple[np.ndarray, list[str], str] | None:
        dataset = source()
        if dataset is None:
            return None
        order = ("train",) if kind == "calibration" else ("val", "test", "train")
        items = next((its for s in order if (its := [i for i in dataset.items if i.split == s])), [])
        if not items:
            return None
        rng = np.random.default_rng(settings.seed + (kind == "check"))
        pick = [items[i] for i in sorted(rng.choice(len(items), min(n, len(items)), replace=False))]
        batches = list(decoded_batches(dataset, pick, manifest.input_size, 64, SkipCounter()))
        if not batches:
            return None
        keys = [item.key for its, _ in batches for item in its]
        return np.concatenate([b for _, b in batches]), keys, dataset.spec

    return samples
