"""Indexed images (or thumbnails), read only from their dataset."""

from __future__ import annotations

import io

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from app.deps import Registry
from app.schemas import error_responses
from indexer.images import item_image_bytes
from models.errors import Gone, NotFound

router = APIRouter(prefix="/v1/images", tags=["images"])

_MEDIA = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp", "GIF": "image/gif"}


def _render(data: bytes, size: int | None) -> tuple[bytes, str]:
    """The stored bytes as they are, or a thumbnail (PNG for tiny images, else JPEG)."""
    img = Image.open(io.BytesIO(data))
    if size is None and img.format in _MEDIA:
        return data, _MEDIA[img.format]
    img = img.convert("RGB")
    if size is not None:
        img.thumbnail((size, size), Image.Resampling.LANCZOS)  # never enlarges
    fmt = "PNG" if max(img.size) <= 64 else "JPEG"
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90)
    return buf.getvalue(), _MEDIA[fmt]


@router.get(
    "/{item_id}",
    response_class=Response,
    summary="An indexed image, or a thumbnail with ?size=",
    responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}, **error_responses(404, 410, 422)},
)
async def get_image(
    request: Request,
    registry: Registry,
    item_id: Annotated[int, Path(ge=0, le=2**63 - 1, description="Item id from a search result")],  # SQLite INTEGER
    model: Annotated[str | None, Query(max_length=200, description="Model of the index (default: active)")] = None,
    size: Annotated[int | None, Query(ge=16, le=1024, description="Longest side of a thumbnail in pixels")] = None,
) -> Response:
    loaded = registry.get(model)
    request.state.model = loaded.name
    try:
        data = await run_in_threadpool(item_image_bytes, loaded.store, item_id)
    except KeyError:
        raise NotFound(f"no item {item_id} in the index of model {loaded.name!r}") from None
    try:
        body, media = await run_in_threadpool(_render, data, size)
    except (OSError, ValueError) as exc:  # Pillow: unreadable stored image
        raise Gone(f"image of item {item_id} cannot be decoded: {exc}") from None
    return Response(body, media_type=media, headers={"Cache-Control": "public, max-age=3600"})
