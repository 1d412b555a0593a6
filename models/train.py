"""Transfer learning: train the head (and optionally the last block) on cached features.

Flow: open the dataset -> build backbone + head -> split at the cut -> cache the frozen
part's outputs (once per image; reused on later runs) -> fit the upper part with early
stopping on validation loss -> evaluate on the test split -> write MODEL_DIR.

MODEL_DIR: ``model.keras``, ``manifest.json`` (written last: its presence means the run
completed), ``history.json``, ``curves.png``, ``confusion.png``, ``report.txt``. While
training, ``MODEL_DIR/.state`` holds what is needed to resume after an interruption.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.architecture import (
    CLASSIFIER_LAYER,
    EMBEDDING_DIM,
    EMBEDDING_LAYER,
    Architecture,
    build_architecture,
    split_model,
)
from models.backbones import Preprocessing, preprocess
from models.datasets import Dataset, open_dataset
from models.errors import ImgsimError
from models.features import FeatureSplit, build_cache, features_key, load_cache
from models.report import confusion_matrix, format_report, per_class_report, plot_confusion, plot_curves
from models.settings import Settings, get_settings

if TYPE_CHECKING:
    import keras

MANIFEST = "manifest.json"
MODEL_FILE = "model.keras"
STATE_DIR = ".state"


def package_version() -> str:
    try:
        return version("imgsim")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class TrainOptions:
    backbone: str
    data: str
    out: Path
    input_size: int = 224
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    val_fraction: float = 0.1
    max_per_class: int | None = None
    seed: int = 0
    trainable: str = "frozen"
    patience: int = 3
    dropout: float = 0.5
    flip: bool = False
    shift: int = 0
    lr_schedule: str = "constant"
    label_smoothing: float = 0.0
    mixed_precision: bool = False
    tensorboard: Path | None = None
    test_data: str | None = None
    force: bool = False
    extract_batch_size: int = 32

    def fingerprint_fields(self) -> dict[str, Any]:
        """Options that must match for a run to resume (output path and flags excluded)."""
        d = asdict(self)
        for k in ("out", "force", "tensorboard", "epochs", "extract_batch_size"):
            d.pop(k)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


@dataclass
class TrainResult:
    out: Path
    manifest: dict[str, Any]
    cache_hit: bool
    resumed_from_epoch: int = 0
    messages: list[str] = field(default_factory=list)


def _forward_fn(model: keras.Model | None, preprocessing: Preprocessing) -> Any:
    """uint8 batch -> model output; the identity (raw pixels, uint8) when there is no lower model."""
    if model is None:
        return lambda batch: batch
    return lambda batch: np.asarray(model.predict_on_batch(preprocess(batch, preprocessing)))


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


def _prepare_out(opts: TrainOptions) -> tuple[Path, int]:
    """Create MODEL_DIR (or resume in it); returns the state dir and the completed epochs."""
    out, state = opts.out, opts.out / STATE_DIR
    fields = opts.fingerprint_fields()
    if (out / MANIFEST).is_file() and not opts.force:
        raise ImgsimError(f"{out} already holds a trained model; pass --force to overwrite it")
    if opts.force and out.exists():
        shutil.rmtree(out)
    saved = state / "options.json"
    if saved.is_file():
        # Options added in a later version are absent from older state; their defaults apply.
        defaults = TrainOptions(backbone=opts.backbone, data=opts.data, out=opts.out).fingerprint_fields()
        if {**defaults, **json.loads(saved.read_text())} != fields:
            raise ImgsimError(
                f"{out} holds an interrupted run with different options; rerun with the same options "
                "to resume, or pass --force to start over"
            )
        history = json.loads((state / "history.json").read_text()) if (state / "history.json").is_file() else {}
        return state, len(history.get("loss", []))
    state.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(fields))
    return state, 0


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


def _add_timing(state: Path, **seconds: float) -> dict[str, float]:
    """Accumulate extract/fit/wall seconds across interrupted and resumed runs."""
    path = state / "timing.json"
    total = json.loads(path.read_text()) if path.is_file() else {}
    for k, v in seconds.items():
        total[k] = total.get(k, 0.0) + v
    path.write_text(json.dumps(total))
    return {**total, "this_run_wall": seconds.get("wall", 0.0)}


def _evaluate(upper: keras.Model, split: FeatureSplit, batch_size: int) -> np.ndarray:
    return np.asarray(upper.predict(_batches(split, batch_size, False, 0), verbose=0))


def _trainable_copy(arch: Architecture, opts: TrainOptions, n_classes: int, settings: Settings) -> keras.Model:
    """The model whose upper part is fitted: ``arch.model`` itself, or a bfloat16 twin.

    With ``mixed_precision`` the twin computes in bfloat16 (about 1.5x faster on CPUs with
    AVX512-BF16) but keeps float32 variables; its weights are copied back into the float32
    model afterwards, so the saved model, the feature cache and the service stay float32.
    """
    import keras

    if not opts.mixed_precision:
        return arch.model
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        twin = build_architecture(opts.backbone, opts.input_size, n_classes, opts.trainable, opts.dropout, settings)  # type: ignore[arg-type]
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


def train(
    opts: TrainOptions,
    settings: Settings | None = None,
    progress: bool = True,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train one model end to end; see the module docstring for what lands in ``opts.out``."""
    import keras

    settings = settings or get_settings()
    started = time.perf_counter()
    dataset = open_dataset(
        opts.data, val_fraction=opts.val_fraction, seed=opts.seed, max_per_class=opts.max_per_class, settings=settings
    )
    counts = dataset.splits()
    if len(dataset.class_names) < 2:
        raise ImgsimError(f"{opts.data}: need at least 2 classes to train, found {dataset.class_names}")
    if not counts.get("train") or not counts.get("val"):
        raise ImgsimError(f"{opts.data}: need train and validation images (have {counts}); check --val-fraction")
    test_set = open_dataset(opts.test_data, val_fraction=0.0, settings=settings) if opts.test_data else None
    if test_set and test_set.class_names != dataset.class_names:
        raise ImgsimError(f"--test-data classes {test_set.class_names} differ from {dataset.class_names}")

    state, done_epochs = _prepare_out(opts)
    keras.utils.set_random_seed(opts.seed)
    arch = build_architecture(
        opts.backbone,
        opts.input_size,
        len(dataset.class_names),
        opts.trainable,  # type: ignore[arg-type]
        opts.dropout,
        settings,
    )
    splits = ["train", "val"] + (["test"] if "test" in counts and not test_set else [])
    t0 = time.perf_counter()
    feats, key, hit, messages = _features(arch, opts, dataset, splits, settings, progress)
    if test_set:
        test_feats, _, _, more = _features(
            arch, opts, test_set, ["test"] if "test" in test_set.splits() else ["train"], settings, progress
        )
        feats["test"] = next(iter(test_feats.values()))
        messages += more
    extract_seconds = time.perf_counter() - t0
    messages.append(f"feature extraction: {extract_seconds:.1f} s")

    fitted = _trainable_copy(arch, opts, len(dataset.class_names), settings)
    _, upper = split_model(fitted, arch.cut)
    one_hot = len(dataset.class_names) if opts.label_smoothing > 0 else 0
    train_batches = _batches(
        feats["train"], opts.batch_size, True, opts.seed + done_epochs, opts.flip, opts.shift, one_hot
    )
    loss = (
        keras.losses.CategoricalCrossentropy(label_smoothing=opts.label_smoothing)
        if one_hot
        else keras.losses.SparseCategoricalCrossentropy()
    )
    upper.compile(
        optimizer=_optimizer(opts, len(train_batches)),
        loss=loss,
        metrics=["accuracy"],
    )
    cbs: list[Any] = [
        keras.callbacks.BackupAndRestore(str(state / "backup")),
        _epoch_logger(state, upper, opts.patience),
    ]
    if opts.tensorboard:
        cbs.append(keras.callbacks.TensorBoard(str(opts.tensorboard)))
    t0 = time.perf_counter()
    try:
        upper.fit(
            train_batches,
            validation_data=_batches(feats["val"], opts.batch_size, False, 0, one_hot=one_hot),
            epochs=opts.epochs,
            callbacks=cbs + list(callbacks or []),
            verbose=1 if progress else 2,
        )
    finally:  # keep the time spent so far, also when interrupted, so a resumed run reports the total
        timing = _add_timing(
            state, extract=extract_seconds, fit=time.perf_counter() - t0, wall=time.perf_counter() - started
        )
    extract_seconds, fit_seconds = timing["extract"], timing["fit"]
    upper.load_weights(state / "best.weights.h5")
    if fitted is not arch.model:
        arch.model.set_weights(fitted.get_weights())
    _, upper = split_model(arch.model, arch.cut)
    history = json.loads((state / "history.json").read_text())
    best_epoch = int(np.argmin(history["val_loss"]))

    metrics: dict[str, Any] = {
        "val_loss": history["val_loss"][best_epoch],
        "val_accuracy": history["val_accuracy"][best_epoch],
        "best_epoch": best_epoch + 1,
        "epochs_run": len(history["val_loss"]),
    }
    out = opts.out
    depth = "from scratch" if opts.backbone == "simple-cnn" else opts.trainable
    title = f"{opts.backbone} ({depth}, {opts.input_size}px)"
    test = feats.get("test")
    if test is not None and len(test):
        probs = _evaluate(upper, test, opts.batch_size)
        pred = probs.argmax(axis=1)
        cm = confusion_matrix(test.y, pred, len(dataset.class_names))
        acc = float((pred == test.y).mean())
        rows = per_class_report(cm, dataset.class_names)
        metrics.update(test_accuracy=acc, test_count=len(test))
        (out / "report.txt").write_text(format_report(rows, acc))
        (out / "report.json").write_text(
            json.dumps({"accuracy": acc, "classes": rows, "confusion": cm.tolist()}, indent=2)
        )
        plot_confusion(cm, dataset.class_names, out / "confusion.png", f"{title}: test accuracy {acc:.4f}")
    else:
        messages.append("no test split: pass --test-data SPEC to evaluate on separate images")

    plot_curves(history, out / "curves.png", title)
    (out / "history.json").write_text(json.dumps(history, indent=2))
    tmp_model = out / "model.part.keras"
    arch.model.save(tmp_model)
    os.replace(tmp_model, out / MODEL_FILE)

    manifest = {
        "format": 1,
        "name": out.resolve().name,
        "backbone": opts.backbone,
        "weights": {"source": arch.weights.source, "sha256": arch.weights.sha256} if arch.weights else None,
        "input_size": opts.input_size,
        "preprocessing": arch.preprocessing,
        "class_names": dataset.class_names,
        "embedding_layer": EMBEDDING_LAYER,
        "embedding_dim": EMBEDDING_DIM,
        "classifier_layer": CLASSIFIER_LAYER,
        "cut_layer": arch.cut,
        "feature_cache": key,
        "training": {
            **opts.fingerprint_fields(),
            "epochs": opts.epochs,
            "extract_seconds": round(extract_seconds, 1),
            "fit_seconds": round(fit_seconds, 1),
            "wall_seconds": round(timing["wall"] + time.perf_counter() - started - timing["this_run_wall"], 1),
            "resumed_from_epoch": done_epochs,
            "feature_cache_hit": hit,
        },
        "dataset": {"spec": str(opts.data), "kind": dataset.kind, "fingerprint": dataset.fingerprint, "splits": counts},
        "metrics": metrics,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package_version": package_version(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(state, ignore_errors=True)
    return TrainResult(out, manifest, hit, done_epochs, messages)
