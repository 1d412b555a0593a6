"""Transfer learning: train the head (and optionally the last block) on cached features.

``train`` reads in the order of a Keras example: data, model, fit, evaluate, write. The
frozen part of the network runs once per image and its outputs are cached
(:mod:`models.features`); the fit itself is in :mod:`models.fitting`.

MODEL_DIR: ``model.keras``, ``manifest.json`` (written last: its presence means the run
completed), ``history.json``, ``curves.png``, ``confusion.png``, ``report.txt``. While
training, ``MODEL_DIR/.state`` holds what is needed to resume after an interruption.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.architecture import (
    CLASSIFIER_LAYER,
    EMBEDDING_DIM,
    EMBEDDING_LAYER,
    Architecture,
    build_architecture,
)
from models.data import Dataset, open_dataset
from models.errors import ImgsimError
from models.features import FeatureSplit, extract_features
from models.fitting import Fitted, fit_upper, predict_features
from models.manifests import (
    MANIFEST_FILE,
    MODEL_FILE,
    Metrics,
    ModelDataset,
    ModelManifest,
    Training,
    WeightsRef,
    write_manifest,
)
from models.report import confusion_matrix, format_report, per_class_report, plot_confusion, plot_curves
from models.settings import Settings, get_settings

STATE_DIR = ".state"


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
    manifest: ModelManifest
    cache_hit: bool
    resumed_from_epoch: int = 0
    messages: list[str] = field(default_factory=list)


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
    # 1. Data: the labelled dataset (val carved from train) and an optional separate test set.
    dataset, test_set = _open_data(opts, settings)
    state, done_epochs = _prepare_out(opts)

    # 2. Model: ImageNet backbone + embedding head, and the frozen part's cached outputs.
    keras.utils.set_random_seed(opts.seed)
    n_classes = len(dataset.class_names)
    arch = build_architecture(opts.backbone, opts.input_size, n_classes, opts.trainable, opts.dropout, settings)  # type: ignore[arg-type]  # trainable was checked against its choices by TrainOptions
    features = extract_features(arch, opts, dataset, test_set, settings, progress)

    # 3. Fit the layers above the cut (resumable; the time survives an interruption).
    t0 = time.perf_counter()
    try:
        fitted = fit_upper(arch, opts, features.splits, state, done_epochs, settings, progress, callbacks)
    finally:
        timing = _add_timing(
            state, extract=features.seconds, fit=time.perf_counter() - t0, wall=time.perf_counter() - started
        )

    # 4. Evaluate on the test split, if there is one.
    metrics = _metrics(fitted)
    if "test" in features.splits and len(features.splits["test"]):
        metrics.test_accuracy, metrics.test_count = _evaluate(fitted, features.splits["test"], dataset, opts)
    else:
        features.messages.append("no test split: pass --test-data SPEC to evaluate on separate images")

    # 5. Write MODEL_DIR; the manifest last.
    training = Training(
        **opts.fingerprint_fields(),
        epochs=opts.epochs,
        extract_seconds=round(timing["extract"], 1),
        fit_seconds=round(timing["fit"], 1),
        wall_seconds=round(timing["wall"] + time.perf_counter() - started - timing["this_run_wall"], 1),
        resumed_from_epoch=done_epochs,
        feature_cache_hit=features.hit,
    )
    manifest = _write_model_dir(opts, arch, dataset, features.key, fitted, training, metrics)
    shutil.rmtree(state, ignore_errors=True)
    return TrainResult(opts.out, manifest, features.hit, done_epochs, features.messages)


def _open_data(opts: TrainOptions, settings: Settings) -> tuple[Dataset, Dataset | None]:
    dataset = open_dataset(
        opts.data, val_fraction=opts.val_fraction, seed=opts.seed, max_per_class=opts.max_per_class,
        labels="folders", settings=settings,
    )  # fmt: skip
    counts = dataset.splits()
    if len(dataset.class_names) < 2:
        raise ImgsimError(f"{opts.data}: need at least 2 classes to train, found {dataset.class_names}")
    if not counts.get("train") or not counts.get("val"):
        raise ImgsimError(f"{opts.data}: need train and validation images (have {counts}); check --val-fraction")
    test_set = None
    if opts.test_data:
        test_set = open_dataset(opts.test_data, val_fraction=0.0, labels="folders", settings=settings)
    if test_set and test_set.class_names != dataset.class_names:
        raise ImgsimError(f"--test-data classes {test_set.class_names} differ from {dataset.class_names}")
    return dataset, test_set


def _prepare_out(opts: TrainOptions) -> tuple[Path, int]:
    """Create MODEL_DIR (or resume in it); returns the state dir and the completed epochs."""
    out, state = opts.out, opts.out / STATE_DIR
    fields = opts.fingerprint_fields()
    if (out / MANIFEST_FILE).is_file() and not opts.force:
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


def _add_timing(state: Path, **seconds: float) -> dict[str, float]:
    """Accumulate extract/fit/wall seconds across interrupted and resumed runs."""
    path = state / "timing.json"
    total = json.loads(path.read_text()) if path.is_file() else {}
    for k, v in seconds.items():
        total[k] = total.get(k, 0.0) + v
    path.write_text(json.dumps(total))
    return {**total, "this_run_wall": seconds.get("wall", 0.0)}


def _metrics(fitted: Fitted) -> Metrics:
    h, best = fitted.history, fitted.best_epoch
    return Metrics(
        val_loss=h["val_loss"][best],
        val_accuracy=h["val_accuracy"][best],
        best_epoch=best + 1,
        epochs_run=len(h["val_loss"]),
    )


def _title(opts: TrainOptions) -> str:
    depth = "from scratch" if opts.backbone == "simple-cnn" else opts.trainable
    return f"{opts.backbone} ({depth}, {opts.input_size}px)"


def _evaluate(fitted: Fitted, test: FeatureSplit, dataset: Dataset, opts: TrainOptions) -> tuple[float, int]:
    """Test accuracy and count; writes report.txt, report.json and confusion.png."""
    out, names = opts.out, dataset.class_names
    pred = predict_features(fitted.upper, test, opts.batch_size).argmax(axis=1)
    cm = confusion_matrix(test.y, pred, len(names))
    acc = float((pred == test.y).mean())
    rows = per_class_report(cm, names)
    (out / "report.txt").write_text(format_report(rows, acc))
    (out / "report.json").write_text(json.dumps({"accuracy": acc, "classes": rows, "confusion": cm.tolist()}, indent=2))
    plot_confusion(cm, names, out / "confusion.png", f"{_title(opts)}: test accuracy {acc:.4f}")
    return acc, len(test)


def _write_model_dir(
    opts: TrainOptions,
    arch: Architecture,
    dataset: Dataset,
    cache_key: str,
    fitted: Fitted,
    training: Training,
    metrics: Metrics,
) -> ModelManifest:
    out = opts.out
    plot_curves(fitted.history, out / "curves.png", _title(opts))
    (out / "history.json").write_text(json.dumps(fitted.history, indent=2))
    tmp_model = out / "model.part.keras"
    arch.model.save(tmp_model)
    os.replace(tmp_model, out / MODEL_FILE)
    manifest = ModelManifest(
        name=out.resolve().name,
        backbone=opts.backbone,
        weights=WeightsRef(source=arch.weights.source, sha256=arch.weights.sha256) if arch.weights else None,
        input_size=opts.input_size,
        preprocessing=arch.preprocessing,
        class_names=dataset.class_names,
        embedding_layer=EMBEDDING_LAYER,
        embedding_dim=EMBEDDING_DIM,
        classifier_layer=CLASSIFIER_LAYER,
        cut_layer=arch.cut,
        feature_cache=cache_key,
        training=training,
        dataset=ModelDataset(
            spec=str(opts.data), kind=dataset.kind, fingerprint=dataset.fingerprint, splits=dataset.splits()
        ),
        metrics=metrics,
    )
    write_manifest(out, manifest)
    return manifest
