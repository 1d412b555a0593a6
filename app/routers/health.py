"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import MetricsDep, Registry
from app.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
@router.head(
    "/healthz", response_model=Health, summary="The process is alive (headers only)", operation_id="healthz_head"
)
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Ready,
    responses={503: {"model": Ready}},
    summary="Models and indexes loaded and consistent; reports CPU or GPU",
)
def readyz(registry: Registry) -> Response:
    counts: dict[str, int] = {}
    problems = []
    for name, m in registry.models.items():
        try:
            m.store.check()
            counts[name] = m.store.size
        except Exception as exc:  # a broken index must show here, not crash the probe
            problems.append(f"{name}: {exc}")
    ok = bool(counts) and not problems
    body = Ready(
        status="ready" if ok else "; ".join(problems) or "no models loaded",
        device=registry.device,
        models=counts,
        runtimes={name: m.embedder.runtime for name, m in registry.models.items()},
    )
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
def metrics(registry: Registry, m: MetricsDep) -> Response:
    for name, loaded in registry.models.items():
        m.queue_depth.labels(name).set(loaded.batcher.depth)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
