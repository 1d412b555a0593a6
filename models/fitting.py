"""The Keras part of training: mini-batches from cached features, the optimiser, the fit.

Separate from :mod:`models.train`, which decides what to train on and writes MODEL_DIR.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.architecture import Architecture, build_architecture, split_model
from models.errors import ImgsimError
from models.features import FeatureSplit
from models.settings import Settings

if TYPE_CHECKING:
    import keras

    from models.train import TrainOptions


def shift_batch(x: np.ndarray, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Translate each (H, W, C) feature map by up to ``cells`` cells, edges replicated.

    Convolutions commute with translation, so shifting a cached map by one cell is
    (away from the borders) what the frozen layers would output for the image shifted
    by the layer's stride: for ResNet50's conv4 at 128 px, 16 px, i.e. the classic
    "pad 4 and random-crop" CIFAR-10 augmentation at the original 32 px.
    """
    if cells <= 0 or x.ndim != 4:
        return x
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (cells, cells), (cells, cells), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 2 * cells + 1, size=(2, len(x)))
    return np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(len(x))])


def _batches(
    split: FeatureSplit,
    batch_size: int,
    shuffle: bool,
    seed: int,
    flip: bool = False,
    shift: int = 0,
    one_hot: int = 0,
) -> keras.utils.PyDataset:
    """``one_hot=n``: labels as (N, n) one-hot rows (what a label-smoothed loss needs)."""
    import keras

    class Batches(keras.utils.PyDataset):
        """Mini-batches from memory-mapped features; shuffled per epoch, augmented when asked."""

        def __init__(self) -> None:
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order = self.rng.permutation(len(split)) if shuffle else np.arange(len(split))

        def __len__(self) -> int:
            return math.ceil(len(split) / batch_size)

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            idx = np.sort(self.order[i * batch_size : (i + 1) * batch_size])  # sorted: sequential reads
            x = np.asarray(split.x[idx])
            if flip and split.x_flip is not None:
                mirrored = self.rng.random(len(idx)) < 0.5
                x[mirrored] = split.x_flip[idx[mirrored]]
            x = shift_batch(x, shift, self.rng)
            y = np.eye(one_hot, dtype=np.float32)[split.y[idx]] if one_hot else split.y[idx]
            return x.astype(np.float32), y

        def on_epoch_end(self) -> None:
            if shuffle:
                self.order = self.rng.permutation(len(split))

    return Batches()


def _epoch_logger(state: Path, upper: keras.Model, patience: int) -> keras.callbacks.Callback:
    """Append each epoch to history.json, keep the best weights, stop after ``patience`` bad epochs.

    Written by hand (instead of EarlyStopping + ModelCheckpoint) because their "best so far"
    is lost when an interrupted run resumes; here it is derived from the saved history.
    """
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            path = state / "history.json"
            self.history: dict[str, list[float]] = json.loads(path.read_text()) if path.is_file() else {}

        def _best(self) -> tuple[float, int]:
            losses = self.history.get("val_loss", [])
            if not losses:
                return math.inf, -1
            i = int(np.argmin(losses))
            return losses[i], i

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            best, _ = self._best()
            for k, v in (logs or {}).items():
                self.history.setdefault(k, []).append(float(v))
            val_loss = float((logs or {}).get("val_loss", math.inf))
            if val_loss < best:
                upper.save_weights(state / "best.weights.h5")
            (state / "history.json").write_text(json.dumps(self.history))
            _, best_epoch = self._best()
            if len(self.history.get("val_loss", [])) - 1 - best_epoch >= patience:
                self.model.stop_training = True

    return EpochLogger()


def _trainable_copy(arch: Architecture, opts: TrainOptions, n_classes: int, settings: Settings) -> keras.Model:
    """The model whose upper part is fitted: ``arch.model`` itself, or a bfloat16 twin.

    With ``mixed_precision`` the twin computes in bfloat16 (faster on CPUs with AVX512-BF16
    or AMX) but keeps float32 variables; its weights are copied back into the float32
    model afterwards, so the saved model, the feature cache and the service stay float32.
    """
    import keras

    if not opts.mixed_precision:
        return arch.model
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        twin = build_architecture(opts.backbone, opts.input_size, n_classes, opts.trainable, opts.dropout, settings)  # type: ignore[arg-type]  # trainable was checked against its choices by TrainOptions
    finally:
        keras.config.set_dtype_policy(previous)
    twin.model.set_weights(arch.model.get_weights())
    return twin.model


def _optimizer(opts: TrainOptions, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    import keras

    if opts.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(opts.learning_rate, opts.epochs * steps_per_epoch)
        return keras.optimizers.Adam(lr)
    if opts.lr_schedule != "constant":
        raise ImgsimError(f"unknown --lr-schedule {opts.lr_schedule!r}; choose constant or cosine")
    return keras.optimizers.Adam(opts.learning_rate)


@dataclass
class Fitted:
    history: dict[str, list[float]]
    best_epoch: int  # 0-based
    upper: Any  # keras.Model above the cut, with the best weights


def fit_upper(
    arch: Architecture,
    opts: TrainOptions,
    feats: dict[str, FeatureSplit],
    state: Path,
    done_epochs: int,
    settings: Settings,
    progress: bool,
    callbacks: list[Any] | None = None,
) -> Fitted:
    """Fit the layers above the cut, resumable from ``state``; ``arch.model`` ends with the best weights."""
    import keras

    n_classes = int(arch.model.output.shape[-1])
    fitted = _trainable_copy(arch, opts, n_classes, settings)
    _, upper = split_model(fitted, arch.cut)
    one_hot = n_classes if opts.label_smoothing > 0 else 0
    train_batches = _batches(
        feats["train"], opts.batch_size, True, opts.seed + done_epochs, opts.flip, opts.shift, one_hot
    )
    loss = (
        keras.losses.CategoricalCrossentropy(label_smoothing=opts.label_smoothing)
        if one_hot
        else keras.losses.SparseCategoricalCrossentropy()
    )
    upper.compile(optimizer=_optimizer(opts, len(train_batches)), loss=loss, metrics=["accuracy"])
    cbs: list[Any] = [
        keras.callbacks.BackupAndRestore(str(state / "backup")),
        _epoch_logger(state, upper, opts.patience),
    ]
    if opts.tensorboard:
        cbs.append(keras.callbacks.TensorBoard(str(opts.tensorboard)))
    upper.fit(
        train_batches,
        validation_data=_batches(feats["val"], opts.batch_size, False, 0, one_hot=one_hot),
        epochs=opts.epochs,
        callbacks=cbs + list(callbacks or []),
        verbose=1 if progress else 2,
    )
    upper.load_weights(state / "best.weights.h5")
    if fitted is not arch.model:
        arch.model.set_weights(fitted.get_weights())
    _, upper = split_model(arch.model, arch.cut)
    history = json.loads((state / "history.json").read_text())
    return Fitted(history, int(np.argmin(history["val_loss"])), upper)


def predict_features(upper: keras.Model, split: FeatureSplit, batch_size: int) -> np.ndarray:
    """Class probabilities of cached features (the test split)."""
    return np.asarray(upper.predict(_batches(split, batch_size, False, 0), verbose=0))
