"""Classifier architectures: an ImageNet backbone (or a small CNN) plus the embedding head.

Every model ends the same way, so the indexer and the service treat them alike:
``pool -> Dense(1024, relu, name="embedding") -> Dropout -> Dense(n, softmax, name="classifier")``.
The model is split at a *cut* layer: everything below it is frozen and its output is
cached once per image (see :mod:`models.features`); everything above it trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from models.backbones import BACKBONE_SPECS, Preprocessing, build_backbone
from models.errors import ImgsimError
from models.settings import Settings
from models.weights import WeightsInfo

if TYPE_CHECKING:
    import keras

EMBEDDING_LAYER = "embedding"
CLASSIFIER_LAYER = "classifier"
POOL_LAYER = "pool"
EMBEDDING_DIM = 1024

Trainable = Literal["frozen", "last-block"]
TRAINABLE_CHOICES: tuple[str, ...] = ("frozen", "last-block")
BACKBONES: tuple[str, ...] = (*BACKBONE_SPECS, "simple-cnn")

# Output of the last frozen layer when only the last block trains ("classic last four layers").
# InceptionV3: its top two inception blocks (mixed9, mixed10), as in the Keras fine-tuning example.
LAST_BLOCK_CUT = {"resnet50": "conv4_block6_out", "vgg16": "block4_pool", "inceptionv3": "mixed8"}
INPUT_LAYER = "image"


@dataclass(frozen=True)
class Architecture:
    model: keras.Model  # uint8-range RGB (after `preprocessing`) -> class probabilities
    cut: str | None  # layer whose output is cached; None: train from the input (simple-cnn)
    preprocessing: Preprocessing
    weights: WeightsInfo | None


def _head(x: keras.KerasTensor, n_classes: int, dropout: float) -> keras.KerasTensor:
    import keras

    x = keras.layers.Dense(EMBEDDING_DIM, activation="relu", name=EMBEDDING_LAYER)(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    return keras.layers.Dense(n_classes, activation="softmax", name=CLASSIFIER_LAYER)(x)


def simple_cnn(input_size: int, n_classes: int, dropout: float = 0.5) -> keras.Model:
    """The from-scratch baseline of the classic write-ups: conv/BN/pool blocks, dropout.

    Augmentation layers (flip, small shifts) live in the model; they are identity at inference.
    """
    import keras
    from keras import layers

    inp = keras.Input((input_size, input_size, 3), name=INPUT_LAYER)
    x = layers.Rescaling(1.0 / 255, name="rescale")(inp)
    x = layers.RandomFlip("horizontal", name="aug_flip")(x)
    x = layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", name="aug_shift")(x)
    for i, filters in enumerate((32, 64, 128)):
        for j in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"cnn{i}_conv{j}")(x)
            x = layers.BatchNormalization(name=f"cnn{i}_bn{j}")(x)
            x = layers.Activation("relu", name=f"cnn{i}_relu{j}")(x)
        x = layers.MaxPooling2D(name=f"cnn{i}_pool")(x)
        x = layers.Dropout(0.1 * (i + 2), name=f"cnn{i}_dropout")(x)
    x = layers.GlobalAveragePooling2D(name=POOL_LAYER)(x)
    return keras.Model(inp, _head(x, n_classes, dropout), name="simple_cnn")


def build_architecture(
    backbone: str,
    input_size: int,
    n_classes: int,
    trainable: Trainable = "frozen",
    dropout: float = 0.5,
    settings: Settings | None = None,
) -> Architecture:
    """Backbone + head, with everything below the cut frozen (BatchNorm stays in inference mode)."""
    import keras

    if n_classes < 2:
        raise ImgsimError(f"need at least 2 classes to train a classifier, found {n_classes}")
    if trainable not in TRAINABLE_CHOICES:
        raise ImgsimError(f"unknown trainable depth {trainable!r}; choose one of {', '.join(TRAINABLE_CHOICES)}")
    if backbone == "simple-cnn":
        return Architecture(simple_cnn(input_size, n_classes, dropout), None, "raw", None)
    if backbone not in BACKBONE_SPECS:
        raise ImgsimError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")

    base, info = build_backbone(backbone, input_size, pooling=None, settings=settings)
    # Extend the application's own graph (not nest it) so layer names stay flat
    # (conv5_block1_1_conv, ...) and the model can be cut at any of them.
    x = keras.layers.GlobalAveragePooling2D(name=POOL_LAYER)(base.output)
    model = keras.Model(base.input, _head(x, n_classes, dropout), name=f"{backbone}_classifier")
    cut = POOL_LAYER if trainable == "frozen" else LAST_BLOCK_CUT[backbone]
    freeze_below(model, cut)
    return Architecture(model, cut, BACKBONE_SPECS[backbone].preprocessing, info)


def freeze_below(model: keras.Model, cut: str) -> None:
    """Freeze every layer up to and including ``cut``; BatchNorm above it stays frozen too.

    Fine-tuning with BN statistics updated on small batches wrecks pretrained features,
    so BN layers always run in inference mode (Keras does that for non-trainable BN).
    """
    import keras

    names = [layer.name for layer in model.layers]
    if cut not in names:
        raise ImgsimError(f"layer {cut!r} not in model {model.name}")
    idx = names.index(cut)
    for i, layer in enumerate(model.layers):
        layer.trainable = i > idx and not isinstance(layer, keras.layers.BatchNormalization)


def split_model(model: keras.Model, cut: str | None) -> tuple[keras.Model | None, keras.Model]:
    """(lower, upper): lower maps images to the cut's output, upper the rest (shared layers)."""
    import keras

    if cut is None:
        return None, model
    tensor = model.get_layer(cut).output
    return keras.Model(model.input, tensor, name="lower"), keras.Model(tensor, model.output, name="upper")
