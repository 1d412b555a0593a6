"""Keras encoders: an ImageNet backbone used as it is (``resnet50``, ``vgg16:128``) and a
fine-tuned MODEL_DIR from ``imgsim train``; both run by :class:`models.embedder.Embedder`
on TensorFlow or an OpenVINO conversion (bf16, int8)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from models.encoders.registry import EncoderKind, ImageEncoder, register
from models.manifests import MANIFEST_FILE, ModelIdentity, ModelManifest, model_identity
from models.settings import Settings

if TYPE_CHECKING:
    from models.data import Dataset


def _is_backbone(spec: str) -> bool:
    from models.pretrained import parse_spec

    return parse_spec(spec) is not None


def _is_model_dir(spec: str) -> bool:
    return (Path(spec) / MANIFEST_FILE).is_file()  # model.keras missing: loading says so


def _describe(spec: str, settings: Settings) -> tuple[ModelManifest, ModelIdentity]:
    from models.pretrained import manifest_of

    manifest = manifest_of(spec, settings)
    return manifest, model_identity(Path(spec), manifest)


def _load(spec: str, runtime: str | None, settings: Settings, collection: Dataset | None) -> ImageEncoder:
    from models.embedder import Embedder
    from models.inference import load_trained

    return Embedder(load_trained(spec), runtime=runtime, settings=settings, collection=collection)


BACKBONE = register(EncoderKind(
    "backbone", "a backbone's ImageNet features (resnet50, vgg16, inceptionv3, optionally :SIZE)",
    _is_backbone, _describe, _load,
))  # fmt: skip
MODEL_DIR = register(EncoderKind(
    "model-dir", "a MODEL_DIR made by `imgsim train`", _is_model_dir, _describe, _load,
))  # fmt: skip
