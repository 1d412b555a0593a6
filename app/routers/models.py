"""Loaded models: list them, switch the active one."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request

from app.deps import get_registry, require_admin
from app.registry import ModelRegistry
from app.schemas import ActivateRequest, ActiveResponse, ErrorResponse, ModelInfo, ModelsResponse

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelsResponse, summary="Loaded models and which one is active")
def list_models(registry: ModelRegistry = Depends(get_registry)) -> ModelsResponse:
    active = registry.active
    out = []
    for name, m in registry.models.items():
        man = m.manifest
        metrics = {k: v for k, v in man.get("metrics", {}).items() if isinstance(v, int | float) or v is None}
        out.append(
            ModelInfo(
                name=name,
                active=name == active,
                backbone=man["backbone"],
                input_size=man["input_size"],
                classes=man["class_names"],
                embedding_dim=man["embedding_dim"],
                index_size=m.store.index.ntotal,
                index_type=m.store.manifest["index_type"],
                tta=m.store.manifest.get("tta", "none"),
                metrics=metrics,
            )
        )
    return ModelsResponse(active=active, models=out)


@router.put(
    "/active",
    response_model=ActiveResponse,
    dependencies=[Depends(require_admin)],
    responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    summary="Switch the default model (admin)",
)
def set_active(
    body: ActivateRequest, request: Request, registry: ModelRegistry = Depends(get_registry)
) -> ActiveResponse:
    previous = registry.active
    try:
        registry.set_active(body.name)
    except KeyError:
        raise HTTPException(404, f"unknown model {body.name!r}; loaded: {', '.join(sorted(registry.models))}") from None
    request.state.model = body.name
    return ActiveResponse(active=body.name, previous=previous)
