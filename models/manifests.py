"""The MODEL_DIR and INDEX_DIR manifests as typed records, with a format version.

Every read of a manifest goes through :func:`read_model_manifest` or
:func:`read_index_manifest`, so a renamed field fails here, once, with a message, and
not deep inside the service. Format 1 (written before these types existed) has the same
fields and is migrated on read; a newer format asks for a newer imgsim.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import ImgsimError

FORMAT = 2
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.keras"
IndexType = Literal["flat", "hnsw", "hnsw-fp16", "ivf", "ivfpq"]
Tta = Literal["none", "flip"]


def package_version() -> str:
    try:
        return version("imgsim")
    except PackageNotFoundError:
        return "0+unknown"


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def file_digest(path: Path, algo: str = "sha256") -> str:
    """Hex digest of a file, read in chunks (model files are hundreds of MB)."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class _Record(BaseModel):
    # Unknown fields are kept, not dropped: a manifest written by a newer patch release
    # round-trips through an older one unchanged.
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class WeightsRef(_Record):
    source: str
    sha256: str | None = None


class ModelDataset(_Record):
    spec: str
    kind: str
    fingerprint: str
    splits: dict[str, int] = Field(default_factory=dict)


class Training(_Record):
    """The training options (those that must match to resume) and how long it took."""

    backbone: str
    data: str
    input_size: int
    val_fraction: float
    seed: int
    max_per_class: int | None = None
    trainable: str = "frozen"
    epochs: int = 0
    extract_seconds: float = 0.0
    fit_seconds: float = 0.0
    wall_seconds: float = 0.0
    resumed_from_epoch: int = 0
    feature_cache_hit: bool = False


class Metrics(_Record):
    val_loss: float
    val_accuracy: float
    best_epoch: int
    epochs_run: int
    test_accuracy: float | None = None
    test_count: int | None = None


class ModelManifest(_Record):
    """MODEL_DIR/manifest.json: what `imgsim train` made, and how to run it."""

    format: int = FORMAT
    name: str
    backbone: str
    weights: WeightsRef | None = None
    input_size: int
    preprocessing: str
    class_names: list[str]
    embedding_layer: str
    embedding_dim: int
    classifier_layer: str | None = None
    cut_layer: str | None = None
    feature_cache: str | None = None
    training: Training | None = None  # None: ImageNet features used as they are (models/pretrained.py)
    dataset: ModelDataset | None = None
    metrics: Metrics | None = None
    created: str = Field(default_factory=now_utc)
    package_version: str = Field(default_factory=package_version)


class ModelIdentity(_Record):
    """What an index records about its model, and what loading checks against."""

    name: str
    path: str
    backbone: str
    model_sha256: str
    imagenet_weights_sha256: str | None = None
    embedding_layer: str
    embedding_dim: int
    input_size: int

    def mismatches(self, other: ModelIdentity) -> list[str]:
        """Fields that make an index built with ``self`` unusable with ``other``."""
        fields = ("backbone", "embedding_layer", "embedding_dim", "model_sha256", "input_size")
        return [
            f"model {f}: index built with {getattr(self, f)!r}, given {getattr(other, f)!r}"
            for f in fields
            if getattr(self, f) != getattr(other, f)
        ]


class IndexDataset(_Record):
    spec: str
    kind: str
    fingerprint: str
    splits: list[str]
    class_names: list[str]
    images_stored: bool
    labels: str = "auto"  # how the folder was read (models.data.folder.LABELS); sync reads it the same way
    val_fraction: float | None = None  # the listing options of the build, for sync
    seed: int | None = None
    max_per_class: int | None = None


class IndexManifest(_Record):
    """INDEX_DIR/manifest.json: the model, the vectors' meaning, counts and the index type."""

    format: int = FORMAT
    model: ModelIdentity
    embedding_layer: str
    embedding_dim: int
    metric: Literal["inner_product"] = "inner_product"
    normalisation: Literal["l2"] = "l2"
    score: Literal["cosine"] = "cosine"
    count: int
    next_id: int
    deleted: int = 0  # HNSW: vectors of deleted items still in the graph, filtered out until compaction
    dataset: IndexDataset
    index_type: IndexType
    index_params: dict[str, int] = Field(default_factory=dict)
    faiss_index: str
    embedding_path: str
    tta: Tta = "none"
    created: str = Field(default_factory=now_utc)
    updated: str = Field(default_factory=now_utc)
    package_version: str = Field(default_factory=package_version)


def model_identity(model_dir: Path, manifest: ModelManifest) -> ModelIdentity:
    """The identity of a MODEL_DIR (manifest + model file hash; no Keras needed), or of a
    backbone name (its ImageNet weights' hash and input size)."""
    if Path(model_dir).is_dir():
        path, sha = str(Path(model_dir).resolve()), file_digest(Path(model_dir) / MODEL_FILE)
    else:
        path, sha = str(model_dir), f"imagenet:{manifest.weights.sha256 if manifest.weights else '-'}"
    return ModelIdentity(
        name=manifest.name,
        path=path,
        backbone=manifest.backbone,
        model_sha256=sha,
        imagenet_weights_sha256=manifest.weights.sha256 if manifest.weights else None,
        embedding_layer=manifest.embedding_layer,
        embedding_dim=manifest.embedding_dim,
        input_size=manifest.input_size,
    )


M = TypeVar("M", bound=_Record)


def _read(path: Path, kind: type[M], what: str, how_to_make: str) -> M:
    if not path.is_file():
        raise ImgsimError(f"{path.parent} is not {what} directory (no {MANIFEST_FILE}); {how_to_make}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ImgsimError(f"{path} cannot be read ({exc}); {how_to_make} again") from exc
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if not isinstance(fmt, int) or fmt < 1:
        raise ImgsimError(f"{path} is not the manifest of {what} directory; {how_to_make} again")
    if fmt > FORMAT:
        raise ImgsimError(
            f"{path} has format {fmt}, newer than this imgsim ({package_version()}) reads ({FORMAT}): upgrade imgsim"
        )
    raw["format"] = FORMAT  # format 1 -> 2: same fields, now validated (migrated on read)
    try:
        return kind.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ImgsimError(f"{path} is damaged ({problems}); {how_to_make} again") from None


def read_model_manifest(model_dir: Path) -> ModelManifest:
    manifest = _read(Path(model_dir) / MANIFEST_FILE, ModelManifest, "a trained model", "run `imgsim train`")
    if not manifest.name:
        manifest.name = Path(model_dir).resolve().name
    return manifest


def read_index_manifest(index_dir: Path) -> IndexManifest:
    return _read(Path(index_dir) / MANIFEST_FILE, IndexManifest, "an index", "build it with `imgsim index build`")


def write_manifest(directory: Path, manifest: _Record) -> None:
    """Write atomically (temporary file, then rename): a reader never sees half a manifest."""
    path = Path(directory) / MANIFEST_FILE
    tmp = path.with_suffix(".json.part")
    tmp.write_text(manifest.model_dump_json(indent=2))
    os.replace(tmp, path)
