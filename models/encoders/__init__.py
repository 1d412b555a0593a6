"""Image encoders behind one interface (:class:`ImageEncoder`) and one registry.

Built in: ImageNet backbones and fine-tuned MODEL_DIRs (Keras), and your own ONNX export.
A new kind is one module that calls :func:`register`, imported here.
"""

from models.encoders import keras_encoder, onnx_encoder  # noqa: F401 - each registers its kinds
from models.encoders.registry import (
    EncoderKind,
    ImageEncoder,
    describe,
    find_kind,
    kinds,
    l2_normalise,
    open_encoder,
    register,
    spec_help,
)

__all__ = [
    "EncoderKind",
    "ImageEncoder",
    "describe",
    "find_kind",
    "kinds",
    "l2_normalise",
    "open_encoder",
    "register",
    "spec_help",
]
