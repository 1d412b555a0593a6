"""The collection's items: their details, image, vector and neighbours; live add and delete."""

from __future__ import annotations

import asyncio
import hashlib
import time
from functools import partial
from pathlib import Path as FilePath
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Form, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BeforeValidator

from app.deps import Admin, Registry, Settings, Thumbnails, require_admin
from app.item_meta import parse_meta, shown_meta
from app.registry import LoadedModel
from app.routers.search import neighbours
from app.schemas import AddResponse, DeleteResponse, EmbeddingResponse, ItemInfo, SearchResponse, error_responses
from app.uploads import ImageFiles, ModelName, either, known_fields, run_images, search_query
from app.uploads import ModelQuery as UploadModelQuery
from indexer.images import item_image_bytes
from indexer.query import search_batch
from indexer.update import NewItem
from models.errors import BadInput, Gone, NotFound, UnreadableImage

router = APIRouter(prefix="/v1/images", tags=["images"])


def _digits_only(value: object) -> object:
    """Ids are written as digits: ' 1', '+1' and '1.0' would otherwise all read as item 1."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("an item id is written with digits only, e.g. 42")
    return value


# SQLite INTEGER; the validator after Path, so that the schema keeps minimum and maximum
ItemId = Annotated[
    int, Path(ge=0, le=2**63 - 1, description="Item id from a search result"), BeforeValidator(_digits_only)
]
ModelQuery = Annotated[str | None, Query(max_length=200, description="Model of the index (default: active)")]
WRITE_LOCK_SECONDS = 30.0  # a live add or delete waits this long for another writer of the index


def _model(request: Request, registry: Registry, model: str | None) -> LoadedModel:
    loaded = registry.get(model)
    request.state.model = loaded.name
    return loaded


@router.get("/{item_id}", response_model=ItemInfo, responses=error_responses(404, 422), summary="An item's details")
def get_item(request: Request, registry: Registry, admin: Admin, item_id: ItemId, model: ModelQuery = None) -> ItemInfo:
    """Paths are shown relative to the collection (files added from elsewhere: their name)
    unless the request carries the API key."""
    loaded = _model(request, registry, model)
    try:
        row = loaded.store.item(item_id)
    except KeyError:
        raise NotFound(f"no item {item_id} in the index of model {loaded.name!r}") from None
    fields = {k: row.get(k) for k in ItemInfo.model_fields if k in row and k not in ("meta", "source")}
    root = FilePath(loaded.store.manifest.dataset.spec).absolute()
    source = row["source"] if admin else shown_source(row["source"], row.get("split"), root)
    return ItemInfo(model=loaded.name, file_url=f"/v1/images/{item_id}/file?model={loaded.name}", source=source,
                    meta=shown_meta(row.get("meta")), **fields)  # fmt: skip


@router.get(
    "/{item_id}/file",
    response_class=Response,
    summary="An item's image, or a thumbnail with ?size=",
    responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}, **error_responses(404, 410, 422)},
)
async def get_image(
    request: Request,
    registry: Registry,
    thumbnails: Thumbnails,
    item_id: ItemId,
    model: ModelQuery = None,
    size: Annotated[int | None, Query(ge=16, le=1024, description="Longest side of a thumbnail in pixels")] = None,
) -> Response:
    """Thumbnails are made once (in the decode budget that uploads use) and kept on disk."""
    loaded = _model(request, registry, model)
    store = loaded.store
    try:
        sha256 = store.rows([item_id])[item_id].sha256
    except KeyError:
        raise NotFound(f"no item {item_id} in the index of model {loaded.name!r}") from None
    render = partial(thumbnails.render, sha256, partial(item_image_bytes, store, item_id), size)
    try:
        body, media = await asyncio.get_running_loop().run_in_executor(request.app.state.decode_pool, render)
    except UnreadableImage as exc:
        raise Gone(f"image of item {item_id} cannot be decoded: {exc.reason_detail or exc.reason}") from None
    return Response(body, media_type=media, headers={"Cache-Control": "public, max-age=3600"})


def _vector(loaded: LoadedModel, item_id: int) -> np.ndarray:
    try:
        return loaded.store.vector(item_id)
    except KeyError:
        raise NotFound(f"no item {item_id} in the index of model {loaded.name!r}") from None


@router.get(
    "/{item_id}/similar",
    response_model=SearchResponse,
    responses=error_responses(404, 422),
    summary="More like this: the neighbours of a stored item (no upload, no forward pass)",
)
async def similar(
    request: Request,
    registry: Registry,
    settings: Settings,
    item_id: ItemId,
    model: ModelQuery = None,
    k: Annotated[int, Query(ge=1, le=1024, description="How many results (at most IMGSIM_MAX_K)")] = 5,
    min_score: Annotated[float | None, Query(ge=-1.0, le=1.0, description="Cosine cut-off")] = None,
    label: Annotated[str | None, Query(max_length=200, description="Only items with this label")] = None,
) -> SearchResponse:
    start = time.perf_counter()
    query = search_query(k, settings, label, min_score, exclude=item_id)
    loaded = _model(request, registry, model)
    store = loaded.store
    vector = _vector(loaded, item_id)
    hits = (await run_in_threadpool(search_batch, store, vector[None], [query]))[0]
    took = round((time.perf_counter() - start) * 1000, 2)
    return SearchResponse(model=loaded.name, took_ms=took, results=neighbours(store, loaded.name, hits))


@router.get(
    "/{item_id}/embedding",
    response_model=EmbeddingResponse,
    responses=error_responses(404, 422),
    summary="An item's stored vector (L2-normalised)",
)
def embedding(request: Request, registry: Registry, item_id: ItemId, model: ModelQuery = None) -> EmbeddingResponse:
    loaded = _model(request, registry, model)
    vector = _vector(loaded, item_id)
    return EmbeddingResponse(
        model=loaded.name, id=item_id, dim=len(vector), vector=[round(float(x), 7) for x in vector]
    )


def shown_source(source: str, split: str | None, root: FilePath) -> str:
    """An item's source as a caller without the API key sees it: never a server path.

    Folder items name their collection folder; files added by path (``imgsim index add``)
    their path inside the collection, or only their name when they lie outside it."""
    if source == "upload":
        return source
    if split != "added":
        return root.name or "collection"
    path = FilePath(source)
    return str(path.relative_to(root)) if path.is_relative_to(root) else path.name


def _label_id(label: str | None, names: list[str]) -> int:
    if label is None:
        return -1
    if label not in names:
        known = ", ".join(names) if names else "none (an index of ImageNet features has no labels)"
        raise BadInput(f"unknown label {label[:64]!r}; the index's classes are: {known}")
    return names.index(label)


@router.post(
    "",
    response_model=AddResponse,
    dependencies=[Depends(require_admin), Depends(known_fields("model", "label", "meta"))],
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 503),
    summary="Add images to the index (admin)",
)
async def add_images(
    request: Request,
    registry: Registry,
    settings: Settings,
    file: ImageFiles,
    model: ModelName = None,
    label: Annotated[str | None, Form(max_length=200, description="Label of the new images")] = None,
    meta: Annotated[str | None, Form(max_length=10_000, description="A JSON object stored with each image")] = None,
    model_query: UploadModelQuery = None,
    label_query: Annotated[str | None, Query(alias="label", max_length=200, description="Or the form field")] = None,
    meta_query: Annotated[str | None, Query(alias="meta", max_length=10_000, description="Or the form field")] = None,
) -> AddResponse:
    """Embeds the images and publishes a new index version before it answers: an acknowledged
    add survives a crash. A file whose bytes are already indexed gets its existing id."""
    model, label = either("model", model, model_query, None), either("label", label, label_query, None)
    meta = either("meta", meta, meta_query, None)
    stored_meta = parse_meta(meta)  # checked before any image is decoded
    label_id = _label_id(label, registry.get(model).store.manifest.dataset.class_names)
    loaded, results, _ = await run_images(request, file, model, registry, settings)  # embedded only
    items = []
    for f, r in zip(file, results, strict=False):
        await f.seek(0)
        data = await f.read()
        sha = hashlib.sha256(data).hexdigest()
        items.append(NewItem(f.filename or "upload", "upload", sha, r.embedding, label_id, label, image=data,
                             meta=stored_meta))  # fmt: skip
    changes = await run_in_threadpool(registry.write, loaded.index_dir, items, (), WRITE_LOCK_SECONDS)
    await run_in_threadpool(loaded.reload_if_changed)
    ids = iter(changes.added)
    out = [changes.duplicates[i.sha256] if i.sha256 in changes.duplicates else next(ids) for i in items]
    return AddResponse(model=loaded.name, ids=out, count=changes.count)


@router.delete(
    "/{item_id}",
    response_model=DeleteResponse,
    dependencies=[Depends(require_admin)],
    responses=error_responses(401, 403, 404, 422, 503),
    summary="Remove an item from the index (admin)",
)
async def delete_item(
    request: Request, registry: Registry, item_id: ItemId, model: ModelQuery = None
) -> DeleteResponse:
    loaded = _model(request, registry, model)
    changes = await run_in_threadpool(registry.write, loaded.index_dir, (), [item_id], WRITE_LOCK_SECONDS)
    await run_in_threadpool(loaded.reload_if_changed)
    return DeleteResponse(model=loaded.name, removed=item_id, count=changes.count)
