"""Index versions: every write makes a new version, published by one atomic rename.

``INDEX_DIR`` is a symbolic link to the current version, kept in a hidden sibling::

    indexes/photos           -> .photos.imgsim/v000007   (the link users and the service open)
    indexes/.photos.imgsim/  v000006/  v000007/  lock  tmp-...

A writer holds ``lock`` (one writer at a time; the second waits up to a timeout, then gets
a one-line error), builds the next version in ``tmp-*``, renames it to ``vNNNNNN`` and
replaces the link with ``os.replace``: readers see the old version or the new one, never a
mix, and a crash at any point leaves the previous version in place. Leftovers of killed
writers (``tmp-*``) are removed by the next writer. The previous version is kept, so a
reader that opened it just before a swap can finish; older ones are pruned.

An index written before versions existed is a plain directory: it is read as it is and
moved into the versions folder by its next write. That move is two renames; if a crash
falls between them, the next open re-links the newest complete version.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from models.errors import Busy, ImgsimError
from models.manifests import MANIFEST_FILE

FILES = ("index.faiss", "items.sqlite", MANIFEST_FILE)
# Append-only files shared by every version through a hard link instead of a copy (a version
# reads only the part its manifest counts; see indexer.vector_file).
SHARED = ("vectors.f16",)
_VERSION = re.compile(r"^v(\d{6})$")
KEEP = 2  # the current version and the one before it


def store_dir(index_dir: Path) -> Path:
    index_dir = Path(index_dir).absolute()
    return index_dir.parent / f".{index_dir.name}.imgsim"


def _versions(folder: Path) -> list[Path]:
    found = [p for p in folder.iterdir() if _VERSION.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: p.name)


def current_version(index_dir: Path) -> Path:
    """The directory holding the current files of ``index_dir`` (re-linked after a crash)."""
    index_dir = Path(index_dir).absolute()
    if not index_dir.exists() and not index_dir.is_symlink():
        complete = [v for v in _versions(store_dir(index_dir)) if (v / MANIFEST_FILE).is_file()]
        if not complete:
            return index_dir  # nothing here: the caller says "not an index directory"
        with contextlib.suppress(OSError):  # another process may be re-linking it too
            _link(index_dir, complete[-1])
    return index_dir.resolve()


def _link(index_dir: Path, version: Path) -> None:
    """Point ``index_dir`` at ``version`` in one atomic rename (a relative link, so the
    folder can be moved or mounted elsewhere)."""
    tmp = index_dir.parent / f".{index_dir.name}.link-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(os.path.relpath(version, index_dir.parent), tmp)
    os.replace(tmp, index_dir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def index_lock(index_dir: Path, timeout: float = 0.0) -> Iterator[None]:
    """One writer per index (``flock``, released by the kernel even after ``kill -9``)."""
    folder = store_dir(index_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.seek(0)
                    holder = f.read().strip() or "another process"
                    raise Busy(
                        f"index {index_dir} is being changed by {holder}; try again when it has finished"
                    ) from None
                time.sleep(0.05)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def _adopt_legacy(index_dir: Path, folder: Path) -> None:
    """A plain directory (an index from before versions, or not an index at all)."""
    if not index_dir.is_dir() or index_dir.is_symlink():
        return
    if not (index_dir / MANIFEST_FILE).is_file():
        if any(index_dir.iterdir()):
            raise ImgsimError(f"{index_dir} exists and is not an imgsim index: choose another --out or remove it")
        index_dir.rmdir()
        return
    n = int(_versions(folder)[-1].name[1:]) + 1 if _versions(folder) else 1
    os.rename(index_dir, folder / f"v{n:06d}")  # recovered by current_version() if we die now


def _prune(folder: Path) -> None:
    for old in _versions(folder)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def new_version(index_dir: Path, copy_current: bool = False, lock_timeout: float = 0.0) -> Iterator[Path]:
    """A fresh directory to write the next version into; published when the block succeeds.

    With ``copy_current`` it starts as a copy of the current version (for updates). On any
    exception (Ctrl-C included) it is removed and the current version stays as it was.
    """
    index_dir = Path(index_dir).absolute()
    folder = store_dir(index_dir)
    with index_lock(index_dir, lock_timeout):
        for leftover in folder.glob("tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = folder / f"tmp-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        try:
            if copy_current:
                current = current_version(index_dir)
                for name in FILES:
                    shutil.copy2(current / name, tmp / name)
                for name in SHARED:
                    if (current / name).exists():
                        os.link(current / name, tmp / name)
            yield tmp
            for name in FILES:  # durable before it is published (a crash of the machine, not just of us)
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            _adopt_legacy(index_dir, folder)
            versions = _versions(folder)
            final = folder / f"v{int(versions[-1].name[1:]) + 1 if versions else 1:06d}"
            os.rename(tmp, final)
            _fsync_dir(folder)
            _link(index_dir, final)
            _fsync_dir(index_dir.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _prune(folder)
