"""The FastAPI application: routers, lifespan model loading, error mapping, metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse

from app.batching import QueueFull
from app.config import ServiceSettings, get_service_settings
from app.imaging import UploadError
from app.observability import Metrics
from app.registry import ModelRegistry, detect_device
from app.routers import health, images, models, search
from models.errors import ImgsimError
from models.train import package_version

log = logging.getLogger("imgsim.app")
STATIC = Path(__file__).parent / "static"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load every model and index once, before the first request; stop batchers at the end."""
    import faiss

    settings: ServiceSettings = app.state.settings
    faiss.omp_set_num_threads(settings.faiss_threads)
    registry = ModelRegistry(settings)
    registry.device = detect_device()
    log.info("inference device: %s", registry.device)
    if not settings.models:
        raise ImgsimError("no models configured: pass --model DIR --index DIR, or set IMGSIM_MODELS")
    for pair in settings.models:
        await run_in_threadpool(registry.load, pair)
    registry.on_batch = app.state.metrics.observe_batch
    registry.start()
    app.state.registry = registry
    try:
        yield
    finally:
        await registry.stop()


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    app = FastAPI(
        title="imgsim",
        version=package_version(),
        summary="Image similarity search: classify an image and find its most similar indexed images.",
        lifespan=lifespan,
    )
    app.state.settings = settings or get_service_settings()
    app.state.metrics = Metrics()
    for r in (search.router, models.router, images.router, health.router):
        app.include_router(r)

    @app.get("/", include_in_schema=False)
    def index_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.middleware("http")
    async def observe(request: Request, call_next):  # noqa: ANN001, ANN202
        """Early 413 on a declared oversize body; request count + latency per endpoint and model."""
        start = time.perf_counter()
        limit = app.state.settings.max_upload_bytes + 64 * 1024  # multipart framing overhead
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            response = JSONResponse(
                {"detail": f"upload larger than the {app.state.settings.max_upload_bytes}-byte limit"}, status_code=413
            )
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        model = getattr(request.state, "model", "")
        m: Metrics = app.state.metrics
        m.requests.labels(endpoint, model, str(response.status_code)).inc()
        m.latency.labels(endpoint, model).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        app.state.metrics.rejected.labels(getattr(request.state, "model", "")).inc()
        return JSONResponse({"detail": f"busy: {exc}; retry shortly"}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(ImgsimError)
    async def imgsim_error(request: Request, exc: ImgsimError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(msgs)}, status_code=422)

    return app
