"""Class-folder trees on disk: ``root/<class>/...`` or ``root/{train,val,test}/<class>/...``."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from models.data.base import SPLITS, Item, Payload, Record, Source
from models.errors import ImgsimError


def is_hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def layout_records(paths: Iterable[str], where: str) -> list[Record]:
    """Map relative posix file paths to records (pure; shared by folders and archives).

    Split layout when some file sits at ``{train,val,test}/<class>/...``;
    otherwise every ``<class>/...`` file is a train item.
    """
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


def list_folder(root: Path) -> Source:
    paths: list[str] = []
    sizes: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):  # unreadable dirs are skipped
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if is_hidden(name):
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
    records = layout_records(paths, str(root))
    return Source(
        kind="folder",
        identity=[],
        records=records,
        class_names=None,
        reader=FolderReader(root),
        sizes=sizes,
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
