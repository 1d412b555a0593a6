"""Your own photo collection: any tree, no labels, kept in sync, followed by the service."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.cli import main
from indexer.build import build_index
from indexer.store import IndexStore
from indexer.sync import sync_index
from indexer.versions import current_version
from models.data import open_dataset

ROOT = Path(__file__).resolve().parent.parent


def _photo(path: Path, rgb: tuple[int, int, int], seed: int = 0, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).normal(0, 20, (size, size, 3))
    Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).save(path)
    return path


def _tree(root: Path) -> Path:
    """A photo folder as people have them: nested by date, loose files, junk, a link loop."""
    _photo(root / "2023" / "01-beach" / "a.png", (30, 90, 200), 1)
    _photo(root / "2023" / "01-beach" / "b.png", (40, 100, 210), 2)
    _photo(root / "2024" / "c.png", (200, 40, 40), 3)
    _photo(root / "loose.png", (40, 200, 40), 4)
    _photo(root / ".thumbnails" / "hidden.png", (0, 0, 0), 5)
    (root / "notes.txt").write_text("not an image")
    (root / "2024" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "2023" / "loop").symlink_to(root, target_is_directory=True)
    return root


def test_any_tree_is_listed_unlabelled_by_relative_path(tmp_path: Path) -> None:
    root = _tree(tmp_path / "photos")
    ds = open_dataset(root)
    assert not ds.labelled and ds.class_names == []
    keys = sorted(i.key for i in ds.items)
    assert keys == ["2023/01-beach/a.png", "2023/01-beach/b.png", "2024/broken.png", "2024/c.png", "loose.png",
                    "notes.txt"]  # fmt: skip
    assert {i.label for i in ds.items} == {-1} and {i.split for i in ds.items} == {"train"}


def test_class_folders_keep_their_labels_and_the_choice_can_be_forced(tmp_path: Path) -> None:
    for name, rgb in (("cat", (200, 100, 50)), ("dog", (50, 100, 200))):
        for i in range(3):
            _photo(tmp_path / "pets" / name / f"{i}.png", rgb, i)
    assert open_dataset(tmp_path / "pets").class_names == ["cat", "dog"]
    assert open_dataset(tmp_path / "pets", labels="none").class_names == []
    root = _tree(tmp_path / "photos")
    with pytest.raises(Exception, match="no images found"):
        open_dataset(root / "2024", labels="folders")


def test_an_unreadable_folder_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path / "photos")
    real = os.scandir

    def scandir(path: Any) -> Any:
        if str(path).endswith("2024"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert not any(i.key.startswith("2024/") for i in open_dataset(root).items)


@pytest.fixture
def photo_index(service_pairs: list[Any], tmp_path: Path) -> tuple[Path, Path, Path]:
    """An unlabelled folder indexed with the tiny trained model ``a``: (folder, index, model)."""
    root = _tree(tmp_path / "photos")
    index = tmp_path / "photos-index"
    report = build_index(service_pairs[0].model, str(root), index, progress=False)
    assert report.count == 4 and report.skipped.total == 2  # notes.txt, broken.png
    return root, index, service_pairs[0].model


def _ids(index: Path) -> dict[str, int]:
    store = IndexStore.open(index)
    try:
        return {r.key: r.id for r in store.rows(range(1000)).values()}
    finally:
        store.close()


def test_sync_adds_removes_and_re_embeds_keeping_ids(photo_index: tuple[Path, Path, Path]) -> None:
    root, index, _ = photo_index
    before = _ids(index)
    version = current_version(index)
    assert (
        sync_index(index, progress=False).summary()
        == "added 0, removed 0, changed 0, unchanged 4, skipped 2 unreadable; index now holds 4"
    )
    assert current_version(index) == version  # nothing to do: nothing written
    _photo(root / "2024" / "new.png", (250, 250, 20), 9)
    (root / "loose.png").unlink()
    _photo(root / "2024" / "c.png", (20, 20, 20), 10)  # same path, other content
    os.utime(root / "2023" / "01-beach" / "a.png", ns=(1, 1))  # touched, same content
    report = sync_index(index, progress=False)
    assert (report.added, report.removed, report.changed, report.unchanged, report.count) == (1, 1, 1, 2, 4)
    after = _ids(index)
    assert after["2023/01-beach/a.png"] == before["2023/01-beach/a.png"]
    assert after["2023/01-beach/b.png"] == before["2023/01-beach/b.png"]
    assert after["2024/c.png"] != before["2024/c.png"] and "loose.png" not in after and "2024/new.png" in after
    version = current_version(index)
    assert sync_index(index, progress=False).unchanged == 4 and current_version(index) == version


def test_a_no_change_sync_reads_no_image(photo_index: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _, index, _ = photo_index

    def refuse(self: Path) -> bytes:
        raise AssertionError(f"read {self}")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert sync_index(index, progress=False).unchanged == 4


_KILLED_SYNC = """
import os, signal, sys
from pathlib import Path
import indexer.update as u
real = u.write_index_files
def die(*args):
    real(*args)
    os.kill(os.getpid(), signal.SIGKILL)
u.write_index_files = die
from indexer.sync import sync_index
sync_index(Path(sys.argv[1]), progress=False)
"""


def test_a_killed_sync_leaves_the_index_and_the_rerun_finishes(photo_index: tuple[Path, Path, Path]) -> None:
    root, index, _ = photo_index
    _photo(root / "2024" / "new.png", (250, 250, 20), 9)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _KILLED_SYNC, str(index)], cwd=ROOT, env=env, check=False)
    assert done.returncode == -9
    assert IndexStore.open(index).count() == 4  # the previous version, complete
    assert sync_index(index, progress=False).added == 1 and IndexStore.open(index).count() == 5


def test_a_second_sync_at_once_is_refused_with_exit_75(photo_index: tuple[Path, Path, Path], capsys: Any) -> None:
    root, index, _ = photo_index
    hold = "import sys,time; from indexer.versions import index_lock\nwith index_lock(sys.argv[1]):\n print('x', flush=True); time.sleep(30)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(index)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "x"
        (root / "2024" / "c.png").unlink()  # something to do
        assert main(["index", "sync", "--index", str(index), "--quiet"]) == 75
        err = capsys.readouterr().err
        assert "is being changed by pid" in err and len(err.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()


def test_the_service_follows_a_sync_under_concurrent_searches(
    photo_index: tuple[Path, Path, Path], make_service_app: Any
) -> None:
    from app.config import ModelPair, ServiceSettings
    from app.main import create_app

    root, index, model = photo_index
    app = create_app(ServiceSettings(models=[ModelPair(model=model, index=index, name="p")], reload_seconds=0.05))
    query = (root / "2024" / "c.png").read_bytes()
    with TestClient(app) as client:
        assert client.get("/v1/models").json()["models"][0]["index_size"] == 4

        async def searches(ac: httpx.AsyncClient) -> list[int]:
            async def one() -> int:
                r = await ac.post("/v1/search", files={"file": ("q.png", query, "image/png")}, data={"k": "10"})
                return r.status_code

            codes = []
            for _ in range(20):
                codes += await asyncio.gather(*(one() for _ in range(4)))
                await asyncio.sleep(0.02)
            return codes

        async def run() -> list[int]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as ac:
                task = asyncio.ensure_future(searches(ac))
                for i in range(3):
                    _photo(root / "new" / f"{i}.png", (10 * i, 200, 90), 20 + i)
                    await asyncio.to_thread(sync_index, index, None, False, 10.0)
                return await task

        codes = client.portal.call(run)
        assert codes and set(codes) == {200}
        deadline = time.monotonic() + 5
        while client.get("/v1/models").json()["models"][0]["index_size"] != 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/v1/models").json()["models"][0]["index_size"] == 7
        keys = [r["key"] for r in client.post("/v1/search", files={"file": ("q.png", query, "image/png")},
                                              data={"k": "10"}).json()["results"]]  # fmt: skip
        assert "new/0.png" in keys


@pytest.mark.slow
def test_a_backbone_name_indexes_and_serves_without_training(tmp_path: Path) -> None:
    from app.config import ModelPair, ServiceSettings
    from app.main import create_app

    root = _tree(tmp_path / "photos")
    index = tmp_path / "idx"
    assert main(["index", "build", "--model", "vgg16:32", "--data", str(root), "--out", str(index), "-q"]) == 0
    app = create_app(ServiceSettings(models=[ModelPair(model=Path("vgg16:32"), index=index)]))
    query = (root / "2024" / "c.png").read_bytes()
    with TestClient(app) as client:
        info = client.get("/v1/models").json()["models"][0]
        assert info["has_classifier"] is False and info["embedding_dim"] == 512 and info["index_size"] == 4
        r = client.post("/v1/search", files={"file": ("q.png", query, "image/png")})
        assert r.status_code == 200 and r.json()["results"][0]["key"] == "2024/c.png"
        assert r.json()["results"][0]["score"] > 0.99
        r = client.post("/v1/classify", files={"file": ("q.png", query, "image/png")})
        assert r.status_code == 409 and "no classifier" in r.json()["detail"]
        assert client.post("/v1/analyze", files={"file": ("q.png", query, "image/png")}).json()["prediction"] is None
    shutil.rmtree(index.resolve().parent, ignore_errors=True)


def test_duplicates_group_copies_and_write_a_contact_sheet(photo_index: tuple[Path, Path, Path], capsys: Any) -> None:
    import json

    root, index, _ = photo_index
    (root / "copies").mkdir()
    shutil.copyfile(root / "2024" / "c.png", root / "copies" / "c-again.png")
    Image.open(root / "2024" / "c.png").save(root / "copies" / "c-resaved.png")  # re-encoded, same pixels
    sync_index(index, progress=False)
    out, report = index.parent / "dupes.html", index.parent / "dupes.json"
    assert (
        main(["duplicates", "--index", str(index), "--threshold", "0.9999", "--out", str(out), "--json", str(report)])
        == 0
    )
    groups = json.loads(report.read_text())["groups"]
    assert any(set(g["keys"]) >= {"2024/c.png", "copies/c-again.png", "copies/c-resaved.png"} for g in groups)
    assert "copies/c-again.png" in out.read_text() and "data:image/jpeg;base64," in out.read_text()
    assert "groups of near-duplicates" in capsys.readouterr().out
    assert main(["duplicates", "--index", str(index), "--threshold", "3"]) == 2


def test_export_writes_every_vector_and_row(photo_index: tuple[Path, Path, Path]) -> None:
    _, index, _ = photo_index
    out = index.parent / "all.npz"
    assert main(["export", "--index", str(index), "--out", str(out)]) == 0
    data = np.load(out)
    assert data["vectors"].shape == (4, 1024) and sorted(data["key"].tolist())[0] == "2023/01-beach/a.png"
    assert np.allclose(np.linalg.norm(data["vectors"], axis=1), 1, atol=1e-5)


def test_hash_check_confirms_a_copy_the_embedding_alone_misses(photo_index: tuple[Path, Path, Path]) -> None:
    """A brightened copy and a look-alike (same colour, other photo) both sit below the cosine
    threshold; the perceptual hashes pair the copy and not the look-alike."""
    from PIL import ImageEnhance

    from indexer.duplicates import HASH_FLOOR, find_duplicates

    root, index, _ = photo_index
    ImageEnhance.Brightness(Image.open(root / "2024" / "c.png")).enhance(1.3).save(root / "c-bright.png")
    sync_index(index, progress=False)
    store = IndexStore.open(index)
    try:
        ids = {r.key: r.id for r in store.rows(range(1000)).values()}
        vectors = dict(zip(*store.live_vectors(), strict=False))
        cos = {
            pair: float(np.dot(*(vectors[ids[k]] / np.linalg.norm(vectors[ids[k]]) for k in pair)))
            for pair in (("2024/c.png", "c-bright.png"), ("2023/01-beach/a.png", "2023/01-beach/b.png"))
        }
        threshold = max(cos.values()) + 0.001
        assert min(cos.values()) >= HASH_FLOOR, cos  # both pairs are candidates for the hash check
        assert find_duplicates(store, threshold, hash_check=False) == []
        groups = find_duplicates(store, threshold, hash_check=True)
        assert [g.keys for g in groups] == [["2024/c.png", "c-bright.png"]], cos
    finally:
        store.close()


def test_hash_check_candidates_are_each_items_nearest_only() -> None:
    """Below the threshold only pairs with one of an item's BAND_NEIGHBOURS nearest are
    candidates (a fine-tuned model puts a whole class above the floor); at or above it, every
    pair stays."""
    from indexer.duplicates import BAND_NEIGHBOURS, _chunk_pairs

    scores = np.array([1.0, 0.95, 0.9] + [0.8 - 0.01 * i for i in range(15)], dtype=np.float32)  # 1.0: itself
    found = np.arange(len(scores), dtype=np.int64)  # query row 0 finds rows 0..17
    rows, pairs_found, kept = _chunk_pairs(np.array([0, len(scores)], np.uint64), scores[::-1], found[::-1], 0, 0.85)
    assert set(rows.tolist()) == {0} and 0 not in pairs_found
    assert sorted(pairs_found.tolist()) == list(range(1, 1 + BAND_NEIGHBOURS))  # the 10 nearest, 2 of them above
    assert kept.min() == scores[BAND_NEIGHBOURS]
    _, every, _ = _chunk_pairs(np.array([0, len(scores)], np.uint64), scores, found, 0, 0.5)
    assert sorted(every.tolist()) == list(range(1, len(scores)))  # all above a low threshold: no limit
