"""Loading a trained MODEL_DIR and running it: split predictions, embeddings + probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.architecture import split_model
from models.backbones import preprocess
from models.data import Dataset, SkipCounter, open_dataset
from models.embed import stream_forward
from models.errors import ImgsimError
from models.features import FeatureSplit, features_key, load_cache
from models.manifests import MODEL_FILE, ModelManifest, read_model_manifest
from models.pretrained import build_pretrained, parse_spec, pretrained_manifest
from models.settings import Settings, get_settings

if TYPE_CHECKING:
    import keras


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
    manifest = read_model_manifest(model_dir)
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
    if not manifest.feature_cache or manifest.dataset.fingerprint != dataset.fingerprint:
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
    if not manifest.feature_cache or manifest.dataset.fingerprint != dataset.fingerprint:
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
        raise ImgsimError(
            f"dataset classes {dataset.class_names} differ from model {trained.name}'s {m['class_names']}"
        )
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


class FrozenForward:
    """A tf.function's graph with every variable replaced by a constant.

    Why: TensorFlow's oneDNN convolutions convert their weights to oneDNN's blocked layout
    on every call when the weights are variables, but only once when they are constants.
    That conversion is a fixed cost per call, which batch-1 calls and small micro-batches pay
    in full (docs/performance.md, D1). Outputs match the variable graph to float rounding
    (test_frozen_graph_matches_keras).
    """

    def __init__(self, forward: Any) -> None:
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        self.graph = convert_variables_to_constants_v2(forward.get_concrete_function())
        # Called through a tf.function with the original input signature, not directly: the
        # converted function has no structured signature, so each direct call first failed to
        # bind, formatted the whole input tensor into an error message, discarded it and fell
        # back to the flat signature, with the GIL held (docs/performance.md, D1).
        graph = self.graph
        self._call = tf.function(lambda x: graph(x), input_signature=forward.input_signature)

    def __call__(self, x: np.ndarray) -> Any:
        return self._call(x)


class Embedder:
    """One forward pass -> (penultimate-layer embedding, class probabilities).

    The indexer and the service both need the 1024-d embedding and the softmax output of
    the same image; a two-output model gives both from a single call.
    """

    def __init__(self, trained: TrainedModel, freeze: bool | None = None) -> None:
        import keras

        m = trained.manifest
        self.trained = trained
        self.input_size: int = m.input_size
        self.preprocessing = m.preprocessing
        self.class_names: list[str] = m.class_names
        import tensorflow as tf

        self.has_classifier = bool(m.classifier_layer)
        embedding = trained.model.get_layer(m.embedding_layer).output
        outputs = [embedding, trained.model.output] if self.has_classifier else embedding
        self.model = keras.Model(trained.model.input, outputs)
        self._upper: keras.Model | None = None
        # One graph for every batch size: predict_on_batch would retrace per new batch shape,
        # which the service's variable-size micro-batches would hit constantly.
        size = self.input_size
        self._forward = tf.function(
            lambda x: self.model(x, training=False),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)],
        )
        self.frozen = get_settings().freeze_graph if freeze is None else freeze
        if self.frozen:
            self._forward = FrozenForward(self._forward)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 RGB (N, S, S, 3) -> (float32 (N, D) embeddings, float32 (N, C) probabilities);
        C is 0 for a model without a classifier."""
        out = self._forward(preprocess(batch, self.preprocessing))
        if not self.has_classifier:
            emb = out[0] if isinstance(out, list | tuple) else out
            return emb.numpy().astype(np.float32, copy=False), np.zeros((len(batch), 0), np.float32)
        emb, probs = out
        return emb.numpy().astype(np.float32, copy=False), probs.numpy().astype(np.float32, copy=False)

    def embed(self, batch: np.ndarray, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
        """As ``__call__``; with ``tta="flip"`` each image and its mirror image go through one
        call (a batch twice as large) and their outputs are combined (``combine_views``)."""
        if check_tta(tta) == "none":
            return self(batch)
        n = len(batch)
        emb, probs = self(np.concatenate([batch, batch[:, :, ::-1]]))
        return combine_views(emb[:n], emb[n:], probs[:n], probs[n:])

    def head_from_features(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Same outputs from cached cut-layer features (frozen models: only the head runs)."""
        if self._upper is None:
            _, self._upper = split_model(self.model, self.trained.manifest.cut_layer)
        emb, probs = self._upper.predict_on_batch(np.asarray(features, dtype=np.float32))
        return np.asarray(emb, dtype=np.float32), np.asarray(probs, dtype=np.float32)
