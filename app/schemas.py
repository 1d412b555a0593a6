"""Request and response schemas; their examples show up in Swagger UI."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Neighbour(BaseModel):
    id: int = Field(description="Item id in the model's index (stable across index updates).")
    score: float = Field(description="Cosine similarity to the query, -1..1.")
    label: str | None = Field(description="Class of the indexed image (null when unknown).")
    key: str = Field("", description="The image's path in its collection (relative to the indexed folder).")
    url: str = Field(description="Where to fetch the image.")

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "id": 4711,
                "score": 0.93,
                "label": "cat",
                "key": "train/cat/0042.jpg",
                "url": "/v1/images/4711/file?model=resnet50",
            }
        }
    )


class ClassScore(BaseModel):
    label: str
    probability: float


class QueryResults(BaseModel):
    file: str = Field(description="The uploaded file's name.")
    results: list[Neighbour]


class SearchResponse(BaseModel):
    model: str = Field(description="Model that answered.")
    took_ms: float = Field(description="Server-side time for this request.")
    results: list[Neighbour] = Field(description="The neighbours of the (first) image, best first.")
    queries: list[QueryResults] = Field(default_factory=list, description="One result list per uploaded image.")

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "model": "resnet50-cifar10",
                "took_ms": 41.2,
                "results": [
                    {
                        "id": 4711,
                        "score": 0.93,
                        "label": "cat",
                        "key": "train/cat/4711.jpg",
                        "url": "/v1/images/4711/file?model=resnet50-cifar10",
                    }
                ],
            }
        }
    )


class Prediction(BaseModel):
    label: str = Field(description="Most probable class from the fine-tuned head.")
    probability: float
    top: list[ClassScore] = Field(description="Most probable classes, best first.")
    neighbour_vote: str | None = Field(description="Majority label of the 5 nearest indexed images.")


class MemberAnswer(BaseModel):
    model: str
    label: str
    probability: float
    neighbour_vote: str | None


class EnsembleVote(BaseModel):
    members: list[MemberAnswer] = Field(description="Each member's own answer on the upload.")
    hard_vote: str = Field(description="Majority of the members' labels (ties: the larger summed probability).")
    soft_vote: str = Field(description="Top class of the members' mean probabilities (also `prediction`).")


class ClassifyResponse(BaseModel):
    model: str
    took_ms: float
    prediction: Prediction
    ensemble: EnsembleVote | None = Field(
        None, description="With model=ensemble: every member's answer and both votes; `prediction` is the soft vote."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "model": "resnet50-cifar10",
                "took_ms": 38.0,
                "prediction": {
                    "label": "cat",
                    "probability": 0.91,
                    "top": [{"label": "cat", "probability": 0.91}, {"label": "dog", "probability": 0.06}],
                    "neighbour_vote": "cat",
                },
            }
        }
    )


class AnalyzeResponse(BaseModel):
    model: str
    took_ms: float
    prediction: Prediction | None = Field(description="Null for a model without a classifier (ImageNet features).")
    results: list[Neighbour]


class ModelInfo(BaseModel):
    name: str
    active: bool
    backbone: str
    input_size: int
    runtime: str = Field(description="Inference runtime: tf (TensorFlow fp32), bf16 or int8 (OpenVINO).")
    classes: list[str]
    embedding_dim: int
    has_classifier: bool = Field(description="False for ImageNet features without a classifier: classify answers 409.")
    index_size: int
    index_type: str
    index_version: str = Field("", description="The index version served (a new one is swapped in after a sync).")
    tta: str = Field(
        "none",
        description="Test-time augmentation of the index: 'flip' embeds each image together with its mirror image.",
    )
    metrics: dict[str, float | int | None] = Field(description="Metrics recorded in the model's manifest.")


class ModelsResponse(BaseModel):
    active: str
    models: list[ModelInfo]
    ensemble: list[str] = Field(
        default_factory=list, description="The models that vote for model=ensemble in /v1/classify (empty: none)."
    )


class ReloadResponse(BaseModel):
    versions: dict[str, str] = Field(description="Model name -> the index version it now serves.")


class ActivateRequest(BaseModel):
    name: str = Field(min_length=1, max_length=200, description="Name of a loaded model.", examples=["vgg16-cifar10"])


class ActiveResponse(BaseModel):
    active: str
    previous: str


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Ready(BaseModel):
    status: str = Field(examples=["ready"])
    device: str = Field(description="Where inference runs: CPU or GPU.", examples=["CPU"])
    models: dict[str, int] = Field(description="Loaded model -> indexed images.")
    runtimes: dict[str, str] = Field(
        default_factory=dict, description="Loaded model -> its inference runtime (tf, bf16 or int8)."
    )


class ErrorResponse(BaseModel):
    detail: str = Field(examples=["unknown model 'x'; loaded: resnet50-cifar10, vgg16-cifar10"])


_ERROR_DESCRIPTIONS = {
    400: "A body that cannot be parsed (malformed multipart or JSON)",
    401: "An API key is configured and the request has none (header X-API-Key)",
    403: "Wrong API key",
    404: "Unknown model or item",
    409: "The model has no classifier (classify); search still works",
    410: "The item's image can no longer be read from its source",
    413: "Upload too large or too many pixels",
    415: "Not a supported image or content type",
    422: "Corrupt image or invalid parameter",
    503: "Model queue full (retry after the Retry-After seconds), or no model loaded",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: every error it can answer, each with the one error body."""
    return {s: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[s]} for s in statuses}


class ItemInfo(BaseModel):
    model: str
    id: int
    key: str = Field(description="Path in the collection (relative to the indexed folder), or the file name")
    source: str = Field(description="The indexed folder or archive, or 'upload'")
    label_name: str | None = None
    split: str | None = None
    sha256: str
    width: int | None = None
    height: int | None = None
    file_size: int | None = None
    added: str | None = Field(None, description="When it was added (ISO 8601, UTC)")
    meta: dict[str, Any] = Field(default_factory=dict, description="The JSON object given when it was added")
    file_url: str


class EmbeddingResponse(BaseModel):
    model: str
    id: int | None = None
    dim: int
    vector: list[float] = Field(description="L2-normalised: the dot product of two vectors is their cosine")


class AddResponse(BaseModel):
    model: str
    ids: list[int] = Field(description="One id per file, in order; a file already indexed keeps its id")
    count: int


class DeleteResponse(BaseModel):
    model: str
    removed: int
    count: int


class DuplicateGroup(BaseModel):
    ids: list[int]
    keys: list[str]
    max_score: float = Field(description="The highest cosine between two of its images.")


class DuplicatesResponse(BaseModel):
    model: str
    threshold: float
    hash_check: bool
    groups: list[DuplicateGroup]


class DuplicatesPending(BaseModel):
    model: str
    status: str = Field(description="queued, pairs (searching the index) or hashing (checking candidate pairs)")
    done: int = Field(description="Items (pairs) or images (hashing) done so far")
    total: int = Field(description="Of how many, in this phase")
