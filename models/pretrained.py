"""A backbone name as a model: ImageNet features, no training (for collections without labels).

``resnet50``, ``vgg16`` or ``inceptionv3``, optionally with an input size (``resnet50:128``;
default 224), stands wherever a MODEL_DIR does. The embedding is the globally average-pooled
last convolutional block (2048-d for ResNet50 and InceptionV3, 512-d for VGG16). ResNet50 at 224 px also keeps
its ImageNet classifier, so classify answers with the 1000 ImageNet classes; otherwise the
model has no classifier.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from models.backbones import BACKBONE_SPECS, build_backbone, get_spec
from models.manifests import ModelManifest, WeightsRef, read_model_manifest
from models.settings import Settings, get_settings
from models.weights import ensure_weights, imagenet_class_names

if TYPE_CHECKING:
    import keras

_SPEC = re.compile(r"^(?P<backbone>[a-z0-9]+)(?::(?P<size>\d+))?$")
DEFAULT_SIZE = 224
TOP_SIZE = 224  # Keras' ImageNet classifier top exists at this input size only
POOL_LAYER = "avg_pool"


def parse_spec(spec: str | Path) -> tuple[str, int] | None:
    """(backbone, input size) when ``spec`` names a backbone rather than a directory."""
    if Path(spec).is_dir():
        return None
    m = _SPEC.match(str(spec))
    if not m or m["backbone"] not in BACKBONE_SPECS:
        return None
    return m["backbone"], int(m["size"] or DEFAULT_SIZE)


def _with_top(backbone: str, size: int) -> bool:
    return backbone == "resnet50" and size == TOP_SIZE


def pretrained_manifest(backbone: str, size: int, settings: Settings | None = None) -> ModelManifest:
    """The manifest such a model would have: no training, no dataset, no metrics."""
    settings = settings or get_settings()
    top = _with_top(backbone, size)
    info = ensure_weights(backbone, include_top=top, settings=settings, progress=False)
    return ModelManifest(
        name=f"{backbone}-imagenet-{size}",
        backbone=backbone,
        weights=WeightsRef(source=info.source, sha256=info.sha256),
        input_size=size,
        preprocessing=get_spec(backbone).preprocessing,
        class_names=imagenet_class_names(settings) if top else [],
        embedding_layer=POOL_LAYER,
        embedding_dim=get_spec(backbone).feature_dim,
        classifier_layer="predictions" if top else None,
    )


def build_pretrained(backbone: str, size: int, settings: Settings | None = None) -> keras.Model:
    """The Keras model: image -> class probabilities (with the top) or pooled features."""
    import keras

    top = _with_top(backbone, size)
    model, _ = build_backbone(backbone, size, include_top=top, pooling="avg", settings=settings)
    if top or POOL_LAYER in {layer.name for layer in model.layers}:
        return model
    pooled = model.output  # the application's own pooling layer; renamed so every backbone looks alike
    return keras.Model(model.input, keras.layers.Identity(name=POOL_LAYER)(pooled), name=f"{backbone}_features")


def manifest_of(spec: str | Path, settings: Settings | None = None) -> ModelManifest:
    """The manifest of a MODEL_DIR or of a backbone name (no Keras needed)."""
    parsed = parse_spec(spec)
    return pretrained_manifest(*parsed, settings) if parsed else read_model_manifest(Path(spec))
