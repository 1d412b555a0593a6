"""``keras:NAME``: the datasets Keras downloads (needs the internet on first use)."""

from __future__ import annotations

import numpy as np

from models.data.arrays import KERAS_DATASETS, ArrayReader, array_records
from models.data.base import Source
from models.errors import ImgsimError


def list_keras(name: str) -> Source:
    if name not in KERAS_DATASETS:
        raise ImgsimError(f"unknown keras dataset {name!r}: use one of {', '.join(sorted(KERAS_DATASETS))}")
    try:
        import keras  # lazy: importing keras pulls in TensorFlow

        module = getattr(keras.datasets, name)
        loaded = module.load_data(label_mode="fine") if name == "cifar100" else module.load_data()
        (x_train, y_train), (x_test, y_test) = loaded
    except Exception as exc:  # any failure means "not available here"
        raise ImgsimError(
            f"could not download keras dataset {name}: {exc or type(exc).__name__}; use a local folder/archive instead"
        ) from exc
    class_names = list(KERAS_DATASETS[name])
    arrays = {"train": np.asarray(x_train, dtype=np.uint8), "test": np.asarray(x_test, dtype=np.uint8)}
    records = array_records("train", y_train, class_names, f"keras:{name} train labels")
    records += array_records("test", y_test, class_names, f"keras:{name} test labels")
    return Source(
        kind="keras",
        identity=[name, str(arrays["train"].shape), str(arrays["test"].shape)],
        records=records,
        class_names=class_names,
        reader=ArrayReader(lambda: arrays),
    )
