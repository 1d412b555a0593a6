"""FastAPI dependencies: shared state and the admin API key."""

from __future__ import annotations

import secrets

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader

from app.config import ServiceSettings
from app.observability import Metrics
from app.registry import LoadedModel, ModelRegistry

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Needed when IMGSIM_API_KEY is set.")


# async on purpose: FastAPI runs a plain ``def`` dependency in a worker thread, a thread
# hop per dependency per request (seen in the service profile); these only read app state.
async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_settings_dep(request: Request) -> ServiceSettings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def resolve_model(registry: ModelRegistry, name: str | None) -> LoadedModel:
    """The named model (or the active one); 404 listing the loaded names otherwise."""
    try:
        return registry.get(name)
    except KeyError:
        known = ", ".join(sorted(registry.models))
        raise HTTPException(404, f"unknown model {name!r}; loaded: {known}") from None


async def require_admin(
    key: str | None = Depends(api_key_header), settings: ServiceSettings = Depends(get_settings_dep)
) -> None:
    """401 without a key, 403 with a wrong one -- only when an API key is configured."""
    if settings.api_key is None:
        return
    if not key:
        raise HTTPException(
            401, "this operation needs an API key (header X-API-Key)", headers={"WWW-Authenticate": "ApiKey"}
        )
    if not secrets.compare_digest(key.encode(), settings.api_key.get_secret_value().encode()):
        raise HTTPException(403, "invalid API key")
