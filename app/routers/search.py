"""Upload an image: search (top-k similar), classify, or both in one forward pass."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from app.batching import QueueFull, Result
from app.config import ServiceSettings
from app.deps import get_registry, get_settings_dep, resolve_model
from app.imaging import check_content_type, decode_upload
from app.registry import LoadedModel, ModelRegistry
from app.schemas import (
    AnalyzeResponse,
    ClassifyResponse,
    ClassScore,
    ErrorResponse,
    Neighbour,
    Prediction,
    SearchResponse,
)

router = APIRouter(prefix="/v1", tags=["search"])

ERRORS = {
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Upload too large or too many pixels"},
    415: {"model": ErrorResponse, "description": "Not a supported image"},
    422: {"model": ErrorResponse, "description": "Corrupt image or invalid parameter"},
    503: {"model": ErrorResponse, "description": "Model queue full; retry after the Retry-After seconds"},
}
VOTE_K = 5
CHUNK = 1 << 16


async def _read_limited(file: UploadFile, limit: int) -> bytes:
    """Read at most ``limit`` bytes; 413 as soon as the upload is larger."""
    parts, total = [], 0
    while chunk := await file.read(CHUNK):
        total += len(chunk)
        if total > limit:
            raise HTTPException(413, f"upload larger than the {limit}-byte limit")
        parts.append(chunk)
    return b"".join(parts)


async def _run(
    request: Request, file: UploadFile, k: int, model: str | None, registry: ModelRegistry, settings: ServiceSettings
) -> tuple[LoadedModel, Result, float]:
    start = time.perf_counter()
    if not 1 <= k <= settings.max_k:
        raise HTTPException(422, f"k must be between 1 and {settings.max_k}, got {k}")
    loaded = resolve_model(registry, model)  # resolved once: a model switch mid-request does not affect it
    request.state.model = loaded.name
    check_content_type(file.content_type)
    if loaded.batcher.full:  # refuse before decoding: under overload, work on a refused image is wasted
        raise QueueFull(f"queue full ({loaded.batcher.max_queue} images waiting)")
    data = await _read_limited(file, settings.max_upload_bytes)
    args = (data, loaded.embedder.input_size, settings.max_image_pixels)
    if len(data) <= settings.inline_decode_bytes:
        image = decode_upload(*args)
    else:
        image = await run_in_threadpool(decode_upload, *args)
    result = await loaded.batcher.submit(image, max(k, VOTE_K))
    return loaded, result, start


def _neighbours(loaded: LoadedModel, result: Result, k: int) -> list[Neighbour]:
    ids = [int(i) for i in result.ids[:k] if i >= 0]
    names = loaded.store.label_names(ids)
    return [
        Neighbour(id=i, score=round(float(s), 6), label=name, url=f"/v1/images/{i}?model={loaded.name}")
        for i, s, name in zip(ids, result.scores[:k], names)
    ]


def _prediction(loaded: LoadedModel, result: Result, top: int = 5) -> Prediction:
    names = loaded.embedder.class_names
    order = np.argsort(result.probs)[::-1][:top]
    voters = [n for n in loaded.store.label_names([int(i) for i in result.ids[:VOTE_K] if i >= 0]) if n]
    votes = Counter(voters)
    vote = None
    if votes:
        # Ties go to the label whose best neighbour ranks highest.
        best = max(votes.values())
        vote = next(n for n in voters if votes[n] == best)
    return Prediction(
        label=names[int(order[0])],
        probability=round(float(result.probs[order[0]]), 6),
        top=[ClassScore(label=names[int(i)], probability=round(float(result.probs[i]), 6)) for i in order],
        neighbour_vote=vote,
    )


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


@router.post("/search", response_model=SearchResponse, responses=ERRORS, summary="Top-k similar indexed images")
async def search(
    request: Request,
    file: UploadFile = File(description="JPEG, PNG, WebP, BMP or GIF (first frame)"),
    k: int = Form(5, description="How many results (1..IMGSIM_MAX_K, default 5)"),
    model: str | None = Form(None, description="Model name; default: the active model"),
    registry: ModelRegistry = Depends(get_registry),
    settings: ServiceSettings = Depends(get_settings_dep),
) -> SearchResponse:
    loaded, result, start = await _run(request, file, k, model, registry, settings)
    return SearchResponse(model=loaded.name, took_ms=_ms(start), results=_neighbours(loaded, result, k))


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS, summary="Predicted class + neighbour vote")
async def classify(
    request: Request,
    file: UploadFile = File(description="JPEG, PNG, WebP, BMP or GIF (first frame)"),
    model: str | None = Form(None, description="Model name; default: the active model"),
    registry: ModelRegistry = Depends(get_registry),
    settings: ServiceSettings = Depends(get_settings_dep),
) -> ClassifyResponse:
    loaded, result, start = await _run(request, file, VOTE_K, model, registry, settings)
    return ClassifyResponse(model=loaded.name, took_ms=_ms(start), prediction=_prediction(loaded, result))


@router.post(
    "/analyze",
    response_model=AnalyzeResponse,
    responses=ERRORS,
    summary="Classification and top-k search from one forward pass",
)
async def analyze(
    request: Request,
    file: UploadFile = File(description="JPEG, PNG, WebP, BMP or GIF (first frame)"),
    k: int = Form(5, description="How many results (1..IMGSIM_MAX_K, default 5)"),
    model: str | None = Form(None, description="Model name; default: the active model"),
    registry: ModelRegistry = Depends(get_registry),
    settings: ServiceSettings = Depends(get_settings_dep),
) -> AnalyzeResponse:
    loaded, result, start = await _run(request, file, k, model, registry, settings)
    return AnalyzeResponse(
        model=loaded.name,
        took_ms=_ms(start),
        prediction=_prediction(loaded, result),
        results=_neighbours(loaded, result, k),
    )
