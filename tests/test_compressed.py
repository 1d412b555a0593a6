"""The compressed index (ivfpq): planned from a memory budget, exact re-ranking from a float16
vector file, memory-mapped for the service, and changed by the same write path as the others."""

from __future__ import annotations

import subprocess
import sys
from contextlib import closing
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.build import build_index
from indexer.index_plan import hnsw_ram, parse_bytes, plan
from indexer.store import IndexStore
from indexer.update import NewItem, apply_changes
from indexer.vector_file import VECTORS_FILE
from models.errors import BadInput
from models.settings import Settings, get_settings
from models.train import TrainOptions, train
from tests.test_train import make_colour_dataset

N_PER_CLASS = 110  # 3 classes: 330 images, 264 indexed (train + val), above PQ's 256 training points


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Settings]:
    """(model, flat index, ivfpq index, settings) of one tiny model over the same images."""
    root = tmp_path_factory.mktemp("compressed")
    data = make_colour_dataset(root / "data", per_class=N_PER_CLASS, test_per_class=2)
    settings = get_settings().model_copy(update={"cache_dir": root / "cache"})
    opts = TrainOptions(backbone="simple-cnn", data=str(data), out=root / "model", input_size=16, epochs=1,
                        batch_size=32, val_fraction=0.2, seed=1)  # fmt: skip
    train(opts, settings, progress=False)
    build_index(opts.out, str(data), root / "flat", settings=settings, progress=False)
    build_index(opts.out, str(data), root / "pq", index_type="ivfpq", params={"pq_m": 32, "nlist": 4},
                settings=settings, progress=False)  # fmt: skip
    return opts.out, root / "flat", root / "pq", settings


def test_plan_prefers_hnsw_then_the_longest_codes_that_fit() -> None:
    n, dim = 1_000_000, 1024
    assert plan(n, dim, hnsw_ram(n, dim)).index_type == "hnsw"
    roomy, tight = plan(n, dim, 2 * 10**9), plan(n, dim, 100 * 10**6)
    assert roomy.index_type == tight.index_type == "ivfpq"
    assert roomy.params["pq_m"] > tight.params["pq_m"] and tight.ram_bytes <= 100 * 10**6
    assert plan(n, dim, 2 * 10**9, "ivfpq").params["nlist"] == 1024  # about sqrt(n), a power of two


def test_too_small_a_budget_names_the_smallest_that_works() -> None:
    with pytest.raises(BadInput, match=r"smallest budget that works is .*--max-index-memory (\d+)M") as exc:
        plan(10_000_000, 1024, 10**6)
    smallest = int(str(exc.value).rsplit("--max-index-memory ", 1)[1].rstrip("M)")) * 10**6
    assert plan(10_000_000, 1024, smallest).index_type == "ivfpq"
    with pytest.raises(BadInput, match="not a memory size"):
        parse_bytes("lots")


def test_searches_rank_by_exact_cosines_like_the_flat_index(built: tuple) -> None:
    _, flat_dir, pq_dir, _ = built
    with closing(IndexStore.open(flat_dir)) as flat, closing(IndexStore.open(pq_dir, mmap=True)) as pq:
        assert pq.manifest.index_type == "ivfpq" and pq.size == flat.size
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(pq.index).invlists)
        assert isinstance(lists, faiss.OnDiskInvertedLists)  # memory-mapped, not read into RAM
        ids, vectors = flat.live_vectors()
        pq_ids, pq_vectors = pq.live_vectors()
        assert np.array_equal(np.sort(ids), pq_ids)
        order = np.argsort(ids)
        assert np.allclose(vectors[order], pq_vectors, atol=2e-3)  # float16 copies of the same vectors
        f_scores, f_ids = flat.search(vectors[:20], 5)
        p_scores, p_ids = pq.search(vectors[:20], 5)
        assert np.allclose(p_scores, f_scores, atol=2e-3)  # exact cosines after re-ranking
        assert (p_ids[:, 0] == f_ids[:, 0]).mean() >= 0.9
        assert np.allclose(pq.vector(int(ids[3])), vectors[3], atol=2e-3)


def test_add_and_remove_keep_the_previous_version_readable(built: tuple, tmp_path: Path) -> None:
    _, _, pq_dir, _ = built
    import shutil

    work = tmp_path / "pq"
    shutil.copytree(pq_dir.parent / f".{pq_dir.name}.imgsim", tmp_path / f".{work.name}.imgsim", symlinks=True)
    work.symlink_to(Path(f".{work.name}.imgsim") / pq_dir.resolve().name)
    before = IndexStore.open(work, mmap=True)
    ids, vectors = before.live_vectors()
    expected = before.search(vectors[:5], 3)
    new = np.random.default_rng(0).standard_normal((2, vectors.shape[1])).astype(np.float32)
    items = [NewItem(f"new-{i}.png", "test", f"sha-{i}", v) for i, v in enumerate(new)]
    changes = apply_changes(work, add=items, remove=[int(ids[0])])
    with closing(IndexStore.open(work, mmap=True)) as after:
        assert after.size == before.size + 1
        _, found = after.search(new, 1)
        assert found[:, 0].tolist() == changes.added
        assert int(ids[0]) not in after.search(vectors[:1], 10)[1][0]
        with pytest.raises(KeyError):
            after.vector(int(ids[0]))
        assert (after.path / VECTORS_FILE).samefile(before.path / VECTORS_FILE)  # shared, not copied
    scores, found = before.search(vectors[:5], 3)  # the old version still answers as it did
    assert np.array_equal(found, expected[1]) and np.array_equal(scores, expected[0])
    before.close()


def test_cli_refuses_a_budget_too_small(built: tuple, tmp_path: Path) -> None:
    model, _, _, settings = built
    data = tmp_path / "imgs"
    make_colour_dataset(data, per_class=3, test_per_class=1)
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "index", "build", "--model", str(model), "--data", str(data),
         "--out", str(tmp_path / "idx"), "--max-index-memory", "1k", "-q"],
        capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "IMGSIM_CACHE_DIR": str(settings.cache_dir)},
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "smallest budget that works" in out.stderr and not (tmp_path / "idx").exists()
