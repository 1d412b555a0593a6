"""FastAPI dependencies: shared state and the admin API key, as ``Annotated`` types."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from app.config import ServiceSettings
from app.duplicate_jobs import DuplicateJobs
from app.observability import Metrics
from app.registry import ModelRegistry
from app.thumbnails import ThumbnailCache
from models.errors import Forbidden, Unauthorized

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Needed when IMGSIM_API_KEY is set.")


# async on purpose: FastAPI runs a plain ``def`` dependency in a worker thread, a thread
# hop per dependency per request; these only read app state.
async def _registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def _settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def _thumbnails(request: Request) -> ThumbnailCache:
    return request.app.state.thumbnails


async def _jobs(request: Request) -> DuplicateJobs:
    return request.app.state.duplicate_jobs


Registry = Annotated[ModelRegistry, Depends(_registry)]
Settings = Annotated[ServiceSettings, Depends(_settings)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
Thumbnails = Annotated[ThumbnailCache, Depends(_thumbnails)]
Jobs = Annotated[DuplicateJobs, Depends(_jobs)]


def _key_matches(key: str | None, settings: ServiceSettings) -> bool:
    expected = settings.api_key
    if not key or expected is None:
        return False
    return secrets.compare_digest(key.encode(), expected.get_secret_value().encode())


async def _is_admin(key: Annotated[str | None, Depends(api_key_header)], settings: Settings) -> bool:
    return _key_matches(key, settings)


# True when the request carries the configured API key: it may see server paths. Without a
# configured key nobody is admin in this sense (everyone could send nothing).
Admin = Annotated[bool, Depends(_is_admin)]


async def require_admin(key: Annotated[str | None, Depends(api_key_header)], settings: Settings) -> None:
    """401 without a key, 403 with a wrong one -- only when an API key is configured."""
    if settings.api_key is None:
        return
    if not key:
        raise Unauthorized("this operation needs an API key (header X-API-Key)")
    if not _key_matches(key, settings):
        raise Forbidden("invalid API key")
