"""Image trees on disk: class folders (``root/<class>/...``, ``root/{train,val,test}/<class>/...``)
or any other tree of images, indexed without labels and keyed by their relative paths."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from models.data.base import SPLITS, Item, Payload, Record, Source
from models.errors import ImgsimError


def is_hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


LABELS = ("auto", "folders", "none")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".mpo")
_DATE = re.compile(r"^\d{4}([-_. ]?\d{1,2}){0,2}$|^\d+$")  # 2023, 2023-05, 20230517, 12


def looks_like_class_folders(paths: Iterable[str]) -> bool:
    """A class-folder layout: images under {train,val,test}/<class>/, or every image inside
    one of at least two top folders whose names are not dates or numbers. A flat folder, a
    mixed one, or a tree by year or date is not (its folders are not classes); an ambiguous
    tree (folders named by event) can be forced either way with ``--labels``."""
    parts_list = [p.split("/") for p in paths if p.lower().endswith(IMAGE_SUFFIXES)]
    if any(len(parts) >= 3 and parts[0] in SPLITS for parts in parts_list):
        return True
    tops = {parts[0] for parts in parts_list}
    if len(tops) < 2 or any(len(parts) < 2 for parts in parts_list):
        return False
    return not all(_DATE.match(t) for t in tops)


def layout_records(paths: Iterable[str], where: str, labels: str = "auto") -> list[Record]:
    """Map relative posix file paths to records (pure; shared by folders and archives).

    ``labels``: "folders" reads class folders (split layout when some file sits at
    ``{train,val,test}/<class>/...``, else every ``<class>/...`` file is a train item);
    "none" keeps every file, unlabelled; "auto" chooses by :func:`looks_like_class_folders`.
    """
    paths = list(paths)
    if labels not in LABELS:
        raise ImgsimError(f"unknown --labels {labels!r}; choose one of {', '.join(LABELS)}")
    if labels == "none" or (labels == "auto" and not looks_like_class_folders(paths)):
        if not paths:
            raise ImgsimError(f"no images found in {where} (hidden files and folders are skipped)")
        return [Record(p, "train", None) for p in paths]
    parts_list = [tuple(p.split("/")) for p in paths]
    split_layout = any(len(parts) >= 3 and parts[0] in SPLITS for parts in parts_list)
    records: list[Record] = []
    strays: set[str] = set()
    for parts in parts_list:
        key = "/".join(parts)
        if split_layout:
            if parts[0] in SPLITS:
                if len(parts) >= 3:
                    records.append(Record(key, parts[0], parts[1]))
            elif len(parts) >= 2:
                strays.add(parts[0])
        elif len(parts) >= 2:
            records.append(Record(key, "train", parts[0]))
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


def _walk(root: Path) -> Iterator[tuple[str, list[str]]]:
    """(relative dir, file names) of every visible folder; symbolic links to folders are
    followed once (a link loop ends there) and unreadable folders are skipped."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        yield Path(dirpath).relative_to(root).as_posix(), filenames


def list_folder(root: Path, labels: str = "auto") -> Source:
    paths: list[str] = []
    sizes: dict[str, int] = {}
    mtimes: dict[str, int] = {}
    for rel_dir, filenames in _walk(root):
        for name in filenames:
            if is_hidden(name):
                continue
            key = name if rel_dir == "." else f"{rel_dir}/{name}"
            try:
                st = os.stat(root / key)
            except OSError:
                size, mtime = -1, -1  # dangling symlink or unreadable; iter_raw will yield None
            else:
                if not stat.S_ISREG(st.st_mode):
                    continue
                size, mtime = st.st_size, st.st_mtime_ns
            paths.append(key)
            sizes[key], mtimes[key] = size, mtime
    records = layout_records(paths, str(root), labels)
    return Source(
        kind="folder",
        identity=[],
        records=records,
        class_names=None,
        reader=FolderReader(root),
        sizes=sizes,
        mtimes=mtimes,
    )


class FolderReader:
    def __init__(self, root: Path) -> None:
        self.root = root

    def iter_raw(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload]]:
        for item in items:
            try:
                data: Payload = (self.root / item.key).read_bytes()
            except OSError:
                data = None
            yield item, data
