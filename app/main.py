"""The FastAPI application: routers, lifespan model loading, error mapping, metrics."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from app import openapi
from app.config import ServiceSettings, get_service_settings
from app.duplicate_jobs import DuplicateJobs
from app.imaging import decode_pool
from app.memory import RequestCounter, release_free_memory, trim_when_idle, use_large_image_blocks
from app.middleware import ObserveMiddleware
from app.observability import Metrics
from app.registry import Cluster, ModelRegistry, detect_device
from app.routers import health, images, models, search
from app.thumbnails import ThumbnailCache
from models.data.budget import DECODES
from models.errors import Busy, ImgsimError, NotReady
from models.manifests import package_version

log = logging.getLogger("imgsim.app")
STATIC = Path(__file__).parent / "static"
HOW_TO_SEND = "send the image as the multipart field 'file' (curl -F file=@q.jpg)"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load every model and index once, before the first request; stop batchers at the end."""
    settings: ServiceSettings = app.state.settings
    registry = ModelRegistry(settings)
    registry.cluster = app.state.cluster
    registry.retire = app.state.requests.retire
    registry.device = detect_device()
    log.info("inference device: %s", registry.device)
    if not settings.models:
        raise NotReady("no models configured: pass --model DIR --index DIR, or set IMGSIM_MODELS")
    for pair in settings.models:
        await run_in_threadpool(registry.load, pair)
    registry.on_batch = app.state.metrics.observe_batch
    for name, m in registry.models.items():
        app.state.metrics.runtime.labels(name, m.embedder.runtime).set(1)
    # TensorFlow and Keras leave millions of long-lived Python objects; every full garbage
    # collection would walk them all, stalling the event loop for tens of ms (seen in the
    # py-spy profile of the service benchmark). Freezing moves them out of the collector's view.
    gc.collect()
    gc.freeze()
    release_free_memory()  # loading and the graph optimiser free several copies of the weights (D7)
    use_large_image_blocks()
    registry.start()
    trimmer = asyncio.get_running_loop().create_task(trim_when_idle(app.state.requests))
    app.state.registry = registry
    app.state.decode_pool = decode_pool(settings.max_decodes)
    DECODES.set_limit(settings.max_decodes)  # every decode in the process: uploads, thumbnails, hashes
    try:
        yield
    finally:
        trimmer.cancel()
        app.state.duplicate_jobs.stop()
        await registry.stop()
        app.state.decode_pool.shutdown(wait=False, cancel_futures=True)


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route accepts at this request's path."""
    return [
        method
        for method in ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
        if any(r.matches({**scope, "method": method})[0] is Match.FULL for r in app.router.routes)
    ]


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's answer, except that a 405's Allow lists every method of the path (Starlette
    names only the first route that matched it: GET /v1/images/{id} hid its DELETE)."""
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers)


def create_app(settings: ServiceSettings | None = None, cluster: Cluster | None = None) -> FastAPI:
    """The service; ``cluster``: the shared writer and active model when it is one of several replicas."""
    app = FastAPI(
        title="imgsim",
        version=package_version(),
        summary="Image similarity search: classify an image and find its most similar indexed images.",
        lifespan=lifespan,
    )
    app.state.settings = settings = settings or get_service_settings()
    app.state.cluster = cluster
    openapi.install(app, settings.max_k, settings.max_batch_size)
    app.state.metrics = Metrics()
    app.state.requests = RequestCounter()
    app.state.decodes = asyncio.Semaphore(settings.max_decodes)
    app.state.duplicate_jobs = DuplicateJobs(app.state.requests)
    app.state.thumbnails = ThumbnailCache(settings.cache_dir / "thumbnails", settings.max_image_pixels)
    for r in (search.router, models.router, models.collection_router, images.router, health.router):
        app.include_router(r)

    @app.get("/", include_in_schema=False)
    def index_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.add_middleware(
        ObserveMiddleware,
        metrics=app.state.metrics,
        requests=app.state.requests,
        max_upload=settings.max_upload_bytes,
        body_seconds=settings.body_seconds,
    )

    @app.exception_handler(ImgsimError)
    async def imgsim_error(request: Request, exc: ImgsimError) -> JSONResponse:
        """The one mapping from errors to answers: the error carries its status and headers."""
        if isinstance(exc, Busy):
            app.state.metrics.rejected.labels(getattr(request.state, "model", "")).inc()
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]  # Starlette's handler type is loose

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        """One string, as every other error; a missing image says how to send one."""
        errors = exc.errors()
        if any(e["type"] == "missing" and e["loc"][-1] == "file" for e in errors):
            media = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "multipart/form-data":
                return JSONResponse({"detail": f"unsupported content type {media[:64]!r}: {HOW_TO_SEND}"}, 415)
            return JSONResponse({"detail": f"missing the image: {HOW_TO_SEND}"}, 422)
        too_many = [e for e in errors if e["type"] == "too_long" and e["loc"][-1] == "file"]
        if too_many:
            got = len(too_many[0].get("input") or ())
            return JSONResponse(
                {"detail": f"send one image as the field 'file', got {got} (/v1/search takes several)"}, 422
            )
        msgs = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in errors]
        return JSONResponse({"detail": "; ".join(msgs)}, status_code=422)

    return app
