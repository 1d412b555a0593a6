"""Index versions: atomic publication, one writer at a time, nothing lost to a kill -9."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from indexer.versions import FILES, current_version, index_lock, new_version, store_dir
from models.errors import Busy, ImgsimError

ROOT = Path(__file__).resolve().parent.parent


def _write(index_dir: Path, text: str, **kwargs: object) -> None:
    with new_version(index_dir, **kwargs) as tmp:
        for name in FILES:
            (tmp / name).write_text(f"{name} {text}")


def _read(index_dir: Path) -> str:
    return (current_version(index_dir) / "manifest.json").read_text().split()[-1]


def test_each_write_is_a_new_version_behind_one_link(tmp_path: Path) -> None:
    index = tmp_path / "photos"
    for n in "123":
        _write(index, n)
    assert index.is_symlink() and _read(index) == "3"
    assert sorted(p.name for p in store_dir(index).iterdir()) == ["lock", "v000002", "v000003"]
    assert os.readlink(index) == ".photos.imgsim/v000003"  # relative: the folder can move


def test_a_failed_write_changes_nothing(tmp_path: Path) -> None:
    index = tmp_path / "photos"
    _write(index, "1")
    with pytest.raises(KeyboardInterrupt), new_version(index, copy_current=True) as tmp:
        (tmp / "manifest.json").write_text("half")
        raise KeyboardInterrupt
    assert _read(index) == "1"
    assert not list(store_dir(index).glob("tmp-*"))


def test_an_older_plain_directory_is_adopted(tmp_path: Path) -> None:
    index = tmp_path / "old"
    index.mkdir()
    for name in FILES:
        (index / name).write_text(f"{name} legacy")
    assert _read(index) == "legacy"
    _write(index, "new", copy_current=True)
    assert index.is_symlink() and _read(index) == "new"
    assert (store_dir(index) / "v000001" / "manifest.json").read_text().endswith("legacy")


def test_a_directory_that_is_not_an_index_is_not_overwritten(tmp_path: Path) -> None:
    mine = tmp_path / "my-photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ImgsimError, match="not an imgsim index"):
        _write(mine, "1")
    assert (mine / "holiday.jpg").read_bytes() == b"precious"


_HOLD = """
import sys, time
from pathlib import Path
from indexer.versions import index_lock
with index_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_writer_is_refused_or_waits(tmp_path: Path) -> None:
    index = tmp_path / "photos"
    _write(index, "1")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(index), "1.5"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Busy, match=rf"being changed by pid {holder.pid}; try again"):
            _write(index, "2")
        start = time.monotonic()
        _write(index, "3", lock_timeout=10)  # waits for the holder, then writes
        assert time.monotonic() - start > 0.3 and _read(index) == "3"
    finally:
        holder.kill()
        holder.wait()


_KILLED = """
import os, signal, sys
from pathlib import Path
import indexer.versions as v

point, index = sys.argv[1], Path(sys.argv[2])
real = {"rename": os.rename, "link": v._link, "fsync": v._fsync_dir}
def die(name):
    def wrapper(*args):
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)
        return real[name](*args)
    return wrapper
os.rename, v._link, v._fsync_dir = die("rename"), die("link"), die("fsync")
with v.new_version(index, copy_current=True) as tmp:
    for name in v.FILES:
        (tmp / name).write_text(name + " new")
    if point == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("legacy", [False, True], ids=["versioned", "legacy"])
@pytest.mark.parametrize("point", ["writing", "rename", "fsync", "link"])
def test_kill_9_at_any_point_leaves_a_loadable_index(tmp_path: Path, point: str, legacy: bool) -> None:
    index = tmp_path / "photos"
    if legacy:
        index.mkdir()
        for name in FILES:
            (index / name).write_text(f"{name} old")
    else:
        _write(index, "old")
    done = subprocess.run([sys.executable, "-c", _KILLED, point, str(index)], cwd=ROOT, check=False)
    assert done.returncode == -9
    assert _read(index) in ("old", "new")  # the previous version, or the finished new one
    _write(index, "again", copy_current=True)  # the next writer cleans up and goes on
    assert _read(index) == "again" and not list(store_dir(index).glob("tmp-*"))


def test_the_lock_is_released_when_its_holder_dies(tmp_path: Path) -> None:
    index = tmp_path / "photos"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(index), "60"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    with index_lock(index):
        pass
