"""What every dataset source reduces to: items with key, label and split, and a payload reader."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from models.errors import ImgsimError

SPLITS: tuple[str, ...] = ("train", "val", "test")
KINDS: tuple[str, ...] = ("folder", "archive", "idx", "keras")

Payload = bytes | np.ndarray | None


@dataclass(frozen=True)
class Item:
    """One image of a dataset; frozen so it can key caches and sets."""

    key: str
    label: int
    split: str


class Reader(Protocol):
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
    _reader: Reader | None = field(default=None, repr=False, compare=False)
    # Folder datasets: (size, st_mtime_ns) of each file as listed, so a sync compares without reading.
    file_stats: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)
    options: dict[str, float | int | None] = field(default_factory=dict, repr=False, compare=False)  # as listed

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

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    def splits(self) -> dict[str, int]:
        """Counts per split, in SPLITS order, only for splits that have items."""
        counts = {s: 0 for s in SPLITS}
        for item in self.items:
            counts[item.split] += 1
        return {s: n for s, n in counts.items() if n}

    @property
    def reader(self) -> Reader:
        """The payload fetcher: small and picklable, so a worker process can read items itself."""
        if self._reader is None:
            raise ImgsimError(f"dataset {self.spec} was not opened with open_dataset(); reopen it")
        return self._reader

    def iter_raw(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload]]:
        """Raw payloads for ``items``, each exactly once and in the given order."""
        return self.reader.iter_raw(items)


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


@dataclass(frozen=True)
class Options:
    val_fraction: float
    seed: int
    max_per_class: int | None


@dataclass(frozen=True)
class Record:
    """A listed file before split carving: key, source split, class name."""

    key: str
    split: str
    class_name: str | None  # None: unlabelled


@dataclass
class Source:
    kind: str
    identity: list[str]
    records: list[Record]
    # Fixed label order for array sources; None = sorted names from records.
    class_names: list[str] | None
    reader: Reader
    sizes: dict[str, int] = field(default_factory=dict)
    mtimes: dict[str, int] = field(default_factory=dict)  # folders only: st_mtime_ns, for sync
