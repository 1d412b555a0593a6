"""Image datasets from folders, tar archives, Fashion-MNIST IDX files or Keras.

Every source is reduced to the same small model -- a list of ``Item`` (key,
label, split) plus a way to fetch each item's raw payload -- so training,
indexing and evaluation never care where the pixels come from.  Listing is
cheap and decoding is deferred to ``decode_image``, so a bad file costs one
skipped item (counted by ``SkipCounter``) instead of a failed run.

This module deliberately does not import TensorFlow: it is used by the CLI
and the service for tasks (listing, fingerprinting, decoding) that must stay
fast to import.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.errors import ImgsimError
from models.settings import Settings, get_settings

__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "KERAS_DATASETS",
    "KINDS",
    "SPLITS",
    "UNREADABLE_REASONS",
    "Dataset",
    "Item",
    "SkipCounter",
    "UnreadableImage",
    "decode_image",
    "open_dataset",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
KINDS: tuple[str, ...] = ("folder", "archive", "idx", "keras")
UNREADABLE_REASONS: tuple[str, ...] = ("empty", "not_an_image", "corrupt", "too_large", "unsupported_format")

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

_ARCHIVE_SUFFIXES: tuple[str, ...] = (
    ".tar.gz",
    ".tgz",
    ".tar",
    ".tar.bz2",
    ".tbz2",
    ".tar.xz",
    ".txz",
)
_IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_ACCEPTED_FORMS = (
    "a folder of class sub-folders (optionally under train/ val/ test/), "
    "a .tar/.tar.gz/.tgz archive of such a folder, a Fashion-MNIST IDX folder, "
    "'fashion-mnist[:DIR]' or 'keras:{cifar10,cifar100,mnist,fashion_mnist}'"
)
_FINGERPRINT_VERSION = "imgsim-dataset-v1"

Payload = bytes | np.ndarray | None


# --------------------------------------------------------------------------
# Public data model
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One image of a dataset; frozen so it can key caches and sets."""

    key: str
    label: int
    split: str


class _Reader(Protocol):
    """Fetches raw payloads; one implementation per source kind."""

    def iter_raw(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload]]: ...


@dataclass
class Dataset:
    """A listed dataset: labels and splits are fixed here, pixels are fetched lazily.

    ``_reader`` is a private extra field (not part of the documented
    interface) holding the source-specific payload fetcher.
    """

    spec: str
    kind: str
    class_names: list[str]
    items: list[Item]
    fingerprint: str
    _reader: _Reader | None = field(default=None, repr=False, compare=False)

    def select(self, split: str | Sequence[str] | None) -> list[Item]:
        """Items of the given split(s) in dataset order.

        Names outside ``SPLITS`` are always an error.  A known split that is
        absent from this dataset is only an error when nothing at all is
        selected, so ``select(["train", "val"])`` works with val_fraction=0
        while ``select("test")`` on a test-less dataset says what exists.
        """
        if split is None:
            return list(self.items)
        wanted = [split] if isinstance(split, str) else list(split)
        present = self.splits()
        available = ", ".join(present) or "none"
        unknown = [s for s in wanted if s not in SPLITS]
        if unknown:
            raise ImgsimError(
                f"unknown split {', '.join(map(repr, unknown))} for dataset {self.spec}: "
                f"available splits are {available}"
            )
        chosen = [item for item in self.items if item.split in wanted]
        if not chosen:
            raise ImgsimError(f"dataset {self.spec} has no {'/'.join(wanted)} items: available splits are {available}")
        return chosen

    def splits(self) -> dict[str, int]:
        """Counts per split, in SPLITS order, only for splits that have items."""
        counts = {s: 0 for s in SPLITS}
        for item in self.items:
            counts[item.split] += 1
        return {s: n for s, n in counts.items() if n}

    def iter_raw(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload]]:
        """Raw payloads for ``items``, each exactly once and in the given order."""
        if self._reader is None:
            raise ImgsimError(f"dataset {self.spec} was not opened with open_dataset(); reopen it")
        return self._reader.iter_raw(items)


class UnreadableImage(ImgsimError):
    """An image that cannot be used; ``reason`` lets callers count skips by cause."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in UNREADABLE_REASONS:
            raise ValueError(f"unknown reason {reason!r}; expected one of {UNREADABLE_REASONS}")
        self.reason = reason
        self.detail = detail
        message = f"unreadable image ({reason})"
        super().__init__(f"{message}: {detail}" if detail else message)


class SkipCounter:
    """Counts skipped items so a run can report them in one line instead of failing.

    Reasons are free strings: ``UnreadableImage.reason`` values, plus whatever
    the caller uses for a ``None`` payload (e.g. "missing").
    """

    def __init__(self) -> None:
        self.by_reason: dict[str, int] = {}
        self.skipped: list[tuple[Item, str]] = []

    def add(self, item: Item, reason: str) -> None:
        """Record one skipped item."""
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        self.skipped.append((item, reason))

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def summary(self) -> str:
        """One log line, or "" when nothing was skipped (reasons in first-seen order)."""
        total = self.total
        if not total:
            return ""
        parts = ", ".join(f"{n} {reason}" for reason, n in self.by_reason.items())
        noun = "image" if total == 1 else "images"
        return f"skipped {total} unreadable {noun} ({parts})"


# --------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------


def open_dataset(
    spec: str | Path,
    *,
    val_fraction: float | None = None,
    seed: int | None = None,
    max_per_class: int | None = None,
    settings: Settings | None = None,
) -> Dataset:
    """List a dataset, carve its validation split and fingerprint it.

    Accepted ``spec`` forms:

    * a folder ``root/<class>/...`` or ``root/{train,val,test}/<class>/...``
      (``train`` required in the split layout).  Files are taken recursively
      below each class folder; hidden files/folders (``.*``) are ignored, and
      so are loose files that are not inside a class folder.  Every other
      file is kept: non-images are detected (and skipped) at decode time.
      Class folders without any file do not become classes.
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
    options = _Options(val_fraction=val_fraction, seed=seed, max_per_class=max_per_class)

    text = str(spec)
    if text == "fashion-mnist" or text.startswith("fashion-mnist:"):
        directory = text.partition(":")[2] or str(settings.fashion_mnist_dir)
        source = _list_idx(Path(directory).expanduser().absolute())
    elif text.startswith("keras:"):
        source = _list_keras(text.partition(":")[2])
    else:
        # Absolute so that readers keep working if the process changes directory later.
        path = Path(text).expanduser().absolute()
        if not path.exists():
            raise ImgsimError(f"dataset not found: {path}")
        if path.is_dir():
            if _find_idx_file(path, _IDX_FILES["train"][0]) is not None:
                source = _list_idx(path)
            else:
                source = _list_folder(path)
        elif path.name.lower().endswith(_ARCHIVE_SUFFIXES):
            source = _list_archive(path)
        else:
            raise ImgsimError(f"unsupported dataset file {path}: pass {_ACCEPTED_FORMS}")

    class_names, items = _assign_splits(source.records, source.class_names, options)
    fingerprint = _fingerprint(source.kind, source.identity, class_names, items, source.sizes, options)
    return Dataset(
        spec=text,
        kind=source.kind,
        class_names=class_names,
        items=items,
        fingerprint=fingerprint,
        _reader=source.reader,
    )


@dataclass(frozen=True)
class _Options:
    val_fraction: float
    seed: int
    max_per_class: int | None


@dataclass(frozen=True)
class _Record:
    """A listed file before split carving: key, source split, class name."""

    key: str
    split: str
    class_name: str


@dataclass
class _Source:
    kind: str
    identity: list[str]
    records: list[_Record]
    # Fixed label order for array sources; None = sorted names from records.
    class_names: list[str] | None
    reader: _Reader
    sizes: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------
# Split carving, capping, ordering (pure)
# --------------------------------------------------------------------------


def _derived_rng(seed: int, *parts: str) -> np.random.Generator:
    """A generator per (seed, purpose, split, class).

    Deriving per class keeps one class's sample unchanged when other classes
    are added or removed, which keeps fingerprints and caches stable.
    """
    text = "\x00".join([str(seed), *parts]).encode()
    return np.random.default_rng(int.from_bytes(hashlib.sha256(text).digest()[:8], "big"))


def _seeded_shuffle(keys: Sequence[str], seed: int, *parts: str) -> list[str]:
    ordered = sorted(keys)
    perm = _derived_rng(seed, *parts).permutation(len(ordered))
    return [ordered[i] for i in perm]


def _val_count(n: int, val_fraction: float) -> int:
    """round(n * val_fraction), at least 1 and at most n - 1 when n >= 2."""
    if val_fraction <= 0 or n < 2:
        return 0
    k = math.floor(n * val_fraction + 0.5)
    return min(max(k, 1), n - 1)


def _assign_splits(
    records: Iterable[_Record], fixed_names: list[str] | None, options: _Options
) -> tuple[list[str], list[Item]]:
    """Cap, carve val and order the items deterministically."""
    groups: dict[tuple[str, str], list[str]] = {}
    for rec in records:
        groups.setdefault((rec.split, rec.class_name), []).append(rec.key)
    class_names = list(fixed_names) if fixed_names is not None else sorted({c for _, c in groups})
    label_of = {name: i for i, name in enumerate(class_names)}
    has_val = any(split == "val" for split, _ in groups)

    items: list[Item] = []
    for (split, class_name), keys in groups.items():
        label = label_of[class_name]
        if options.max_per_class is not None and len(keys) > options.max_per_class:
            keys = _seeded_shuffle(keys, options.seed, "cap", split, class_name)
            keys = keys[: options.max_per_class]
        if split == "train" and not has_val:
            shuffled = _seeded_shuffle(keys, options.seed, "val", class_name)
            k = _val_count(len(shuffled), options.val_fraction)
            items.extend(Item(key, label, "val") for key in shuffled[:k])
            keys = shuffled[k:]
        items.extend(Item(key, label, split) for key in keys)

    split_rank = {s: i for i, s in enumerate(SPLITS)}
    items.sort(key=lambda it: (split_rank[it.split], it.label, it.key))
    return class_names, items


def _fingerprint(
    kind: str,
    identity: Sequence[str],
    class_names: Sequence[str],
    items: Sequence[Item],
    sizes: dict[str, int],
    options: _Options,
) -> str:
    """Hash of what determines the items' content and roles.

    Decisions: no absolute path and no mtime anywhere (a copied or moved
    dataset must match its original); folders and archives contribute each
    item's byte size, archives also their basename and total size, IDX
    sources their file sizes.  An in-place edit that keeps every size equal
    is therefore not detected -- a trade for not hashing gigabytes on open.
    """
    h = hashlib.sha256()

    def line(*fields: object) -> None:
        h.update("\t".join(map(str, fields)).encode())
        h.update(b"\n")

    line(_FINGERPRINT_VERSION, kind)
    for part in identity:
        line("source", part)
    line("options", repr(options.val_fraction), options.seed, options.max_per_class)
    line("classes", *class_names)
    for item in items:
        line(item.key, item.label, item.split, sizes.get(item.key, ""))
    return h.hexdigest()


# --------------------------------------------------------------------------
# Folder and archive layouts
# --------------------------------------------------------------------------


def _is_hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def _layout_records(paths: Iterable[str], where: str) -> list[_Record]:
    """Map relative posix file paths to records (pure; shared by folders and archives).

    Split layout when some file sits at ``{train,val,test}/<class>/...``;
    otherwise every ``<class>/...`` file is a train item.
    """
    parts_list = [tuple(p.split("/")) for p in paths]
    split_layout = any(len(parts) >= 3 and parts[0] in SPLITS for parts in parts_list)
    records: list[_Record] = []
    strays: set[str] = set()
    for parts in parts_list:
        key = "/".join(parts)
        if split_layout:
            if parts[0] in SPLITS:
                if len(parts) >= 3:
                    records.append(_Record(key, parts[0], parts[1]))
            elif len(parts) >= 2:
                strays.add(parts[0])
        elif len(parts) >= 2:
            records.append(_Record(key, "train", parts[0]))
    if strays:
        raise ImgsimError(
            f"{where} mixes split folders ({'/, '.join(s for s in SPLITS)}/) with other folders "
            f"({', '.join(sorted(strays))}): move those under train/ (or val/, test/)"
        )
    if split_layout and not any(rec.split == "train" for rec in records):
        raise ImgsimError(f"{where} has val/ or test/ class folders but no train/: add train/<class>/")
    if not records:
        raise ImgsimError(
            f"no images found in {where}: expected <class>/<image> files, optionally under train/ val/ test/"
        )
    return records


def _list_folder(root: Path) -> _Source:
    paths: list[str] = []
    sizes: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):  # unreadable dirs are skipped
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if _is_hidden(name):
                continue
            key = name if rel_dir == "." else f"{rel_dir}/{name}"
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                size = -1  # dangling symlink or unreadable; iter_raw will yield None
            else:
                if not stat.S_ISREG(st.st_mode):
                    continue
                size = st.st_size
            paths.append(key)
            sizes[key] = size
    records = _layout_records(paths, str(root))
    return _Source(
        kind="folder",
        identity=[],
        records=records,
        class_names=None,
        reader=_FolderReader(root),
        sizes=sizes,
    )


class _FolderReader:
    def __init__(self, root: Path) -> None:
        self.root = root

    def iter_raw(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload]]:
        for item in items:
            try:
                data: Payload = (self.root / item.key).read_bytes()
            except OSError:
                data = None
            yield item, data


def _normalize_member(name: str) -> str | None:
    """Member name as a clean relative posix path, or None when it must be ignored."""
    # Plain string ops: this runs once per member (60k for CIFAR-10), pathlib is 10x slower.
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or any(p == ".." or _is_hidden(p) for p in parts):
        return None
    return "/".join(parts)


def _strip_top_folder(paths: Sequence[str]) -> str:
    """The single top folder to strip ('' if none), e.g. 'cifar10/' in cifar10/train/cat/x.jpg."""
    if not paths:
        return ""
    tops = {p.split("/", 1)[0] for p in paths}
    if len(tops) != 1:
        return ""
    top = next(iter(tops))
    if top in SPLITS or any(p.count("/") < 2 for p in paths):
        return ""
    return top + "/"


def _archive_error(path: Path, exc: BaseException) -> ImgsimError:
    return ImgsimError(f"cannot read archive {path}: {exc or type(exc).__name__}; is it a complete .tar/.tar.gz file?")


_ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def _list_archive(path: Path) -> _Source:
    """One streaming pass over the headers; nothing is extracted to disk."""
    offsets: dict[str, int] = {}
    sizes: dict[str, int] = {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = _normalize_member(member.name)
                if name is None:
                    continue
                # Later duplicates win, as with `tar -x`.
                offsets[name] = member.offset
                sizes[name] = member.size
    except _ARCHIVE_ERRORS as exc:
        raise _archive_error(path, exc) from exc

    prefix = _strip_top_folder(list(offsets))
    if prefix:
        offsets = {k[len(prefix) :]: v for k, v in offsets.items()}
        sizes = {k[len(prefix) :]: v for k, v in sizes.items()}
    records = _layout_records(offsets, str(path))
    st = path.stat()
    return _Source(
        kind="archive",
        identity=[path.name, str(st.st_size)],
        records=records,
        class_names=None,
        reader=_ArchiveReader(path, offsets),
        sizes=sizes,
    )


class _ArchiveReader:
    """Streams payloads out of a tar(.gz) in one sequential pass per call.

    Why streaming rather than caching every member on open: a .tar.gz has no
    index, so random access means re-decompressing from the start; one pass
    per ``iter_raw`` call costs about a second for CIFAR-10 (19 MB gz, 55 MB
    of JPEGs) while keeping memory bounded for archives of any size.  Items
    are yielded as soon as they are due; only members that arrive before
    their turn are buffered (none when the requested order follows the
    archive order, as dataset order usually does within a split), and the
    pass stops as soon as every requested member has been read.
    """

    def __init__(self, path: Path, offsets: dict[str, int]) -> None:
        self.path = path
        self.offsets = offsets

    def iter_raw(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload]]:
        order = list(items)
        ready: dict[int, Payload] = {}
        wanted: dict[int, list[int]] = {}
        for pos, item in enumerate(order):
            offset = self.offsets.get(item.key)
            if offset is None:
                ready[pos] = None
            else:
                wanted.setdefault(offset, []).append(pos)

        next_pos = 0
        if wanted:
            try:
                with tarfile.open(self.path, mode="r|*") as tar:
                    for member in tar:
                        positions = wanted.pop(member.offset, None)
                        if positions is None:
                            continue
                        handle = tar.extractfile(member) if member.isfile() else None
                        data = handle.read() if handle is not None else None
                        for pos in positions:
                            ready[pos] = data
                        while next_pos in ready:
                            yield order[next_pos], ready.pop(next_pos)
                            next_pos += 1
                        if not wanted:
                            break
            except _ARCHIVE_ERRORS as exc:
                raise _archive_error(self.path, exc) from exc
        # Whatever is left was not found (archive changed since listing) -> None.
        while next_pos < len(order):
            yield order[next_pos], ready.pop(next_pos, None)
            next_pos += 1


# --------------------------------------------------------------------------
# Array sources: Fashion-MNIST IDX files and keras.datasets
# --------------------------------------------------------------------------


def _find_idx_file(directory: Path, stem: str) -> Path | None:
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


def _list_idx(directory: Path) -> _Source:
    train_images = _find_idx_file(directory, _IDX_FILES["train"][0])
    if not directory.is_dir() or train_images is None:
        raise ImgsimError(
            f"Fashion-MNIST not found in {directory}: run `apt-get install dataset-fashion-mnist` "
            f"or set IMGSIM_FASHION_MNIST_DIR to the folder with train-images-idx3-ubyte.gz"
        )
    files: dict[str, tuple[Path, Path]] = {}
    for split, (image_stem, label_stem) in _IDX_FILES.items():
        images = _find_idx_file(directory, image_stem)
        labels = _find_idx_file(directory, label_stem)
        if images is None and labels is None and split != "train":
            continue
        if images is None or labels is None:
            missing = image_stem if images is None else label_stem
            raise ImgsimError(f"{directory} lacks {missing}.gz: restore the complete Fashion-MNIST set")
        files[split] = (images, labels)

    labels_by_split = {split: _read_idx(lbl) for split, (_, lbl) in files.items()}
    records: list[_Record] = []
    for split, labels in labels_by_split.items():
        if labels.ndim != 1:
            raise ImgsimError(f"{files[split][1]} is not a label file (expected 1 dimension)")
        records.extend(_array_records(split, labels, FASHION_MNIST_CLASSES, str(files[split][1])))

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

    return _Source(
        kind="idx",
        identity=identity,
        records=records,
        class_names=list(FASHION_MNIST_CLASSES),
        reader=_ArrayReader(load),
    )


def _array_key(split: str, index: int) -> str:
    return f"{split}/{index:05d}"


def _array_records(split: str, labels: np.ndarray, class_names: Sequence[str], what: str) -> list[_Record]:
    labels = np.asarray(labels).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ImgsimError(f"{what} has labels outside 0..{len(class_names) - 1}: wrong file?")
    return [_Record(_array_key(split, i), split, class_names[int(lbl)]) for i, lbl in enumerate(labels)]


class _ArrayReader:
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


def _list_keras(name: str) -> _Source:
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
    records = _array_records("train", y_train, class_names, f"keras:{name} train labels")
    records += _array_records("test", y_test, class_names, f"keras:{name} test labels")
    return _Source(
        kind="keras",
        identity=[name, str(arrays["train"].shape), str(arrays["test"].shape)],
        records=records,
        class_names=class_names,
        reader=_ArrayReader(lambda: arrays),
    )


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------

# Magic numbers of formats Pillow reads; used to tell "corrupt image" from
# "not an image" when Pillow cannot even identify the file.
_IMAGE_MAGIC: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
)


def _looks_like_image(head: bytes) -> bool:
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return True
    return head.startswith(_IMAGE_MAGIC)


def decode_image(
    raw: bytes | np.ndarray,
    size: int | None,
    *,
    max_pixels: int | None = None,
    formats: Collection[str] | None = None,
) -> np.ndarray:
    """Decode a payload to a uint8 RGB array, ``(size, size, 3)`` or native size.

    Non-square images are squashed to the square (as Keras'
    image_dataset_from_directory does) rather than cropped, so nothing is cut.
    Raises ``UnreadableImage`` with reason empty / not_an_image / corrupt /
    too_large (and unsupported_format when ``formats``, Pillow format names, is given);
    the pixel limit and the format are checked from the header before decoding.

    Pillow's own bomb guard still applies: its DecompressionBombError (images
    over 2x ``Image.MAX_IMAGE_PIXELS``) maps to too_large.  Its
    DecompressionBombWarning is not turned into an error, because
    ``warnings.catch_warnings`` mutates process-global state and this
    function runs in worker threads; with the default ``max_pixels`` every
    image that triggers the warning is rejected as too_large right after.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be positive or None, got {size}")
    limit = get_settings().max_image_pixels if max_pixels is None else max_pixels
    if isinstance(raw, np.ndarray):
        img = _image_from_array(raw, limit)
    else:
        img = _image_from_bytes(bytes(raw), limit, size, formats)
    try:
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
        out = np.array(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error) as exc:
        raise UnreadableImage("corrupt", str(exc)) from exc
    return out


def _image_from_array(arr: np.ndarray, limit: int) -> Image.Image:
    if arr.size == 0:
        raise UnreadableImage("empty", "array has no pixels")
    if arr.dtype != np.uint8:
        raise UnreadableImage("not_an_image", f"array dtype {arr.dtype} is not uint8")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise UnreadableImage("not_an_image", f"array shape {arr.shape} is not HxW or HxWx{{1,3,4}}")
    h, w = arr.shape[:2]
    if h * w > limit:
        raise UnreadableImage("too_large", f"{w}x{h} pixels exceeds the limit of {limit}")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(arr)))


def _image_from_bytes(data: bytes, limit: int, size: int | None, formats: Collection[str] | None = None) -> Image.Image:
    if not data:
        raise UnreadableImage("empty", "zero-byte file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise UnreadableImage("too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        if _looks_like_image(data[:16]):
            raise UnreadableImage("corrupt", "damaged image header") from exc
        raise UnreadableImage("not_an_image", "not a recognised image format") from exc
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error) as exc:
        raise UnreadableImage("corrupt", str(exc)) from exc

    if formats is not None and img.format not in formats:
        raise UnreadableImage("unsupported_format", str(img.format))
    w, h = img.size  # header only; no pixel has been decoded yet
    if w * h > limit:
        raise UnreadableImage("too_large", f"{w}x{h} pixels exceeds the limit of {limit}")
    if w == 0 or h == 0:
        raise UnreadableImage("corrupt", f"image has size {w}x{h}")
    try:
        if size is not None and img.format == "JPEG":
            # Let libjpeg decode at 1/2..1/8 scale when that still covers `size`.
            img.draft("RGB", (size, size))
        img.load()  # first frame for animated formats
        orientation = img.getexif().get(0x0112, 1)
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise UnreadableImage("too_large", str(exc)) from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, zlib.error) as exc:
        # Pillow plugins signal damaged data with a variety of exception types.
        raise UnreadableImage("corrupt", str(exc) or type(exc).__name__) from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency composited onto white; 16-bit grey scaled, not clipped."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.uint32)
        if mode != "I" or arr.max(initial=0) > 255:
            arr = arr >> 8
        img = Image.fromarray(arr.astype(np.uint8))
        mode = "L"
    elif mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
