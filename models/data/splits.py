"""Split carving, per-class caps, ordering and fingerprints: pure functions of the listing."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

import numpy as np

from models.data.base import SPLITS, Item, Options, Record

FINGERPRINT_VERSION = "imgsim-dataset-v1"


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


def assign_splits(
    records: Iterable[Record], fixed_names: list[str] | None, options: Options
) -> tuple[list[str], list[Item]]:
    """Cap, carve val and order the items deterministically."""
    groups: dict[tuple[str, str | None], list[str]] = {}
    for rec in records:
        groups.setdefault((rec.split, rec.class_name), []).append(rec.key)
    class_names = list(fixed_names) if fixed_names is not None else sorted({c for _, c in groups if c is not None})
    label_of = {name: i for i, name in enumerate(class_names)}
    has_val = any(split == "val" for split, _ in groups)

    items: list[Item] = []
    for (split, class_name), keys in groups.items():
        label = label_of.get(class_name, -1) if class_name is not None else -1  # -1: unlabelled (no val carved)
        if options.max_per_class is not None and len(keys) > options.max_per_class:
            keys = _seeded_shuffle(keys, options.seed, "cap", split, str(class_name))
            keys = keys[: options.max_per_class]
        if split == "train" and not has_val and class_name is not None:
            shuffled = _seeded_shuffle(keys, options.seed, "val", class_name)
            k = _val_count(len(shuffled), options.val_fraction)
            items.extend(Item(key, label, "val") for key in shuffled[:k])
            keys = shuffled[k:]
        items.extend(Item(key, label, split) for key in keys)

    split_rank = {s: i for i, s in enumerate(SPLITS)}
    items.sort(key=lambda it: (split_rank[it.split], it.label, it.key))
    return class_names, items


def fingerprint_items(
    kind: str,
    identity: Sequence[str],
    class_names: Sequence[str],
    items: Sequence[Item],
    sizes: dict[str, int],
    options: Options,
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

    line(FINGERPRINT_VERSION, kind)
    for part in identity:
        line("source", part)
    line("options", repr(options.val_fraction), options.seed, options.max_per_class)
    line("classes", *class_names)
    for item in items:
        line(item.key, item.label, item.split, sizes.get(item.key, ""))
    return h.hexdigest()
