"""Loaded models: list them, switch the active one."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from app import ensemble
from app.deps import Jobs, Registry, Settings, require_admin
from app.schemas import (
    ActivateRequest,
    ActiveResponse,
    DuplicateGroup,
    DuplicatesPending,
    DuplicatesResponse,
    ModelInfo,
    ModelsResponse,
    ReloadResponse,
    error_responses,
)
from indexer.duplicates import DEFAULT_THRESHOLD, HASH_FLOOR
from models.errors import ImgsimError

router = APIRouter(prefix="/v1/models", tags=["models"])
collection_router = APIRouter(prefix="/v1", tags=["images"])
FIRST_WAIT_SECONDS = 1.0  # a small index's duplicates come back in the first answer
POLL_SECONDS = 0.05


@router.get("", response_model=ModelsResponse, summary="Loaded models and which one is active")
def list_models(registry: Registry, settings: Settings) -> ModelsResponse:
    active = registry.active
    out = []
    for name, m in registry.models.items():
        man = m.manifest
        metrics = {
            k: v
            for k, v in (man.metrics.model_dump() if man.metrics else {}).items()
            if isinstance(v, int | float) or v is None
        }
        out.append(
            ModelInfo(
                name=name,
                active=name == active,
                backbone=man.backbone,
                input_size=man.input_size,
                runtime=m.embedder.runtime,
                classes=man.class_names,
                embedding_dim=man.embedding_dim,
                has_classifier=m.embedder.has_classifier,
                index_size=m.store.size,
                index_type=m.store.manifest.index_type,
                index_version=m.store.path.name,
                tta=m.store.manifest.tta,
                metrics=metrics,
            )
        )
    try:
        voters = [m.name for m in ensemble.members(registry, settings)]
    except ImgsimError:
        voters = []
    return ModelsResponse(active=active, models=out, ensemble=voters)


@router.put(
    "/active",
    response_model=ActiveResponse,
    dependencies=[Depends(require_admin)],
    responses=error_responses(400, 401, 403, 404, 422),
    summary="Switch the default model (admin)",
)
def set_active(body: ActivateRequest, request: Request, registry: Registry) -> ActiveResponse:
    previous = registry.active
    registry.set_active(body.name)
    request.state.model = body.name
    return ActiveResponse(active=body.name, previous=previous)


@router.post(
    "/reload",
    response_model=ReloadResponse,
    dependencies=[Depends(require_admin)],
    responses=error_responses(401, 403),
    summary="Serve the newest version of every index now (admin)",
)
async def reload_indexes(registry: Registry) -> ReloadResponse:
    """The service also checks every IMGSIM_RELOAD_SECONDS; this is for scripts that cannot wait."""
    return ReloadResponse(versions=await registry.reload())


@collection_router.get(
    "/duplicates",
    response_model=DuplicatesResponse,
    responses={
        202: {"model": DuplicatesPending, "description": "Still computing: ask again after Retry-After seconds"},
        **error_responses(404, 422, 503),
    },
    summary="Groups of near-duplicate images in a model's index",
)
async def duplicates(
    registry: Registry,
    jobs: Jobs,
    threshold: Annotated[
        float, Query(ge=HASH_FLOOR, le=1.0, description="Cosine at or above which two images pair")
    ] = DEFAULT_THRESHOLD,
    model: Annotated[str | None, Query(max_length=200, description="Model (default: active)")] = None,
    hash_check: Annotated[
        bool,
        Query(
            description=f"Also pair images below the threshold (cosine >= {HASH_FLOOR}) whose perceptual hashes agree"
        ),
    ] = True,
) -> DuplicatesResponse | JSONResponse:
    """Computed in the background, once per index version and parameters: the first call
    (and any call while it runs) answers 202 with the progress, unless it finishes within
    about a second; later calls answer from the result at once."""
    loaded = registry.get(model)
    job = jobs.get(loaded.store, threshold, hash_check)
    for _ in range(round(FIRST_WAIT_SECONDS / POLL_SECONDS)):  # the event loop stays free meanwhile
        if job.finished.is_set():
            break
        await asyncio.sleep(POLL_SECONDS)
    if job.error is not None:
        raise job.error
    if job.groups is None:
        body = DuplicatesPending(model=loaded.name, status=job.phase, done=job.done, total=job.total)
        return JSONResponse(body.model_dump(), 202, {"Retry-After": "1"})
    out = [DuplicateGroup(ids=g.ids, keys=g.keys, max_score=g.max_score) for g in job.groups]
    return DuplicatesResponse(model=loaded.name, threshold=threshold, hash_check=hash_check, groups=out)
