"""model=ensemble in /v1/classify: every member classifies the upload once, then they vote.

The hard vote is the reference work's majority vote ("democracy"), the soft vote the mean
of the members' probabilities; docs/results.md compares the two on CIFAR-10.
"""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import Request, UploadFile

from app.batching import Result
from app.config import ServiceSettings
from app.registry import LoadedModel, ModelRegistry
from app.schemas import ClassScore, EnsembleVote, MemberAnswer, Prediction
from app.uploads import VOTE, Neighbours, Stages, neighbour_labels, neighbour_vote, run_images
from models.ensemble import majority_vote
from models.errors import Conflict

ENSEMBLE = "ensemble"


def members(registry: ModelRegistry, settings: ServiceSettings) -> list[LoadedModel]:
    """The voting models: IMGSIM_ENSEMBLE, or every classifier over the first one's classes."""
    if settings.ensemble:
        chosen = [registry.get(name) for name in settings.ensemble]
    else:
        classifiers = [m for m in registry.models.values() if m.embedder.has_classifier]
        chosen = [m for m in classifiers if m.embedder.class_names == classifiers[0].embedder.class_names]
    if len(chosen) < 2 or any(not m.embedder.has_classifier for m in chosen):
        raise Conflict("an ensemble needs two or more loaded models with classifiers over the same classes")
    if any(m.embedder.class_names != chosen[0].embedder.class_names for m in chosen):
        raise Conflict("the ensemble's models classify different classes: " + ", ".join(m.name for m in chosen))
    return chosen


def vote(
    names: list[str], probs: list[np.ndarray], pooled: Neighbours, index_classes: list[str], top: int = 5
) -> Prediction:
    """The soft vote as a Prediction; the neighbour vote pools every member's nearest images."""
    mean = np.mean(probs, axis=0)
    order = np.argsort(mean)[::-1][:top]
    return Prediction(
        label=names[int(order[0])],
        probability=round(float(mean[order[0]]), 6),
        top=[ClassScore(label=names[int(i)], probability=round(float(mean[i]), 6)) for i in order],
        neighbour_vote=neighbour_vote(pooled, index_classes),
    )


async def classify(
    request: Request, files: list[UploadFile], registry: ModelRegistry, settings: ServiceSettings
) -> tuple[Prediction, EnsembleVote, Stages, Result]:
    """Each member runs once on the upload (all at once, each through its own batcher)."""
    chosen = members(registry, settings)
    runs = await asyncio.gather(*(run_images(request, files, m.name, registry, settings, [VOTE]) for m in chosen))
    request.state.model = ENSEMBLE
    results = [r[0] for _, r, _ in runs]
    names = chosen[0].embedder.class_names
    probs = [r.probs for r in results]
    labels = [neighbour_labels(r.context, r.answer[0]) for r in results]
    classes = results[0].context.manifest.dataset.class_names  # the members' indexes share them (members())
    answers = []
    for m, r, near in zip(chosen, results, labels, strict=False):
        best = int(np.argmax(r.probs))
        answers.append(MemberAnswer(model=m.name, label=names[best], probability=round(float(r.probs[best]), 6),
                                    neighbour_vote=neighbour_vote(near, classes)))  # fmt: skip
    hard = names[int(majority_vote([p[None] for p in probs])[0])]
    pooled: Neighbours = ([n for near in labels for n in near[0]], [s for near in labels for s in near[1]])
    prediction = vote(names, probs, pooled, classes)
    return prediction, EnsembleVote(members=answers, hard_vote=hard, soft_vote=prediction.label), runs[0][2], results[0]
