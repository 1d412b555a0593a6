"""ImageNet backbones (Keras applications) with the preprocessing each one expects.

Models take uint8-range RGB batches that went through :func:`preprocess`; keeping the
preprocessing outside the graph keeps saved models free of custom layers and lets the
indexer and the service share one pure function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from models.errors import ImgsimError
from models.settings import Settings, get_settings
from models.weights import WeightsInfo, ensure_weights

if TYPE_CHECKING:
    import keras

# Keras' "caffe" mode: RGB -> BGR, subtract the ImageNet mean per channel (BGR order).
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)

Preprocessing = Literal["caffe", "tf", "unit", "raw"]


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    preprocessing: Preprocessing
    feature_dim: int  # after global average pooling
    min_input_size: int


BACKBONE_SPECS: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec("resnet50", "caffe", 2048, 32),
    "vgg16": BackboneSpec("vgg16", "caffe", 512, 32),
    "inceptionv3": BackboneSpec("inceptionv3", "tf", 2048, 75),  # Keras' smallest input for it
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONE_SPECS[name]
    except KeyError:
        raise ImgsimError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_SPECS)}") from None


def preprocess(batch: np.ndarray, mode: Preprocessing | str) -> np.ndarray:
    """uint8 RGB (N, H, W, 3) -> float32 network input; same maths as Keras' preprocess_input."""
    x = np.asarray(batch, dtype=np.float32)
    if mode == "raw":  # the model rescales its uint8-range input itself (simple-cnn)
        return x
    if mode == "caffe":
        return x[..., ::-1] - CAFFE_MEAN_BGR
    if mode == "tf":  # Keras' "tf" mode (Inception): -1..1
        return x / 127.5 - 1.0
    if mode == "unit":
        return x / 255.0
    raise ValueError(f"unknown preprocessing mode {mode!r}")


def build_backbone(
    name: str,
    input_size: int,
    *,
    include_top: bool = False,
    pooling: Literal["avg", "max"] | None = "avg",
    pretrained: bool = True,
    settings: Settings | None = None,
) -> tuple[keras.Model, WeightsInfo | None]:
    """A Keras application model and the ImageNet weights it was loaded with.

    ``include_top=True`` (the 1000-class ImageNet classifier) exists for ResNet50 at 224 px.
    ``pretrained=False`` gives a randomly initialised network (a baseline for tests).
    """
    import keras

    spec = get_spec(name)
    if not spec.min_input_size <= input_size <= 1024:
        raise ImgsimError(
            f"input size {input_size} out of range for {name}: it takes {spec.min_input_size}..1024 pixels"
        )
    if include_top and input_size != 224:
        raise ImgsimError("the ImageNet classifier top needs input size 224")
    info = ensure_weights(name, include_top, settings or get_settings()) if pretrained else None
    kwargs = dict(
        weights=info.path if info else None,
        include_top=include_top,
        input_shape=(input_size, input_size, 3),
        pooling=None if include_top else pooling,
    )
    app = {
        "resnet50": keras.applications.ResNet50,
        "vgg16": keras.applications.VGG16,
        "inceptionv3": keras.applications.InceptionV3,
    }[name]
    return app(**kwargs), info


def make_forward(model: keras.Model, preprocessing: Preprocessing) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 RGB batch -> model outputs as numpy, through Keras' compiled predict step."""

    def forward(batch: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict_on_batch(preprocess(batch, preprocessing)))

    return forward
