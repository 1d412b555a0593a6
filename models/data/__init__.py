"""Image datasets from folders, tar archives, Fashion-MNIST IDX files or Keras.

Every source is reduced to the same small model -- a list of ``Item`` (key,
label, split) plus a way to fetch each item's raw payload -- so training,
indexing and evaluation never care where the pixels come from. Listing is
cheap and decoding is deferred to ``decode_image``, so a bad file costs one
skipped item (counted by ``SkipCounter``) instead of a failed run.

One module per source (``folder``, ``archive``, ``idx``, ``keras_datasets``), the
split rules (``splits``) and decoding (``decode``). This package does not import
TensorFlow: the CLI and the service use it where start-up time matters.
"""

from __future__ import annotations

from pathlib import Path

from models.data.archive import ARCHIVE_SUFFIXES, list_archive
from models.data.arrays import CIFAR10_CLASSES, FASHION_MNIST_CLASSES, KERAS_DATASETS
from models.data.base import KINDS, SPLITS, Dataset, Item, Options, Payload, SkipCounter, Source
from models.data.decode import decode_image
from models.data.folder import list_folder
from models.data.idx import IDX_FILES, find_idx_file, list_idx
from models.data.keras_datasets import list_keras
from models.data.splits import assign_splits, fingerprint_items
from models.errors import ImgsimError, NotFound, UnreadableImage
from models.settings import Settings, get_settings

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "KERAS_DATASETS",
    "KINDS",
    "SPLITS",
    "Dataset",
    "Item",
    "Payload",
    "SkipCounter",
    "UnreadableImage",
    "decode_image",
    "open_dataset",
]

_ACCEPTED_FORMS = (
    "a folder of class sub-folders (optionally under train/ val/ test/), "
    "a .tar/.tar.gz/.tgz archive of such a folder, a Fashion-MNIST IDX folder, "
    "'fashion-mnist[:DIR]' or 'keras:{cifar10,cifar100,mnist,fashion_mnist}'"
)


def open_dataset(
    spec: str | Path,
    *,
    val_fraction: float | None = None,
    seed: int | None = None,
    max_per_class: int | None = None,
    labels: str = "auto",
    settings: Settings | None = None,
) -> Dataset:
    """List a dataset, carve its validation split and fingerprint it.

    Accepted ``spec`` forms:

    * any folder of images. ``labels="folders"`` (or "auto" on a class-folder layout, see
      :func:`models.data.folder.looks_like_class_folders`) reads classes from
      ``root/<class>/...`` or ``root/{train,val,test}/<class>/...``; ``labels="none"``
      (or "auto" on any other tree) keeps every file, unlabelled, in split "train".
      Hidden files and folders (``.*``) are ignored; symbolic links to folders are
      followed once. Every other file is kept: non-images are detected (and skipped)
      at decode time. With class folders, loose files outside them are ignored and
      ``train`` is required in the split layout.
    * a tar archive (``.tar``, ``.tar.gz``, ``.tgz``, also bz2/xz) of such a
      folder, optionally with ``./`` prefixes or one top-level folder.
    * ``fashion-mnist``, ``fashion-mnist:DIR`` or any folder holding
      ``train-images-idx3-ubyte.gz`` (IDX files, gzip or plain).
    * ``keras:NAME`` for cifar10, cifar100, mnist, fashion_mnist (downloads).

    Splits in the source are kept; without a ``val`` split a stratified one is
    carved from ``train``.  ``max_per_class`` caps each (source split, class)
    before carving.  Class names are sorted folder names, except for the
    array sources whose label order is fixed (see FASHION_MNIST_CLASSES).
    """
    settings = settings or get_settings()
    val_fraction = settings.val_fraction if val_fraction is None else float(val_fraction)
    seed = settings.seed if seed is None else int(seed)
    if not 0.0 <= val_fraction < 1.0:
        raise ImgsimError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_per_class is not None and max_per_class < 1:
        raise ImgsimError(f"max_per_class must be at least 1, got {max_per_class}")
    options = Options(val_fraction=val_fraction, seed=seed, max_per_class=max_per_class)

    text = str(spec)
    source = _list_source(text, settings, labels)
    class_names, items = assign_splits(source.records, source.class_names, options)
    fingerprint = fingerprint_items(source.kind, source.identity, class_names, items, source.sizes, options)
    return Dataset(
        spec=text,
        kind=source.kind,
        class_names=class_names,
        items=items,
        fingerprint=fingerprint,
        _reader=source.reader,
        file_stats={k: (source.sizes[k], m) for k, m in source.mtimes.items()},
        options={"val_fraction": val_fraction, "seed": seed, "max_per_class": max_per_class},
    )


def _list_source(text: str, settings: Settings, labels: str) -> Source:
    """The source a spec names: its kind decides the module that lists it."""
    if text == "fashion-mnist" or text.startswith("fashion-mnist:"):
        directory = text.partition(":")[2] or str(settings.fashion_mnist_dir)
        return list_idx(Path(directory).expanduser().absolute())
    if text.startswith("keras:"):
        return list_keras(text.partition(":")[2])
    # Absolute so that readers keep working if the process changes directory later.
    path = Path(text).expanduser().absolute()
    if not path.exists():
        raise NotFound(f"dataset not found: {path}")
    if path.is_dir():
        return list_idx(path) if find_idx_file(path, IDX_FILES["train"][0]) is not None else list_folder(path, labels)
    if path.name.lower().endswith(ARCHIVE_SUFFIXES):
        return list_archive(path, labels)
    raise ImgsimError(f"unsupported dataset file {path}: pass {_ACCEPTED_FORMS}")
