"""Ensembles of trained models: the majority vote ("democracy") and the soft vote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ImgsimError
from models.inference import load_trained, open_as_trained, predict_split
from models.settings import Settings, get_settings


def majority_vote(probs: list[np.ndarray]) -> np.ndarray:
    """Each model votes for its top class; ties go to the class with the larger summed probability."""
    n_classes = probs[0].shape[1]
    votes = sum(np.eye(n_classes, dtype=np.float64)[p.argmax(axis=1)] for p in probs)
    tie_break = sum(p.astype(np.float64) for p in probs) / (len(probs) + 1)  # < 1: only decides ties
    return np.argmax(votes + tie_break, axis=1)


def soft_vote(probs: list[np.ndarray]) -> np.ndarray:
    """The top class of the members' mean probabilities."""
    return np.argmax(np.mean([p.astype(np.float64) for p in probs], axis=0), axis=1)


def evaluate_ensemble(
    model_dirs: list[Path], data: str, split: str = "test", settings: Settings | None = None, progress: bool = True
) -> dict[str, Any]:
    """Accuracy of each member and of their hard (majority) and soft votes on the same images."""
    if len(model_dirs) < 2:
        raise ImgsimError("an ensemble needs at least 2 models")
    settings = settings or get_settings()
    results: dict[str, Any] = {"split": split, "members": []}
    per_model: list[tuple[list[str], np.ndarray, np.ndarray]] = []
    for d in model_dirs:
        trained = load_trained(d)
        dataset = open_as_trained(trained.manifest, data, settings)
        keys, labels, probs = predict_split(trained, dataset, split, settings, progress=progress)
        per_model.append((keys, labels, probs))
        results.setdefault("class_names", trained.manifest.class_names)
        results["members"].append(
            {
                "name": trained.name,
                "backbone": trained.manifest.backbone,
                "accuracy": float((probs.argmax(1) == labels).mean()),
                "count": len(keys),
            }
        )
    common = sorted(set.intersection(*(set(k) for k, _, _ in per_model)))
    if not common:
        raise ImgsimError("the models share no images of that split")
    aligned = []
    for keys, labels, probs in per_model:
        pos = {k: i for i, k in enumerate(keys)}
        idx = np.array([pos[k] for k in common])
        aligned.append((labels[idx], probs[idx]))
    labels = aligned[0][0]
    member_probs = [p for _, p in aligned]
    hard, soft = majority_vote(member_probs), soft_vote(member_probs)
    results.update(
        count=len(common),
        ensemble_accuracy=float((hard == labels).mean()),
        soft_vote_accuracy=float((soft == labels).mean()),
        hard_predictions=hard.tolist(),
        soft_predictions=soft.tolist(),
        labels=labels.tolist(),
    )
    return results
