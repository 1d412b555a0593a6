"""Upload an image: search (top-k similar), classify, or both in one forward pass."""

from __future__ import annotations

import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response

from app import ensemble
from app.batching import Result
from app.deps import Registry, Settings
from app.registry import LoadedModel
from app.schemas import (
    AnalyzeResponse,
    ClassifyResponse,
    ClassScore,
    EmbeddingResponse,
    Neighbour,
    Prediction,
    QueryResults,
    SearchResponse,
    error_responses,
)
from app.uploads import (
    VOTE,
    AnalyzeForm,
    ModelName,
    ModelQuery,
    OneImage,
    Search,
    Stages,
    either,
    known_fields,
    neighbour_labels,
    neighbour_vote,
    run_images,
    search_query,
    server_timing,
)
from indexer.faiss_index import l2_normalise
from indexer.query import Hit
from indexer.store import IndexStore
from models.errors import Conflict

router = APIRouter(prefix="/v1", tags=["search"])
ERRORS = error_responses(400, 404, 413, 415, 422, 503)
ENSEMBLE_HELP = (
    "Model name, as the form field `model` (which it overrides); `ensemble`: every loaded classifier votes "
    "(IMGSIM_ENSEMBLE picks them)"
)


def neighbours(store: IndexStore, model: str, hits: list[Hit]) -> list[Neighbour]:
    rows = store.labels_and_keys([h.id for h in hits])
    return [
        Neighbour(id=h.id, score=round(h.score, 6), label=name, key=key, url=f"/v1/images/{h.id}/file?model={model}")
        for h, (name, key) in zip(hits, rows, strict=False)
    ]


def _prediction(loaded: LoadedModel, result: Result, vote: list[Hit], top: int = 5) -> Prediction | None:
    """The classifier's answer, with the vote of ``vote`` (the hits of the VOTE query)."""
    if not loaded.embedder.has_classifier:
        return None
    names = loaded.embedder.class_names
    order = np.argsort(result.probs)[::-1][:top]
    return Prediction(
        label=names[int(order[0])],
        probability=round(float(result.probs[order[0]]), 6),
        top=[ClassScore(label=names[int(i)], probability=round(float(result.probs[i]), 6)) for i in order],
        neighbour_vote=neighbour_vote(
            neighbour_labels(result.context, vote), result.context.manifest.dataset.class_names
        ),
    )


def _took_ms(response: Response, stages: Stages, result: Result) -> float:
    """The request's time so far (``took_ms``), also sent with its parts as Server-Timing."""
    took = round((time.perf_counter() - stages.start) * 1000, 2)
    response.headers["Server-Timing"] = server_timing(stages, result, took)
    return took


# What the two searching routes share: their errors and their options (form or query).
SEARCHING: dict[str, Any] = {
    "responses": ERRORS,
    "dependencies": [Depends(known_fields("k", "model", "min_score", "label"))],
}


@router.post("/search", response_model=SearchResponse, summary="Top-k similar indexed images", **SEARCHING)
async def search_images(
    request: Request, response: Response, form: Search, registry: Registry, settings: Settings
) -> SearchResponse:
    """Several images (repeated `file` parts) give one result list each, from one batched forward pass."""
    query = search_query(form.k, settings, form.label, form.min_score)
    loaded, results, stages = await run_images(request, form.files, form.model, registry, settings, [query])
    lists = [neighbours(r.context, loaded.name, r.answer[0]) for r in results]
    queries = [QueryResults(file=f.filename or "", results=n) for f, n in zip(form.files, lists, strict=False)]
    took = _took_ms(response, stages, results[0])
    return SearchResponse(model=loaded.name, took_ms=took, results=lists[0], queries=queries)


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=error_responses(400, 404, 409, 413, 415, 422, 503),
    dependencies=[Depends(known_fields("model"))],
    summary="Predicted class + neighbour vote",
)
async def classify(
    request: Request,
    response: Response,
    file: OneImage,
    registry: Registry,
    settings: Settings,
    model: ModelName = None,
    model_query: Annotated[str | None, Query(alias="model", max_length=200, description=ENSEMBLE_HELP)] = None,
) -> ClassifyResponse:
    model = either("model", model, model_query, None)
    if model == ensemble.ENSEMBLE:
        prediction, votes, stages, first = await ensemble.classify(request, file, registry, settings)
        took = _took_ms(response, stages, first)
        return ClassifyResponse(model=ensemble.ENSEMBLE, took_ms=took, prediction=prediction, ensemble=votes)
    loaded = registry.get(model)
    if not loaded.embedder.has_classifier:
        raise Conflict(f"model {loaded.name!r} has no classifier (ImageNet features); use /v1/search")
    loaded, results, stages = await run_images(request, file, loaded.name, registry, settings, [VOTE])
    took = _took_ms(response, stages, results[0])
    return ClassifyResponse(
        model=loaded.name, took_ms=took, prediction=_prediction(loaded, results[0], results[0].answer[0])
    )


@router.post(
    "/analyze", response_model=AnalyzeResponse, summary="Classification and top-k search, one pass", **SEARCHING
)
async def analyze(
    request: Request, response: Response, form: AnalyzeForm, registry: Registry, settings: Settings
) -> AnalyzeResponse:
    query = search_query(form.k, settings, form.label, form.min_score)
    loaded, results, stages = await run_images(request, form.files, form.model, registry, settings, [query, VOTE])
    (result,) = results
    return AnalyzeResponse(
        model=loaded.name,
        took_ms=_took_ms(response, stages, result),
        prediction=_prediction(loaded, result, result.answer[1]),
        results=neighbours(result.context, loaded.name, result.answer[0]),
    )


@router.post(
    "/embed",
    response_model=EmbeddingResponse,
    responses=ERRORS,
    dependencies=[Depends(known_fields("model"))],
    summary="An upload's embedding",
)
async def embed(
    request: Request,
    file: OneImage,
    registry: Registry,
    settings: Settings,
    model: ModelName = None,
    model_query: ModelQuery = None,
) -> EmbeddingResponse:
    model = either("model", model, model_query, None)
    loaded, results, _ = await run_images(request, file, model, registry, settings)  # no search
    v = l2_normalise(results[0].embedding[None])[0]
    return EmbeddingResponse(model=loaded.name, dim=len(v), vector=[round(float(x), 7) for x in v])
