"""Upload an image: search (top-k similar), classify, or both in one forward pass."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from app.batching import Result
from app.deps import Registry, Settings
from app.imaging import check_content_type, decode_upload
from app.registry import LoadedModel
from app.schemas import (
    AnalyzeResponse,
    ClassifyResponse,
    ClassScore,
    Neighbour,
    Prediction,
    SearchResponse,
    error_responses,
)
from models.errors import BadInput, Busy, Conflict, TooLarge

router = APIRouter(prefix="/v1", tags=["search"])

VOTE_K = 5
ERRORS = error_responses(404, 413, 415, 422, 503)

ImageFile = Annotated[UploadFile, File(description="JPEG, PNG, WebP, BMP or GIF (first frame)")]
K = Annotated[
    int, Form(ge=1, le=1024, description="How many results, 1..IMGSIM_MAX_K (100 unless configured); default 5")
]
ModelName = Annotated[
    str | None, Form(max_length=200, description="Model name (default: the active model)", examples=[None])
]


@dataclass
class SearchForm:
    """The multipart form of a search: the image, k and the model."""

    file: UploadFile
    k: int
    model: str | None


async def _search_form(file: ImageFile, k: K = 5, model: ModelName = None) -> SearchForm:
    return SearchForm(file, k, model)


Search = Annotated[SearchForm, Depends(_search_form)]


@dataclass
class Stages:
    """``time.perf_counter()`` marks of one request, for its Server-Timing header."""

    start: float  # the request arrived (before FastAPI parsed its form)
    read: float = 0.0  # the form is parsed and the upload read
    decoded: float = 0.0  # the image is the model's input


def server_timing(stages: Stages, result: Result, total_ms: float) -> str:
    """The Server-Timing header (W3C; browsers' developer tools show it): where the time went, in ms.

    parse: parsing the form and reading the upload; decode: the image to the model's input; queue: waiting for
    a model call; infer: that call (forward pass and search), shared by its whole batch;
    total: as ``took_ms``.
    """
    ms = {
        "parse": (stages.read - stages.start) * 1000,
        "decode": (stages.decoded - stages.read) * 1000,
        "queue": result.queue_seconds * 1000,
        "infer": result.infer_seconds * 1000,
        "total": total_ms,
    }
    return ", ".join(f"{name};dur={v:.3f}" for name, v in ms.items())


async def _run(
    request: Request, file: UploadFile, k: int, model: str | None, registry: Registry, settings: Settings
) -> tuple[LoadedModel, Result, Stages]:
    """Decode the upload and submit it to the model's batcher; the model is resolved once."""
    stages = Stages(getattr(request.state, "start", None) or time.perf_counter())  # set as the request arrived
    if k > settings.max_k:
        raise BadInput(f"k must be between 1 and {settings.max_k}, got {k}")
    loaded = registry.get(model)  # a model switch mid-request does not affect this request
    request.state.model = loaded.name
    check_content_type(file.content_type)
    if loaded.batcher.full:  # refuse before decoding: under overload, work on a refused image is wasted
        raise Busy(f"busy: queue full ({loaded.batcher.max_queue} images waiting); retry shortly")
    if (file.size or 0) > settings.max_upload_bytes:
        raise TooLarge(f"upload larger than the {settings.max_upload_bytes}-byte limit")
    data = await file.read()
    stages.read = time.perf_counter()
    image = await run_in_threadpool(decode_upload, data, loaded.embedder.input_size, settings.max_image_pixels)
    stages.decoded = time.perf_counter()
    result = await loaded.batcher.submit(image, max(k, VOTE_K))
    return loaded, result, stages


def _neighbours(loaded: LoadedModel, result: Result, k: int) -> list[Neighbour]:
    ids = [int(i) for i in result.ids[:k] if i >= 0]
    rows = result.context.labels_and_keys(ids)  # the index version that answered
    return [
        Neighbour(id=i, score=round(float(s), 6), label=name, key=key, url=f"/v1/images/{i}?model={loaded.name}")
        for i, s, (name, key) in zip(ids, result.scores[:k], rows)
    ]


def _prediction(loaded: LoadedModel, result: Result, top: int = 5) -> Prediction | None:
    if not loaded.embedder.has_classifier:
        return None
    names = loaded.embedder.class_names
    order = np.argsort(result.probs)[::-1][:top]
    voters = [n for n in result.context.label_names([int(i) for i in result.ids[:VOTE_K] if i >= 0]) if n]
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


def _took_ms(response: Response, stages: Stages, result: Result) -> float:
    """The request's time so far (``took_ms``), also sent with its parts as Server-Timing."""
    took = round((time.perf_counter() - stages.start) * 1000, 2)
    response.headers["Server-Timing"] = server_timing(stages, result, took)
    return took


@router.post("/search", response_model=SearchResponse, responses=ERRORS, summary="Top-k similar indexed images")
async def search(
    request: Request, response: Response, form: Search, registry: Registry, settings: Settings
) -> SearchResponse:
    loaded, result, stages = await _run(request, form.file, form.k, form.model, registry, settings)
    took = _took_ms(response, stages, result)
    return SearchResponse(model=loaded.name, took_ms=took, results=_neighbours(loaded, result, form.k))


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=error_responses(404, 409, 413, 415, 422, 503),
    summary="Predicted class + neighbour vote",
)
async def classify(
    request: Request,
    response: Response,
    file: ImageFile,
    registry: Registry,
    settings: Settings,
    model: ModelName = None,
) -> ClassifyResponse:
    if not registry.get(model).embedder.has_classifier:
        raise Conflict(f"model {registry.get(model).name!r} has no classifier (ImageNet features); use /v1/search")
    loaded, result, stages = await _run(request, file, VOTE_K, model, registry, settings)
    took = _took_ms(response, stages, result)
    return ClassifyResponse(model=loaded.name, took_ms=took, prediction=_prediction(loaded, result))


@router.post(
    "/analyze",
    response_model=AnalyzeResponse,
    responses=ERRORS,
    summary="Classification and top-k search from one forward pass",
)
async def analyze(
    request: Request, response: Response, form: Search, registry: Registry, settings: Settings
) -> AnalyzeResponse:
    loaded, result, stages = await _run(request, form.file, form.k, form.model, registry, settings)
    return AnalyzeResponse(
        model=loaded.name,
        took_ms=_took_ms(response, stages, result),
        prediction=_prediction(loaded, result),
        results=_neighbours(loaded, result, form.k),
    )
