"""One interface for every image encoder, and the registry that finds one from a model spec.

A *spec* is what users pass as ``--model``: a backbone name (``resnet50:128``), a fine-tuned
MODEL_DIR, a folder holding ``encoder.onnx`` with its JSON sidecar, or whatever a registered
kind recognises. Everything that embeds images (the indexer, the service, sync, Ray actors)
goes through :func:`open_encoder`, and everything that only needs to know *which* model it
is (an index's manifest, the service's start-up check) through :func:`describe`, which loads
no network. Adding an encoder kind is one module and one :func:`register` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from models.errors import NotFound
from models.manifests import ModelIdentity, ModelManifest
from models.settings import Settings, get_settings

if TYPE_CHECKING:
    from models.data import Dataset


@runtime_checkable
class ImageEncoder(Protocol):
    """uint8 RGB images (N, S, S, 3) -> embeddings (and class probabilities, if it classifies).

    ``identity`` is what caches and index manifests record: an index refuses an encoder whose
    identity differs from the one it was built with."""

    @property
    def name(self) -> str: ...

    @property
    def input_size(self) -> int: ...

    @property
    def class_names(self) -> list[str]: ...

    @property
    def has_classifier(self) -> bool: ...

    @property
    def runtime(self) -> str:
        """Where it runs: tf (the reference), bf16 or int8, or a kind's own name."""
        ...

    @property
    def manifest(self) -> ModelManifest: ...

    @property
    def identity(self) -> ModelIdentity: ...

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 (N, D) raw embeddings, float32 (N, C) probabilities; C = 0 without a classifier)."""
        ...

    def embed(self, batch: np.ndarray, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
        """As ``__call__``, the embeddings L2-normalised; ``tta="flip"`` adds each mirror image's."""
        ...


@dataclass(frozen=True)
class EncoderKind:
    """One way of turning a spec into an encoder."""

    name: str
    help: str  # one line for --help: what spec it takes
    matches: Callable[[str], bool]
    describe: Callable[[str, Settings], tuple[ModelManifest, ModelIdentity]]  # without loading the network
    load: Callable[[str, str | None, Settings, Dataset | None], ImageEncoder]  # spec, runtime, settings, collection


_KINDS: dict[str, EncoderKind] = {}


def register(kind: EncoderKind) -> EncoderKind:
    """Add (or replace) a kind; later registrations are tried first, so a plug-in can claim
    specs a built-in kind would otherwise take."""
    _KINDS.pop(kind.name, None)
    _KINDS[kind.name] = kind
    return kind


def kinds() -> list[EncoderKind]:
    return list(reversed(_KINDS.values()))


def spec_help() -> str:
    """What --model accepts, from the registered kinds."""
    return "; ".join(k.help for k in kinds())


def find_kind(spec: str | Path) -> EncoderKind:
    text = str(spec)
    for kind in kinds():
        if kind.matches(text):
            return kind
    raise NotFound(f"no encoder for {text[:200]!r}: pass {spec_help()}")


def describe(spec: str | Path, settings: Settings | None = None) -> tuple[ModelManifest, ModelIdentity]:
    """(manifest, identity) of the encoder a spec names, without loading it."""
    return find_kind(spec).describe(str(spec), settings or get_settings())


def open_encoder(
    spec: str | Path, runtime: str | None = None, settings: Settings | None = None, collection: Dataset | None = None
) -> ImageEncoder:
    """The encoder a spec names, ready to embed on ``runtime`` (default: the settings').

    ``collection``: the images about to be embedded (int8 calibrates on them when the
    encoder has no training images of its own)."""
    settings = settings or get_settings()
    return find_kind(spec).load(str(spec), runtime, settings, collection)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32 C-contiguous (as FAISS wants)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)
