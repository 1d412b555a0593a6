"""Datasets held as arrays (IDX files, keras.datasets): fixed class orders and a row reader."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from models.data.base import Item, Payload, Record
from models.errors import ImgsimError

# Label order is fixed by the sources (label i == name i), so these lists are
# NOT sorted alphabetically, unlike folder class names.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
KERAS_DATASETS: dict[str, tuple[str, ...]] = {
    "cifar10": CIFAR10_CLASSES,
    "cifar100": tuple(f"class_{i:02d}" for i in range(100)),
    "mnist": tuple(str(i) for i in range(10)),
    "fashion_mnist": FASHION_MNIST_CLASSES,
}


def array_key(split: str, index: int) -> str:
    return f"{split}/{index:05d}"


def array_records(split: str, labels: np.ndarray, class_names: Sequence[str], what: str) -> list[Record]:
    labels = np.asarray(labels).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ImgsimError(f"{what} has labels outside 0..{len(class_names) - 1}: wrong file?")
    return [Record(array_key(split, i), split, class_names[int(lbl)]) for i, lbl in enumerate(labels)]


class ArrayReader:
    """Serves rows of in-memory arrays; images are loaded on first use, then kept."""

    _KEY = re.compile(r"^(train|test)/(\d+)$")

    def __init__(self, load: Callable[[], dict[str, np.ndarray]]) -> None:
        self._load = load
        self._arrays: dict[str, np.ndarray] | None = None

    def iter_raw(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload]]:
        if self._arrays is None:
            self._arrays = self._load()
        for item in items:
            match = self._KEY.match(item.key)
            arr = self._arrays.get(match.group(1)) if match else None
            index = int(match.group(2)) if match else -1
            if arr is None or not 0 <= index < len(arr):
                yield item, None
            else:
                yield item, np.array(arr[index], dtype=np.uint8)  # copy: callers may mutate
