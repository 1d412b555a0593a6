"""Upload an image: search (top-k similar), classify, or both in one forward pass."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as StarletteUploadFile

from app.batching import QueueFull, Result
from app.config import ServiceSettings
from app.deps import get_registry, get_settings_dep, resolve_model
from app.imaging import UploadError, check_content_type, decode_upload
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
DEFAULT_K = 5
CHUNK = 1 << 16
K_QUERY = "How many results, 1..IMGSIM_MAX_K (default 5); a form field `k` wins"
MODEL_QUERY = "Model name (default: the active model); a form field `model` wins"


HOW_TO_SEND = (
    "send it as the multipart field 'file' (curl -F file=@q.jpg) or as the request body with its type "
    "(curl --data-binary @q.jpg -H 'Content-Type: image/jpeg')"
)


class UploadFields(BaseModel):
    """The form fields next to a multipart ``file``; a raw-body upload passes them in the query."""

    k: int = Field(DEFAULT_K, description="How many results (1..IMGSIM_MAX_K, default 5)")
    model: str | None = Field(None, description="Model name; default: the active model")


def _request_body_doc(fields: tuple[str, ...]) -> dict[str, Any]:
    """The OpenAPI request body: a multipart form, or the image itself as the body.

    Written here rather than derived from ``File``/``Form`` parameters: FastAPI's form
    handling took 40 % of the app's own time per request, even for a raw body
    (``python -m benchmarks.probes app-overhead``), so the endpoints parse the form themselves.
    """
    props = UploadFields.model_json_schema()["properties"]
    form = {
        "type": "object",
        "required": ["file"],
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "JPEG, PNG, WebP, BMP or GIF (first frame)"},
            **{f: props[f] for f in fields},
        },
    }
    image = {"schema": {"type": "string", "format": "binary"}}
    content = {"multipart/form-data": {"schema": form}}
    content.update({ct: image for ct in ("image/jpeg", "image/png", "image/webp", "application/octet-stream")})
    return {"requestBody": {"required": True, "content": content}}


@dataclass
class Upload:
    """The image's source (a multipart ``file`` or the body itself) and the request's parameters."""

    k: int
    model: str | None
    content_type: str
    chunks: Callable[[], AsyncIterator[bytes]]
    form: FormData | None = None

    async def read(self, limit: int) -> bytes:
        """At most ``limit`` bytes; 413 as soon as the upload is larger."""
        parts, total = [], 0
        async for chunk in self.chunks():
            total += len(chunk)
            if total > limit:
                raise HTTPException(413, f"upload larger than the {limit}-byte limit")
            parts.append(chunk)
        return b"".join(parts)


async def _upload(request: Request, k: int | None, model: str | None, with_k: bool) -> Upload:
    """Multipart form (its fields win over the query) or raw body (parameters in the query).

    ``with_k``: the endpoint takes ``k`` (classify does not, and ignores a form field ``k``).
    """
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/x-www-form-urlencoded":  # e.g. curl --data-binary without a Content-Type
        raise UploadError(415, f"a url-encoded form cannot carry an image: {HOW_TO_SEND}")
    if media_type != "multipart/form-data":
        fields = _validate_fields(k, model)
        return Upload(fields.k, fields.model, media_type, request.stream)
    form = await request.form()  # Starlette answers 400 for a malformed body
    try:
        file = form.get("file")
        if not isinstance(file, StarletteUploadFile):
            raise HTTPException(422, f"missing the image: {HOW_TO_SEND}")
        fields = _validate_fields(form.get("k", k) if with_k else None, form.get("model", model))
    except Exception:
        await form.close()  # on success, _run closes it once the image is read
        raise

    async def file_chunks() -> AsyncIterator[bytes]:
        while chunk := await file.read(CHUNK):
            yield chunk

    return Upload(fields.k, fields.model, file.content_type or "", file_chunks, form)


@dataclass
class Stages:
    """``time.perf_counter()`` marks of one request, for its Server-Timing header."""

    start: float
    read: float = 0.0  # the upload is parsed and read
    decoded: float = 0.0  # the image is the model's input


def server_timing(stages: Stages, result: Result, total_ms: float) -> str:
    """The Server-Timing header (W3C; browsers' developer tools show it): where the time went, in ms.

    parse: form parsing and reading the upload; decode: the image to the model's input;
    queue: waiting for a model call; infer: that call (hand-off to the model's thread,
    forward pass, search, hand-back), shared by its whole batch; total: as ``took_ms``.
    The rest of total is the hand-back to this request; the rest of the client's latency is
    HTTP, routing and the response.
    """
    ms = {
        "parse": (stages.read - stages.start) * 1000,
        "decode": (stages.decoded - stages.read) * 1000,
        "queue": result.queue_seconds * 1000,
        "infer": result.infer_seconds * 1000,
        "total": total_ms,
    }
    return ", ".join(f"{name};dur={v:.3f}" for name, v in ms.items())


def _validate_fields(k: object, model: object) -> UploadFields:
    values = {name: v for name, v in (("k", k), ("model", model)) if v is not None}
    try:
        return UploadFields.model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def _run(
    request: Request,
    k: int | None,
    model: str | None,
    registry: ModelRegistry,
    settings: ServiceSettings,
    with_k: bool = True,
) -> tuple[LoadedModel, Result, Upload, Stages]:
    stages = Stages(time.perf_counter())
    upload = await _upload(request, k, model, with_k)
    try:
        if not 1 <= upload.k <= settings.max_k:
            raise HTTPException(422, f"k must be between 1 and {settings.max_k}, got {upload.k}")
        loaded = resolve_model(registry, upload.model)  # resolved once: a model switch mid-request does not affect it
        request.state.model = loaded.name
        check_content_type(upload.content_type)
        if loaded.batcher.full:  # refuse before decoding: under overload, work on a refused image is wasted
            raise QueueFull(f"queue full ({loaded.batcher.max_queue} images waiting)")
        data = await upload.read(settings.max_upload_bytes)
        stages.read = time.perf_counter()
    finally:
        if upload.form is not None:
            await upload.form.close()
    args = (data, loaded.embedder.input_size, settings.max_image_pixels)
    if len(data) <= settings.inline_decode_bytes:
        image = decode_upload(*args)
    else:
        image = await run_in_threadpool(decode_upload, *args)
    stages.decoded = time.perf_counter()
    result = await loaded.batcher.submit(image, max(upload.k, VOTE_K))
    return loaded, result, upload, stages


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


def _took_ms(response: Response, stages: Stages, result: Result) -> float:
    """The request's time so far (``took_ms``), also sent with its parts as Server-Timing."""
    took = round((time.perf_counter() - stages.start) * 1000, 2)
    response.headers["Server-Timing"] = server_timing(stages, result, took)
    return took


@router.post(
    "/search",
    response_model=SearchResponse,
    responses=ERRORS,
    summary="Top-k similar indexed images",
    openapi_extra=_request_body_doc(("k", "model")),
)
async def search(
    request: Request,
    response: Response,
    k: int | None = Query(None, description=K_QUERY),
    model: str | None = Query(None, description=MODEL_QUERY),
    registry: ModelRegistry = Depends(get_registry),
    settings: ServiceSettings = Depends(get_settings_dep),
) -> SearchResponse:
    loaded, result, upload, stages = await _run(request, k, model, registry, settings)
    took = _took_ms(response, stages, result)
    return SearchResponse(model=loaded.name, took_ms=took, results=_neighbours(loaded, result, upload.k))


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,
    summary="Predicted class + neighbour vote",
    openapi_extra=_request_body_doc(("model",)),
)
async def classify(
    request: Request,
    response: Response,
    model: str | None = Query(None, description=MODEL_QUERY),
    registry: ModelRegistry = Depends(get_registry),
    settings: ServiceSettings = Depends(get_settings_dep),
) -> ClassifyResponse:
    loaded, result, _, stages = await _run(request, None, model, registry, settings, with_k=False)
    took = _took_ms(response, stages, result)
    return ClassifyResponse(model=loaded.name, took_ms=took, prediction=_prediction(loaded, result))


@router.post(
    "/analyze",
    response_model=AnalyzeResponse,
    responses=ERRORS,
    summary="Classification and top-k search from one forward pass",
    openapi_extra=_request_body_doc(("k", "model")),
)
async def analyze(
    request: Request,
    response: Response,
    k: int | None = Query(None, description=K_QUERY),
    model: str | None = Query(None, description=MODEL_QUERY),
    registry: ModelRegistry = Depends(get_registry),
    settings: ServiceSettings = Depends(get_settings_dep),
) -> AnalyzeResponse:
    loaded, result, upload, stages = await _run(request, k, model, registry, settings)
    return AnalyzeResponse(
        model=loaded.name,
        took_ms=_took_ms(response, stages, result),
        prediction=_prediction(loaded, result),
        results=_neighbours(loaded, result, upload.k),
    )
