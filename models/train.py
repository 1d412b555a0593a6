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
from models.features import FeatureSplit, build_cache, cache_key, load_cache
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


def _batches(split: FeatureSplit, batch_size: int, shuffle: bool, seed: int, flip: bool) -> keras.utils.PyDataset:
    import keras

    class Batches(keras.utils.PyDataset):
        """Mini-batches from memory-mapped features; shuffled per epoch, mirrored copies mixed in."""

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
            return x.astype(np.float32), split.y[idx]

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
        if json.loads(saved.read_text()) != fields:
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
    lower, _ = split_model(arch.model, arch.cut)
    key = cache_key(
        backbone=opts.backbone,
        weights=arch.weights.sha256 if arch.weights else None,
        input_size=opts.input_size,
        cut=arch.cut,
        dataset=dataset.fingerprint,
        splits=splits,
        flip=opts.flip,
    )
    directory = settings.cache_dir / "features" / key
    cached = load_cache(directory)
    if cached is not None:
        return cached, key, True, []
    flip_splits = ("train",) if opts.flip else ()
    forward = _forward_fn(lower, arch.preprocessing)
    features, skipped = build_cache(
        directory,
        forward,
        dataset,
        splits,
        opts.input_size,
        opts.extract_batch_size,
        flip_splits=flip_splits,
        describe={"backbone": opts.backbone, "cut": arch.cut, "data": opts.data},
        progress=progress,
    )
    return features, key, False, [skipped.summary()] if skipped.total else []


def _add_timing(state: Path, **seconds: float) -> dict[str, float]:
    """Accumulate extract/fit/wall seconds across interrupted and resumed runs."""
    path = state / "timing.json"
    total = json.loads(path.read_text()) if path.is_file() else {}
    for k, v in seconds.items():
        total[k] = total.get(k, 0.0) + v
    path.write_text(json.dumps(total))
    return {**total, "this_run_wall": seconds.get("wall", 0.0)}


def _evaluate(upper: keras.Model, split: FeatureSplit, batch_size: int) -> np.ndarray:
    return np.asarray(upper.predict(_batches(split, batch_size, False, 0, False), verbose=0))


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
    messages.insert(0, f"feature cache {'hit' if hit else 'built'}: {key} ({extract_seconds:.1f} s)")

    _, upper = split_model(arch.model, arch.cut)
    upper.compile(
        optimizer=keras.optimizers.Adam(opts.learning_rate),
        loss="sparse_categorical_crossentropy",
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
            _batches(feats["train"], opts.batch_size, True, opts.seed + done_epochs, opts.flip),
            validation_data=_batches(feats["val"], opts.batch_size, False, 0, False),
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
