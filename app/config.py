"""Service settings: the project's settings plus what only the web service needs.

Same ``IMGSIM_`` prefix, e.g. ``IMGSIM_MODELS='[{"model": "runs/resnet50", "index": "indexes/resnet50"}]'``,
``IMGSIM_API_KEY=secret``, ``IMGSIM_MAX_UPLOAD_BYTES=5000000``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator

from models.settings import Settings


class ModelPair(BaseModel):
    """A trained model and the index built from it; ``name`` defaults to the manifest's name."""

    model: Path
    index: Path
    name: str | None = None


class ServiceSettings(Settings):
    models: list[ModelPair] = Field(default_factory=list, description="Models to load; the first is active.")
    host: str = Field("127.0.0.1", description="Bind address of `imgsim serve`.")
    port: int = Field(8000, description="Port of `imgsim serve`.")
    max_upload_bytes: int = Field(10_000_000, ge=1, description="Larger uploads get 413.")
    max_batch_size: int = Field(32, ge=1, le=1024, description="Most images in one model call.")
    max_decodes: int = Field(
        2, ge=1, description="Uploads decoded at once; the rest wait their turn (bounds decoding memory and CPU)."
    )
    max_webp_pixels: int = Field(
        16_000_000,
        ge=1,
        description="WebP uploads with more pixels get 413: Pillow's WebP decoder holds the GIL while it copies "
        "a frame (about 2 ms per megapixel), which stalls every other request meanwhile.",
    )
    shutdown_seconds: float = Field(
        10.0, gt=0, description="On SIGTERM/SIGINT, requests in flight get this long to finish; then the process exits."
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Request headers larger than this get 431 and the connection is closed."
    )
    header_seconds: float = Field(
        10.0, gt=0, description="A connection must send a request's headers within this long, or it is closed (408)."
    )
    body_seconds: float = Field(
        30.0, gt=0, description="A request body that stalls (no bytes) for this long gets 408 (slow clients)."
    )
    max_queue: int = Field(256, ge=1, description="Queued images per model before requests get 503.")
    max_queue_ms: float = Field(
        0.0,
        ge=0.0,
        description="A request still queued after this many ms gets 503 instead of a model call, so an "
        "answered request takes at most this plus one model call; 0 = no time limit.",
    )
    model_streams: int = Field(
        2,
        ge=1,
        le=8,
        description="Model calls that may run at once per model, sharing max_batch_size images: two "
        "concurrent batches keep the cores busier than one (see app/batching.py).",
    )
    reload_seconds: float = Field(
        2.0,
        ge=0.0,
        description="How often the service checks its indexes for a new version (after `imgsim index sync`, "
        "`build` or `add`) and swaps it in without a restart; 0 = only on POST /v1/models/reload.",
    )
    ensemble: list[str] = Field(
        default_factory=list,
        description="Models that vote for model=ensemble in /v1/classify; empty: every loaded model with a "
        "classifier over the first one's classes (two or more are needed).",
    )
    api_key: SecretStr | None = Field(None, description="When set, admin endpoints need header X-API-Key.")
    faiss_threads: int = Field(1, ge=1, description="FAISS OpenMP threads (1 is fastest for single queries here).")
    max_k: int = Field(100, ge=1, le=1024, description="Largest k a search may ask for.")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: object) -> object:
        """An empty IMGSIM_API_KEY (e.g. an unset compose variable) means no key."""
        return None if v in ("", None) else v


@lru_cache
def get_service_settings() -> ServiceSettings:
    return ServiceSettings()
