"""An uploaded image, from the multipart form to a micro-batcher's result.

The form's fields are declared once here (FastAPI ``File``/``Form``, so Swagger documents
them); every route that takes an image uses them. Every option may also come as a query
parameter (``curl -F file=@x.jpg 'host/v1/search?k=10'``): the same name with two different
values is a 422, and so is a field or parameter the route does not take, never ignored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Annotated, TypeVar

import numpy as np
from fastapi import Depends, File, Form, Query, Request, UploadFile

from app.batching import Result
from app.deps import Registry, Settings
from app.imaging import check_content_type, decode_upload
from app.registry import LoadedModel
from indexer.metrics import knn_vote
from indexer.query import Hit, SearchSpec
from indexer.store import IndexStore
from models.errors import BadInput, Busy, TooLarge

VOTE_K = 5  # neighbours that vote on a label

ImageFiles = Annotated[
    list[UploadFile],
    File(min_length=1, description="One or more images (repeat the `file` part): one result list per image"),
]
# A list of at most one, not a single UploadFile: with one, a second `file` part would silently win.
OneImage = Annotated[list[UploadFile], File(min_length=1, max_length=1, description="The image (one `file` part)")]
K_HELP = "How many results, 1..IMGSIM_MAX_K (100 unless configured); default 5"
K = Annotated[int | None, Form(ge=1, le=1024, description=K_HELP)]
KQuery = Annotated[int | None, Query(alias="k", ge=1, le=1024, description=K_HELP + " (or the form field)")]
ModelName = Annotated[
    str | None, Form(max_length=200, description="Model name (default: the active model)", examples=[None])
]
MinScore = Annotated[
    float | None, Form(ge=-1.0, le=1.0, description="Only results with at least this cosine (-1..1)", examples=[None])
]
Label = Annotated[
    str | None, Form(max_length=200, description="Only items with this label (none: an empty list)", examples=[None])
]
ModelQuery = Annotated[str | None, Query(alias="model", max_length=200, description="Model name (or the form field)")]
MinScoreQuery = Annotated[float | None, Query(alias="min_score", ge=-1.0, le=1.0, description="Or the form field")]
LabelQuery = Annotated[str | None, Query(alias="label", max_length=200, description="Or the form field")]
T = TypeVar("T")


def either(name: str, form: T | None, query: T | None, default: T) -> T:
    """An option given as a form field or a query parameter (both: they must agree)."""
    if form is not None and query is not None and form != query:
        raise BadInput(f"{name} is given as a form field ({form!r}) and a query parameter ({query!r}): send one")
    return form if form is not None else query if query is not None else default


def known_fields(*names: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency: 422 naming any form field or query parameter outside ``file`` and ``names``."""
    allowed = {"file", *names}

    async def check(request: Request) -> None:
        form = await request.form()  # parsed once already, for the route's own fields
        if "file" not in form:  # no image (or not multipart): that error says how to send one
            return
        unknown = sorted((set(request.query_params) | set(form.keys())) - allowed)
        if unknown:
            takes = ", ".join(sorted(allowed))
            raise BadInput(f"unknown field {', '.join(repr(u[:40]) for u in unknown[:5])}: this route takes {takes}")

    return check


@dataclass
class SearchForm:
    files: list[UploadFile]
    k: int
    model: str | None
    min_score: float | None
    label: str | None


def _merged(files: list[UploadFile], k: tuple[int | None, int | None], model: tuple[str | None, str | None],
            min_score: tuple[float | None, float | None], label: tuple[str | None, str | None]) -> SearchForm:  # fmt: skip
    return SearchForm(
        files, either("k", k[0], k[1], 5), either("model", model[0], model[1], None),
        either("min_score", min_score[0], min_score[1], None), either("label", label[0], label[1], None),
    )  # fmt: skip


async def _search_form(
    file: ImageFiles, k: K = None, model: ModelName = None, min_score: MinScore = None, label: Label = None,
    k_q: KQuery = None, model_q: ModelQuery = None, min_score_q: MinScoreQuery = None, label_q: LabelQuery = None,
) -> SearchForm:  # fmt: skip
    return _merged(file, (k, k_q), (model, model_q), (min_score, min_score_q), (label, label_q))


async def _analyze_form(
    file: OneImage, k: K = None, model: ModelName = None, min_score: MinScore = None, label: Label = None,
    k_q: KQuery = None, model_q: ModelQuery = None, min_score_q: MinScoreQuery = None, label_q: LabelQuery = None,
) -> SearchForm:  # fmt: skip
    return _merged(file, (k, k_q), (model, model_q), (min_score, min_score_q), (label, label_q))


Search = Annotated[SearchForm, Depends(_search_form)]
AnalyzeForm = Annotated[SearchForm, Depends(_analyze_form)]


@dataclass
class Stages:
    """``time.perf_counter()`` marks of one request, for its Server-Timing header."""

    start: float  # the request arrived (before FastAPI parsed its form)
    read: float = 0.0  # the form is parsed (the uploads spooled)
    decoded: float = 0.0  # the image is the model's input


def server_timing(stages: Stages, result: Result, total_ms: float) -> str:
    """The Server-Timing header (W3C; browsers' developer tools show it): where the time went, in ms.

    parse: parsing the form (spooling the uploads); decode: reading the uploads and decoding
    them to the model's input (waiting for a decode slot included); queue: waiting for a model
    call; infer: that call (forward pass and search), shared by its whole batch; total: as ``took_ms``.
    """
    ms = {
        "parse": (stages.read - stages.start) * 1000,
        "decode": (stages.decoded - stages.read) * 1000,
        "queue": result.queue_seconds * 1000,
        "infer": result.infer_seconds * 1000,
        "total": total_ms,
    }
    return ", ".join(f"{name};dur={v:.3f}" for name, v in ms.items())


async def read_image(file: UploadFile, loaded: LoadedModel, settings: Settings) -> bytes:
    """The upload's bytes, after the checks that need no decoding."""
    check_content_type(file.content_type)
    if loaded.batcher.full:  # refuse before decoding: under overload, work on a refused image is wasted
        raise Busy(f"busy: queue full ({loaded.batcher.max_queue} images waiting); retry shortly")
    if (file.size or 0) > settings.max_upload_bytes:
        raise TooLarge(f"upload larger than the {settings.max_upload_bytes}-byte limit")
    await file.seek(0)  # an ensemble reads the same upload once per member
    return await file.read()


def search_query(
    k: int, settings: Settings, label: str | None = None, min_score: float | None = None, exclude: int | None = None
) -> SearchSpec:
    """A search as a request asks for it: the one place ``k`` is checked against IMGSIM_MAX_K."""
    if not 1 <= k <= settings.max_k:
        raise BadInput(f"k must be between 1 and {settings.max_k}, got {k}")
    return SearchSpec(k, label, min_score, exclude)


VOTE = SearchSpec(VOTE_K)  # the nearest indexed images whose labels vote (classify, analyze)


async def run_images(
    request: Request,
    files: list[UploadFile],
    model: str | None,
    registry: Registry,
    settings: Settings,
    queries: Sequence[SearchSpec] = (),
) -> tuple[LoadedModel, list[Result], Stages]:
    """Decode the uploads and submit them together to the model's batcher (one batch when it
    is free), each with ``queries`` to search for (none: only embedded); ``Result.answer``
    holds their hits, in order. The model is resolved once, so a switch mid-request does not
    affect it."""
    stages = Stages(getattr(request.state, "start", None) or time.perf_counter())  # set as the request arrived
    if len(files) > settings.max_batch_size:
        raise BadInput(f"at most {settings.max_batch_size} images per request, got {len(files)}")
    loaded = registry.get(model)
    request.state.model = loaded.name
    stages.read = time.perf_counter()
    size, limit = loaded.embedder.input_size, settings.max_image_pixels
    images = []
    for f in files:
        # At most IMGSIM_MAX_DECODES at once, whatever the load; the bytes are read inside too,
        # so waiting uploads stay in the form's spool files (memory up to 1 MB, then disk).
        async with request.app.state.decodes:
            data = await read_image(f, loaded, settings)
            pool = request.app.state.decode_pool
            decode = partial(decode_upload, data, size, limit, settings.max_webp_pixels)
            images.append(await asyncio.get_running_loop().run_in_executor(pool, decode))
    stages.decoded = time.perf_counter()
    results = await asyncio.gather(*(loaded.batcher.submit(img, tuple(queries)) for img in images))
    return loaded, list(results), stages


Neighbours = tuple[list[str | None], list[float]]  # labels (None: unlabelled) and cosines, nearest first


def neighbour_labels(store: IndexStore, hits: list[Hit]) -> Neighbours:
    """The labels and scores of a search's hits (the VOTE query's: the nearest), nearest first."""
    return store.label_names([h.id for h in hits]), [h.score for h in hits]


def neighbour_vote(neighbours: Neighbours, class_names: list[str]) -> str | None:
    """The label the neighbours vote for, by the rule `imgsim evaluate` scores
    (:func:`indexer.metrics.knn_vote`, docs/retrieval.md): most votes; a tie goes to the label
    with the larger summed cosine. None when no neighbour is labelled."""
    names, scores = neighbours
    ids = np.array([[class_names.index(n) if n in class_names else -1 for n in names]], dtype=np.int64)
    if not (ids >= 0).any():
        return None
    return class_names[int(knn_vote(ids, np.array([scores]), len(class_names), ids.shape[1])[0])]
