"""Keep an index in step with its folder: embed new files, drop vanished ones, re-embed changed ones.

A file is unchanged when its size and modification time are those recorded; only when
they differ is it read, and only when its content hash differs too is it re-embedded. A
sync with nothing to do reads no file and writes nothing; otherwise it is one new version
of the index (:func:`indexer.update.apply_changes`), so an interrupted sync changes nothing
and rerunning it finishes the job. Unchanged items keep their ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.items_table import stored_files
from indexer.store import ITEMS_FILE
from indexer.update import NewItem, apply_changes
from indexer.versions import current_version
from models.data import Dataset, Item, SkipCounter, open_dataset
from models.embed import stream_forward
from models.errors import ImgsimError, NotFound
from models.manifests import read_index_manifest

INDEXED_SPLITS = ("train", "val")


@dataclass
class SyncReport:
    added: int = 0
    removed: int = 0
    changed: int = 0
    unchanged: int = 0
    skipped: int = 0  # new or changed files that could not be read as images
    count: int = 0

    def summary(self) -> str:
        return (
            f"added {self.added}, removed {self.removed}, changed {self.changed}, unchanged {self.unchanged}"
            + (f", skipped {self.skipped} unreadable" if self.skipped else "")
            + f"; index now holds {self.count}"
        )


def _stored(index_dir: Path, source: str) -> tuple[dict[str, tuple], dict[str, tuple[int, int]]]:
    """Of the folder ``source``: key -> (id, size, mtime_ns, sha256) of its items, and
    key -> (size, mtime_ns) of its files known to be unreadable."""
    return stored_files(current_version(index_dir) / ITEMS_FILE, source)


@dataclass
class Plan:
    embed: list[Item]  # new and changed files
    vanished: list[int]  # ids of files that are gone
    changed: list[int]  # ids of files whose content changed (re-embedded under a new id)
    stats: dict[int, tuple[int, int]]  # touched files with the same content: their new size and time
    hashes: dict[str, str]  # sha256 of the files read while planning
    unchanged: int
    still_unreadable: int = 0  # known unreadable files, not changed since
    forget: list[str] = field(default_factory=list)  # known unreadable files that changed or vanished


def _plan(dataset: Dataset, items: list[Item], stored: dict, skipped: dict) -> Plan:
    listed = {i.key for i in items}
    plan = Plan([], [row[0] for key, row in stored.items() if key not in listed], [], {}, {}, 0)
    plan.forget = [key for key in skipped if key not in listed]
    for item in items:
        row = stored.get(item.key)
        stat = dataset.file_stats.get(item.key)
        if row and stat is not None and (row[1], row[2]) == stat:
            plan.unchanged += 1
            continue
        if not row and item.key in skipped:
            if skipped[item.key] == stat:
                plan.still_unreadable += 1
                continue
            plan.forget.append(item.key)  # changed: try it again
        if row:  # size or time differ: the content decides
            try:
                sha = hashlib.sha256((Path(dataset.spec) / item.key).read_bytes()).hexdigest()
            except OSError:
                sha = ""
            plan.hashes[item.key] = sha
            if sha == row[3]:
                plan.unchanged += 1
                if stat is not None:
                    plan.stats[row[0]] = stat
                continue
            plan.changed.append(row[0])
        plan.embed.append(item)
    return plan


def sync_index(
    index_dir: Path, data: str | None = None, progress: bool = True, lock_timeout: float = 0.0
) -> SyncReport:
    """Bring ``index_dir`` in step with its folder (``data``, default: the folder it was built from)."""
    m = read_index_manifest(current_version(index_dir))
    folder = Path(data or m.dataset.spec).expanduser().resolve()
    if m.dataset.kind != "folder" or not folder.is_dir():
        raise NotFound(f"sync needs the image folder an index was built from; {folder} is not one (pass --data DIR)")
    d = m.dataset
    dataset = open_dataset(folder, labels=d.labels, val_fraction=d.val_fraction, seed=d.seed,
                           max_per_class=d.max_per_class)  # fmt: skip
    if dataset.class_names != d.class_names:
        raise ImgsimError(f"{folder}: classes {dataset.class_names} differ from the index's; rebuild it")
    items = [i for i in dataset.items if i.split in INDEXED_SPLITS]
    stored, skipped = _stored(index_dir, str(folder))
    plan = _plan(dataset, items, stored, skipped)
    report = SyncReport(unchanged=plan.unchanged, removed=len(plan.vanished), count=m.count)
    report.skipped = plan.still_unreadable
    if not (plan.embed or plan.vanished or plan.stats or plan.forget):
        return report
    new: list[NewItem] = []
    unreadable: list[tuple] = []
    if plan.embed:
        from models.encoders import open_encoder  # the network is loaded only when there is something to embed

        embedder = open_encoder(m.model.path)
        new, unreadable = _embed(embedder, dataset, plan.embed, m.tta, plan.hashes, progress)
        report.skipped += len(unreadable)
    remove = plan.vanished + plan.changed
    changes = apply_changes(index_dir, new, remove, lock_timeout=lock_timeout, dedupe=False, stats=plan.stats,
                            skipped=(str(folder), unreadable, plan.forget))  # fmt: skip
    report.changed = len(plan.changed)
    report.added = sum(1 for n in new if n.key not in stored)
    report.count = changes.count
    return report


def _embed(embedder, dataset: Dataset, items: list[Item], tta: str, hashes: dict, progress: bool):
    """NewItems of the files that could be read, and (key, size, mtime, reason) of those that could not."""
    skipped = SkipCounter()
    out: list[NewItem] = []
    reader = _Hashing(dataset, hashes)  # each file is read once, for its pixels and its hash together
    batches = stream_forward(lambda b: embedder.embed(b, tta), reader, items, embedder.input_size, 32, skipped,
                             progress, desc="sync")  # fmt: skip
    for batch_items, (emb, _) in batches:
        for item, vector in zip(batch_items, emb, strict=False):
            sha = hashes[item.key]
            size, mtime = dataset.file_stats[item.key]
            name = dataset.class_names[item.label] if item.label >= 0 else None
            out.append(NewItem(item.key, dataset.spec, sha, np.asarray(vector), item.label, name, item.split,
                               file_size=size, mtime_ns=mtime))  # fmt: skip
    unreadable = [(i.key, *dataset.file_stats.get(i.key, (None, None)), why) for i, why in skipped.skipped]
    return out, unreadable


class _Hashing:
    """The dataset's reader, noting the sha256 of each file as the embedding pass reads it."""

    def __init__(self, dataset: Dataset, hashes: dict[str, str]) -> None:
        self.dataset, self.hashes = dataset, hashes

    def iter_raw(self, items: Sequence[Item]) -> Iterator[tuple[Item, bytes | np.ndarray | None]]:
        for item, raw in self.dataset.iter_raw(items):
            if isinstance(raw, bytes):
                self.hashes[item.key] = hashlib.sha256(raw).hexdigest()
            yield item, raw
