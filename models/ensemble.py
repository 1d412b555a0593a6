"""Trained-model loading, split prediction and the majority-vote ensemble ("democracy")."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.architecture import split_model
from models.backbones import preprocess
from models.datasets import Dataset, SkipCounter, open_dataset
from models.embed import stream_forward
from models.errors import ImgsimError
from models.features import load_cache
from models.settings import Settings, get_settings
from models.train import MANIFEST, MODEL_FILE

if TYPE_CHECKING:
    import keras


@dataclass
class TrainedModel:
    path: Path
    model: keras.Model
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.path.name)


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise ImgsimError(f"{model_dir} is not a trained model directory (no {MANIFEST}); run `imgsim train` first")
    return json.loads(path.read_text())


def load_trained(model_dir: Path) -> TrainedModel:
    import keras

    manifest = read_manifest(model_dir)
    file = Path(model_dir) / MODEL_FILE
    if not file.is_file():
        raise ImgsimError(f"{file} is missing: the model directory is incomplete")
    return TrainedModel(Path(model_dir), keras.saving.load_model(file, compile=False), manifest)


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
    if dataset.class_names != m["class_names"]:
        raise ImgsimError(f"dataset classes {dataset.class_names} differ from model {trained.name}'s {m['class_names']}")
    cache = None
    if m.get("feature_cache") and m["dataset"]["fingerprint"] == dataset.fingerprint:
        cache = load_cache(settings.cache_dir / "features" / m["feature_cache"])
    if cache is not None and split in cache:
        _, upper = split_model(trained.model, m["cut_layer"])
        feats = cache[split]
        probs = np.concatenate([
            np.asarray(upper.predict_on_batch(np.asarray(feats.x[i : i + batch_size], dtype=np.float32)))
            for i in range(0, len(feats), batch_size)
        ])
        return feats.keys, feats.y, probs

    def forward(batch: np.ndarray) -> np.ndarray:
        return np.asarray(trained.model.predict_on_batch(preprocess(batch, m["preprocessing"])))

    keys: list[str] = []
    labels: list[int] = []
    outs: list[np.ndarray] = []
    for items, out in stream_forward(forward, dataset, dataset.select(split), m["input_size"], batch_size,
                                     SkipCounter(), progress, desc=f"{trained.name} {split}"):
        keys += [i.key for i in items]
        labels += [i.label for i in items]
        outs.append(out)
    return keys, np.array(labels, dtype=np.int64), np.concatenate(outs)


def majority_vote(probs: list[np.ndarray]) -> np.ndarray:
    """Each model votes for its top class; ties go to the class with the larger summed probability."""
    n_classes = probs[0].shape[1]
    votes = sum(np.eye(n_classes, dtype=np.float64)[p.argmax(axis=1)] for p in probs)
    tie_break = sum(p.astype(np.float64) for p in probs) / (len(probs) + 1)  # < 1: only decides ties
    return np.argmax(votes + tie_break, axis=1)


def evaluate_ensemble(
    model_dirs: list[Path], data: str, split: str = "test", settings: Settings | None = None, progress: bool = True
) -> dict[str, Any]:
    """Accuracy of each member and of their majority vote on the same images."""
    if len(model_dirs) < 2:
        raise ImgsimError("an ensemble needs at least 2 models")
    settings = settings or get_settings()
    results: dict[str, Any] = {"split": split, "members": []}
    per_model: list[tuple[list[str], np.ndarray, np.ndarray]] = []
    for d in model_dirs:
        trained = load_trained(d)
        t = trained.manifest["training"]
        dataset = open_dataset(data, val_fraction=t["val_fraction"], seed=t["seed"], max_per_class=t["max_per_class"],
                               settings=settings)
        keys, labels, probs = predict_split(trained, dataset, split, settings, progress=progress)
        per_model.append((keys, labels, probs))
        results["members"].append({"name": trained.name, "backbone": trained.manifest["backbone"],
                                   "accuracy": float((probs.argmax(1) == labels).mean()), "count": len(keys)})
    common = sorted(set.intersection(*(set(k) for k, _, _ in per_model)))
    if not common:
        raise ImgsimError("the models share no images of that split")
    aligned = []
    for keys, labels, probs in per_model:
        pos = {k: i for i, k in enumerate(keys)}
        idx = np.array([pos[k] for k in common])
        aligned.append((labels[idx], probs[idx]))
    labels = aligned[0][0]
    vote = majority_vote([p for _, p in aligned])
    results.update(count=len(common), ensemble_accuracy=float((vote == labels).mean()))
    return results
