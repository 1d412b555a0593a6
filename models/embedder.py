"""The inference object everything embeds with: one forward pass -> embeddings + probabilities.

It runs on the runtime chosen by models/runtimes.py: TensorFlow (with the weights frozen
into the graph) or an OpenVINO conversion of the same network.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from models import openvino_runtime
from models.architecture import split_model
from models.backbones import preprocess
from models.data import Dataset
from models.encoders.registry import l2_normalise
from models.inference import TrainedModel, check_tta, combine_views, model_samples
from models.manifests import ModelManifest, model_identity
from models.runtimes import Runtime, first_available
from models.settings import Settings, get_settings

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


def gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


class FrozenForward:
    """A tf.function's graph with every variable replaced by a constant.

    Why: TensorFlow's oneDNN convolutions convert their weights to oneDNN's blocked layout
    on every call when the weights are variables, but only once when they are constants.
    That conversion is a fixed cost per call, which batch-1 calls and small micro-batches pay
    in full (docs/performance.md, D1). Outputs match the variable graph to float rounding
    (test_frozen_graph_matches_keras).
    """

    def __init__(self, forward: Any) -> None:
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        self.graph = convert_variables_to_constants_v2(forward.get_concrete_function())
        # Called through a tf.function with the original input signature, not directly: the
        # converted function has no structured signature, so each direct call first failed to
        # bind, formatted the whole input tensor into an error message, discarded it and fell
        # back to the flat signature, with the GIL held (docs/performance.md, D1).
        graph = self.graph
        self._call = tf.function(lambda x: graph(x), input_signature=forward.input_signature)

    def __call__(self, x: np.ndarray) -> Any:
        return self._call(x)


class Embedder:
    """One forward pass -> (penultimate-layer embedding, class probabilities): the Keras
    :class:`~models.encoders.ImageEncoder` (models/encoders/keras_encoder.py).

    The indexer and the service both need the 1024-d embedding and the softmax output of
    the same image; a two-output model gives both from a single call.
    """

    def __init__(
        self, trained: TrainedModel, freeze: bool | None = None, runtime: str | None = None,
        settings: Settings | None = None, collection: Dataset | None = None,
    ) -> None:  # fmt: skip
        """``collection``: the images about to be embedded; int8 calibrates on them when the
        model has no training data of its own (a backbone name)."""
        import keras
        import tensorflow as tf

        settings = settings or get_settings()
        m = trained.manifest
        self.trained = trained
        self.name = trained.name
        self.identity = model_identity(trained.path, m)
        self.settings = settings
        self.collection = collection
        self.input_size: int = m.input_size
        self.preprocessing = m.preprocessing
        self.class_names: list[str] = m.class_names
        self.has_classifier = bool(m.classifier_layer)
        embedding = trained.model.get_layer(m.embedding_layer).output
        outputs = [embedding, trained.model.output] if self.has_classifier else embedding
        self.model = keras.Model(trained.model.input, outputs)
        self._upper: keras.Model | None = None
        # One graph for every batch size: predict_on_batch would retrace per new batch shape,
        # which the service's variable-size micro-batches would hit constantly.
        size = self.input_size
        self._tf_forward = tf.function(
            lambda x: self.model(x, training=False),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)],
        )
        self.frozen = settings.freeze_graph if freeze is None else freeze
        self.runtime_record: openvino_runtime.RuntimeCache | None = None
        self.runtime: Runtime
        self.runtime, self._forward = first_available(
            runtime or settings.runtime, self._build, f"model {trained.name}", gpu=gpu_visible()
        )

    @property
    def manifest(self) -> ModelManifest:
        return self.trained.manifest

    def _build(self, runtime: Runtime) -> Any:
        """The forward function of ``runtime`` (raises RuntimeUnavailable to fall back)."""
        if runtime == "tf":
            return FrozenForward(self._tf_forward) if self.frozen else self._tf_forward
        sha = self.identity.model_sha256
        root = openvino_runtime.cache_root(self.trained.path, sha, self.settings.cache_dir)
        forward, self.runtime_record = openvino_runtime.load(
            runtime, root, sha, self.input_size, self._tf_forward,
            partial(preprocess, mode=self.preprocessing), model_samples(self.trained.manifest, self.settings, self.collection),
        )  # fmt: skip
        return forward

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 RGB (N, S, S, 3) -> (float32 (N, D) embeddings, float32 (N, C) probabilities);
        C is 0 for a model without a classifier."""
        out = self._forward(preprocess(batch, self.preprocessing))
        outs = list(out) if isinstance(out, list | tuple) else [out]
        emb = np.asarray(outs[0]).astype(np.float32, copy=False)
        if not self.has_classifier:
            return emb, np.zeros((len(batch), 0), np.float32)
        return emb, np.asarray(outs[1]).astype(np.float32, copy=False)

    def embed(self, batch: np.ndarray, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
        """As ``__call__``, the embeddings L2-normalised; with ``tta="flip"`` each image and its
        mirror image go through one call (a batch twice as large) and their outputs are
        combined (``combine_views``)."""
        if check_tta(tta) == "none":
            emb, probs = self(batch)
            return l2_normalise(emb), probs
        n = len(batch)
        emb, probs = self(np.concatenate([batch, batch[:, :, ::-1]]))
        emb, probs = combine_views(emb[:n], emb[n:], probs[:n], probs[n:])
        return l2_normalise(emb), probs

    def head_from_features(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Same outputs from cached cut-layer features (frozen models: only the head runs, in TensorFlow)."""
        if self._upper is None:
            _, self._upper = split_model(self.model, self.trained.manifest.cut_layer)
        emb, probs = self._upper.predict_on_batch(np.asarray(features, dtype=np.float32))
        return np.asarray(emb, dtype=np.float32), np.asarray(probs, dtype=np.float32)
