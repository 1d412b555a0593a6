"""Fashion-MNIST style IDX files (gzip or plain): train and t10k images and labels."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from models.data.arrays import FASHION_MNIST_CLASSES, ArrayReader, array_records
from models.data.base import Record, Source
from models.errors import ImgsimError

IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _parse_idx(data: bytes, what: str = "IDX data") -> np.ndarray:
    """Decode an (already gunzipped) unsigned-byte IDX blob into an array.

    The format is a 4-byte magic (0, 0, type 0x08, ndim), ndim big-endian
    uint32 sizes, then the raw bytes -- a dozen lines of numpy, not worth a
    dependency.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ImgsimError(f"{what} is not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ImgsimError(f"{what} holds IDX type 0x{data[2]:02x}; only unsigned bytes (0x08) are supported")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ImgsimError(f"{what} is truncated (incomplete IDX header)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape)
    if len(data) - header != expected:
        raise ImgsimError(f"{what} is truncated or corrupt: header says {expected} bytes, found {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _read_idx(path: Path) -> np.ndarray:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise ImgsimError(f"cannot read {path}: {exc}; re-install or re-download it") from exc
    return _parse_idx(raw, str(path))


def list_idx(directory: Path) -> Source:
    train_images = find_idx_file(directory, IDX_FILES["train"][0])
    if not directory.is_dir() or train_images is None:
        raise ImgsimError(
            f"Fashion-MNIST not found in {directory}: run `apt-get install dataset-fashion-mnist` "
            f"or set IMGSIM_FASHION_MNIST_DIR to the folder with train-images-idx3-ubyte.gz"
        )
    files: dict[str, tuple[Path, Path]] = {}
    for split, (image_stem, label_stem) in IDX_FILES.items():
        images = find_idx_file(directory, image_stem)
        labels = find_idx_file(directory, label_stem)
        if images is None and labels is None and split != "train":
            continue
        if images is None or labels is None:
            missing = image_stem if images is None else label_stem
            raise ImgsimError(f"{directory} lacks {missing}.gz: restore the complete Fashion-MNIST set")
        files[split] = (images, labels)

    labels_by_split = {split: _read_idx(lbl) for split, (_, lbl) in files.items()}
    records: list[Record] = []
    for split, label_array in labels_by_split.items():
        if label_array.ndim != 1:
            raise ImgsimError(f"{files[split][1]} is not a label file (expected 1 dimension)")
        records.extend(array_records(split, label_array, FASHION_MNIST_CLASSES, str(files[split][1])))

    identity = [f"{p.name}:{p.stat().st_size}" for pair in files.values() for p in pair]

    def load() -> dict[str, np.ndarray]:
        arrays = {split: _read_idx(images) for split, (images, _) in files.items()}
        for split, arr in arrays.items():
            if arr.ndim != 3 or len(arr) != len(labels_by_split[split]):
                raise ImgsimError(
                    f"{files[split][0]} does not match its labels "
                    f"(shape {arr.shape}, {len(labels_by_split[split])} labels)"
                )
        return arrays

    return Source(
        kind="idx",
        identity=identity,
        records=records,
        class_names=list(FASHION_MNIST_CLASSES),
        reader=ArrayReader(load),
    )
