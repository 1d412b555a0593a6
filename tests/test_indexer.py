"""Indexer: cosine FAISS index, stable ids, atomic writes, manifest checks, metrics, CLI.

Everything runs on a tiny synthetic colour dataset with ``simple-cnn`` models trained for
one epoch at 32 px (shared by the whole module), so the file takes seconds, not minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
from PIL import Image

from indexer.build import build_index
from indexer.embedding import embed_split
from indexer.evaluate import evaluate, exact_recall_at_k
from indexer.faiss_index import INDEX_TYPES, all_vectors, l2_normalise, new_faiss_index
from indexer.images import item_image_bytes, load_item_image
from indexer.metrics import average_precision_at_k, knn_vote, per_class, precision_at_k, relevance
from indexer.query import search as query_search
from indexer.store import IndexStore
from indexer.update import add_images, remove_ids
from indexer.versions import store_dir
from models.backbones import preprocess
from models.data import decode_image
from models.embedder import Embedder
from models.errors import ImgsimError
from models.inference import load_trained, open_as_trained
from models.manifests import model_identity
from models.settings import Settings, get_settings
from models.train import TrainOptions, train
from tests.test_train import make_colour_dataset

REQUIRED_METRICS = (
    "n_queries",
    "precision_at_1",
    "precision_at_5",
    "precision_at_10",
    "map_at_5",
    "knn_accuracy",
    "classifier_accuracy",
    "per_class",
)


UNCOMPRESSED = tuple(t for t in INDEX_TYPES if t != "ivfpq")  # ivfpq has its own tests: test_compressed.py


# --------------------------------------------------------------------------- fixtures
@dataclass
class Env:
    root: Path
    data: Path
    settings: Settings
    model: Path  # simple-cnn, seed 0
    flat: Path  # flat index of ``model`` over data's train+val (never modified: copy it)


def _train(env_root: Path, data: Path, settings: Settings, name: str, seed: int) -> Path:
    opts = TrainOptions(
        backbone="simple-cnn",
        data=str(data),
        out=env_root / name,
        input_size=32,
        epochs=1,
        batch_size=8,
        val_fraction=0.2,
        patience=5,
        seed=seed,
    )
    train(opts, settings, progress=False)
    return opts.out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("indexer")
    data = make_colour_dataset(root / "data")  # 10 train + 4 test per class -> 8 train, 2 val, 4 test
    base = get_settings()
    (root / "cache").mkdir()
    base.weights_dir.mkdir(parents=True, exist_ok=True)
    (root / "cache" / "weights").symlink_to(base.weights_dir.resolve(), target_is_directory=True)
    settings = base.model_copy(update={"cache_dir": root / "cache"})
    model = _train(root, data, settings, "model-a", seed=0)
    report = build_index(model, str(data), root / "flat", settings=settings, progress=False)
    assert report.path_taken == "cached-features" and report.count == 30
    return Env(root, data, settings, model, root / "flat")


@pytest.fixture(scope="module")
def model_b(env: Env) -> Path:
    """A second model (other seed): same architecture, different weights."""
    return _train(env.root, env.data, env.settings, "model-b", seed=1)


@pytest.fixture
def flat_copy(env: Env, tmp_path: Path) -> Path:
    dst = tmp_path / "idx"
    shutil.copytree(env.flat, dst)
    return dst


@pytest.fixture
def cli_settings(env: Env) -> Iterator[None]:
    """Point the process-wide settings (used by the CLI) at the module's cache folder."""
    old = os.environ.get("IMGSIM_CACHE_DIR")
    os.environ["IMGSIM_CACHE_DIR"] = str(env.settings.cache_dir)
    get_settings.cache_clear()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("IMGSIM_CACHE_DIR", None)
        else:
            os.environ["IMGSIM_CACHE_DIR"] = old
        get_settings.cache_clear()


def _png(path: Path, rgb: tuple[int, int, int], seed: int, size: int = 16) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@dataclass
class Snapshot:
    manifest: dict
    rows: dict  # id -> ItemRow
    vectors: dict  # id -> stored (normalised) vector


def _snapshot(index_dir: Path) -> Snapshot:
    """Open the index (which cross-checks it) and assert manifest == FAISS == SQLite counts."""
    store = IndexStore.open(index_dir)
    try:
        ids, vecs = store.live_vectors()
        n_rows = store.count()
        assert store.manifest.count == store.size == n_rows == len(ids)
        assert store.index.ntotal == store.size + store.manifest.deleted == store.size + len(store.dead)
        rows = store.rows(ids.tolist())
        assert sorted(rows) == sorted(ids.tolist())  # the same ids in FAISS and in the table
        assert store.manifest.next_id > max(rows, default=-1)
        return Snapshot(store.manifest, rows, {int(i): v for i, v in zip(ids, vecs, strict=False)})
    finally:
        store.close()


def _no_temp_dirs(index_dir: Path) -> None:
    """Nothing half-written: no temporary siblings, no unfinished version, at most two versions kept."""
    siblings = [p.name for p in index_dir.parent.iterdir() if p.name.startswith(f".{index_dir.name}.")]
    assert siblings in ([], [f".{index_dir.name}.imgsim"]), siblings
    versions = store_dir(index_dir)
    if versions.is_dir():
        names = sorted(p.name for p in versions.iterdir())
        assert not [n for n in names if n.startswith("tmp-")], names
        assert len([n for n in names if n.startswith("v")]) <= 2, names


def _search(index_dir: Path, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    store = IndexStore.open(index_dir)
    try:
        return store.search(vectors, k)
    finally:
        store.close()


# ------------------------------------------------------------- 1. cosine scores
def test_l2_normalise_unit_rows_and_finite_zero_rows() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0], [-2.0, 0.0]], dtype=np.float64)
    y = l2_normalise(x)
    assert y.dtype == np.float32 and y.flags["C_CONTIGUOUS"]
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y[0], [0.6, 0.8], rtol=1e-6)
    assert y[1].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(y[3], [-1.0, 0.0])
    np.testing.assert_allclose(np.linalg.norm(y[[0, 3]], axis=1), 1.0, rtol=1e-6)
    rng = np.random.default_rng(0)
    z = l2_normalise(rng.normal(size=(50, 7)) * rng.uniform(0.01, 100, size=(50, 1)))
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("index_type", UNCOMPRESSED)
def test_scores_are_dot_products_of_normalised_vectors(index_type: str) -> None:
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(200, 16)) * rng.uniform(0.1, 10, size=(200, 1))
    ids = np.arange(200, dtype=np.int64) * 3 + 1000  # our ids, not positions
    vecs = l2_normalise(raw)
    index = new_faiss_index(16, index_type, {"nlist": 4}, vecs)
    index.add_with_ids(vecs, ids)
    queries = rng.normal(size=(7, 16)) * 5.0
    scores, found = index.search(l2_normalise(queries), 10)
    assert np.all(np.isin(found, ids))
    by_id = dict(zip(ids.tolist(), range(len(ids)), strict=False))
    atol = 2e-3 if index_type == "hnsw-fp16" else 1e-5  # float16 vectors: ~3 significant digits
    for q, s_row, id_row in zip(queries, scores, found, strict=False):
        expected = l2_normalise(q[None]) @ l2_normalise(raw[[by_id[i] for i in id_row]]).T
        np.testing.assert_allclose(s_row, expected[0], atol=atol)
        assert np.all(np.diff(s_row) <= 1e-6)  # best first
    if index_type == "flat":  # exact: the true top 10 by cosine
        cos = l2_normalise(queries) @ vecs.T
        np.testing.assert_array_equal(found, ids[np.argsort(-cos, axis=1)[:, :10]])


def test_built_index_scores_are_cosines_of_model_embeddings(env: Env) -> None:
    trained = load_trained(env.model)
    dataset = open_as_trained(trained.manifest, str(env.data), env.settings)
    embedder = Embedder(trained)
    cached = embed_split(embedder, dataset, dataset.select(["train", "val"]), 32, env.settings, True, False)
    queries = embed_split(embedder, dataset, dataset.select("test"), 32, env.settings, True, False)
    keys, raw, q_keys, q_raw = cached.keys, cached.vectors, queries.keys, queries.vectors
    snap = _snapshot(env.flat)
    assert snap.manifest.metric == "inner_product" and snap.manifest.score == "cosine"
    key_to_id = {r.key: i for i, r in snap.rows.items()}
    assert sorted(key_to_id) == sorted(keys)
    raw_by_id = {key_to_id[k]: v for k, v in zip(keys, raw, strict=False)}
    for i, v in snap.vectors.items():  # stored vectors are the normalised embeddings
        np.testing.assert_allclose(v, l2_normalise(raw_by_id[i][None])[0], atol=1e-6)
        assert abs(np.linalg.norm(v) - 1.0) < 1e-5

    queries = q_raw * 3.5  # the scale of a query must not matter
    scores, ids = _search(env.flat, queries, 10)
    assert ids.shape == (len(q_keys), 10) and np.all(ids >= 0)
    for q, s_row, id_row in zip(queries, scores, ids, strict=False):
        expected = l2_normalise(q[None]) @ l2_normalise(np.stack([raw_by_id[int(i)] for i in id_row])).T
        np.testing.assert_allclose(s_row, expected[0], atol=1e-5)
    # flat search is exact: the top 10 of the brute-force cosine ranking
    all_ids = np.array(sorted(raw_by_id))
    cos = l2_normalise(queries) @ l2_normalise(np.stack([raw_by_id[i] for i in all_ids])).T
    np.testing.assert_allclose(scores, -np.sort(-cos, axis=1)[:, :10], atol=1e-5)


def test_frozen_graph_matches_keras(env: Env) -> None:
    """The service's and indexer's frozen graph gives Keras' outputs, at any batch size."""
    trained = load_trained(env.model)
    frozen, plain = Embedder(trained, freeze=True), Embedder(trained, freeze=False)
    assert frozen.frozen and not plain.frozen
    assert not frozen._forward.graph.captured_inputs  # weights are constants, not variables
    size = frozen.input_size
    imgs = np.random.default_rng(0).integers(0, 256, (7, size, size, 3), dtype=np.uint8)
    for n in (1, 7):
        emb, probs = frozen(imgs[:n])
        emb_plain, probs_plain = plain(imgs[:n])
        np.testing.assert_allclose(emb, emb_plain, rtol=1e-4, atol=1e-5)
        keras_probs = trained.model.predict_on_batch(preprocess(imgs[:n], trained.manifest.preprocessing))
        np.testing.assert_allclose(probs, keras_probs, rtol=1e-4, atol=1e-6)
        assert emb.shape[0] == n and probs.shape == (n, len(trained.manifest.class_names))


def test_a_forward_pass_never_formats_its_input(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """No call formats the batch into a string: TensorFlow did so on every call of the frozen
    graph (a failed signature bind, caught and retried), holding the GIL for milliseconds."""
    import tensorflow as tf

    formatted = []
    tensor_type = type(tf.constant(0.0))
    original = tensor_type.__repr__
    monkeypatch.setattr(tensor_type, "__repr__", lambda t: formatted.append(t.shape) or original(t))
    trained = load_trained(env.model)
    size = trained.manifest.input_size
    imgs = np.zeros((3, size, size, 3), dtype=np.uint8)
    for freeze in (True, False):
        Embedder(trained, freeze=freeze)(imgs)
    assert formatted == []


def test_cached_and_full_model_paths_agree(env: Env, tmp_path: Path) -> None:
    report = build_index(env.model, str(env.data), tmp_path / "full", use_cache=False, settings=env.settings,
                         progress=False)  # fmt: skip
    assert report.path_taken == "full-model" and report.count == 30
    full, cached = _snapshot(tmp_path / "full"), _snapshot(env.flat)
    assert full.manifest.embedding_path == "full-model" and cached.manifest.embedding_path == "cached-features"
    assert full.rows == cached.rows
    for i, v in cached.vectors.items():
        np.testing.assert_allclose(full.vectors[i], v, atol=1e-5)


def test_embed_flip_tta_is_the_sum_of_both_views(env: Env) -> None:
    embedder = Embedder(load_trained(env.model))
    batch = np.random.default_rng(3).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    e, p = embedder(batch)
    em, pm = embedder(batch[:, :, ::-1].copy())
    e_tta, p_tta = embedder.embed(batch, "flip")  # embed() returns unit-length rows
    np.testing.assert_allclose(e_tta, l2_normalise(e + em), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(p_tta, (p + pm) / 2, rtol=1e-4, atol=1e-6)
    assert not np.allclose(e_tta, l2_normalise(e), atol=1e-3)  # the mirrored view really differs
    np.testing.assert_allclose(embedder.embed(batch)[0], l2_normalise(e), rtol=1e-6, atol=1e-7)
    with pytest.raises(ImgsimError, match="unknown test-time augmentation 'rotate'"):
        embedder.embed(batch, "rotate")


def _train_flip(env: Env) -> Path:
    opts = TrainOptions(
        backbone="simple-cnn", data=str(env.data), out=env.root / "model-flip", input_size=32, epochs=1,
        batch_size=8, val_fraction=0.2, patience=5, seed=0, flip=True,
    )  # fmt: skip
    if not (opts.out / "manifest.json").is_file():
        train(opts, env.settings, progress=False)
    return opts.out


@pytest.mark.parametrize("flip_trained", [False, True], ids=["mirrors-by-full-model", "mirrored-training-cache"])
def test_flip_tta_index_cached_and_full_paths_agree(env: Env, tmp_path: Path, flip_trained: bool) -> None:
    """--tta flip stores normalise(emb(x) + emb(mirror(x))), from cached features or the full model."""
    model = _train_flip(env) if flip_trained else env.model
    cached = build_index(model, str(env.data), tmp_path / "c", tta="flip", settings=env.settings, progress=False)
    full = build_index(model, str(env.data), tmp_path / "f", tta="flip", use_cache=False, settings=env.settings,
                       progress=False)  # fmt: skip
    assert (cached.path_taken, full.path_taken) == ("cached-features", "full-model")
    if flip_trained:  # training cached the mirrored train images; val has no mirrored cache
        assert cached.notes == ["train: cached mirrored features", "val: full model on mirrored images"]
    else:
        assert cached.notes == ["train: full model on mirrored images", "val: full model on mirrored images"]
    c, f = _snapshot(tmp_path / "c"), _snapshot(tmp_path / "f")
    assert c.manifest.tta == f.manifest.tta == "flip" and c.rows == f.rows
    build_index(model, str(env.data), tmp_path / "p", settings=env.settings, progress=False)
    plain = _snapshot(tmp_path / "p")
    assert plain.manifest.tta == "none"
    embedder = Embedder(load_trained(model))
    first = min(c.rows)
    row = c.rows[first]
    image = decode_image((env.data / row.key).read_bytes(), 32)[None]
    e, _ = embedder(image)
    em, _ = embedder(image[:, :, ::-1].copy())
    np.testing.assert_allclose(c.vectors[first], l2_normalise(e + em)[0], atol=1e-4)
    for i, v in c.vectors.items():
        np.testing.assert_allclose(f.vectors[i], v, atol=1e-5)
    assert any(not np.allclose(plain.vectors[i], v, atol=1e-3) for i, v in c.vectors.items())


def test_evaluate_embeds_queries_as_the_index_did(env: Env, tmp_path: Path) -> None:
    """On a flip-TTA index, each indexed image queried back finds itself with cosine 1."""
    build_index(env.model, str(env.data), tmp_path / "tta", tta="flip", settings=env.settings, progress=False)
    result, raw = evaluate(env.model, tmp_path / "tta", str(env.data), split="train", settings=env.settings,
                           progress=False)  # fmt: skip
    assert result["tta"] == "flip"
    np.testing.assert_allclose(raw["scores"][:, 0], 1.0, atol=1e-4)
    plain_result, plain_raw = evaluate(env.model, env.flat, str(env.data), split="train", settings=env.settings,
                                       progress=False)  # fmt: skip
    assert plain_result["tta"] == "none"
    np.testing.assert_allclose(plain_raw["scores"][:, 0], 1.0, atol=1e-4)


def test_unknown_tta_is_refused(env: Env, tmp_path: Path) -> None:
    with pytest.raises(ImgsimError, match="unknown test-time augmentation"):
        build_index(env.model, str(env.data), tmp_path / "x", tta="rotate", settings=env.settings, progress=False)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------ 2. ids stable across add/remove
@pytest.mark.parametrize("index_type", UNCOMPRESSED)
def test_remove_keeps_other_ids_keys_vectors_and_results(env: Env, tmp_path: Path, index_type: str) -> None:
    out = tmp_path / "idx"
    if index_type == "flat":
        shutil.copytree(env.flat, out)
    else:
        build_index(env.model, str(env.data), out, index_type=index_type, settings=env.settings, progress=False)
    before = _snapshot(out)
    assert before.manifest.index_type == index_type and sorted(before.rows) == list(range(30))
    probe = np.stack([before.vectors[i] for i in (0, 10, 20)])
    s_before, ids_before = _search(out, probe, 30)

    drop = [3, 17, 29]  # 29 is the largest id: it must not come back with the next add
    r = remove_ids(out, drop)
    assert (r.removed, r.count) == (drop, 27)
    after = _snapshot(out)
    _no_temp_dirs(out)
    assert sorted(after.rows) == sorted(set(range(30)) - set(drop))
    assert after.rows == {i: r for i, r in before.rows.items() if i not in drop}  # same keys, labels, hashes
    for i, v in after.vectors.items():
        np.testing.assert_array_equal(v, before.vectors[i])
    assert after.manifest.next_id == before.manifest.next_id == 30

    s_after, ids_after = _search(out, probe, 27)
    assert not np.isin(ids_after, drop).any()
    if index_type.startswith("hnsw"):  # approximate: each probe still finds itself first
        assert ids_after[:, 0].tolist() == [0, 10, 20]
        np.testing.assert_allclose(s_after[:, 0], 1.0, atol=2e-3 if index_type == "hnsw-fp16" else 1e-5)
    else:  # exact (flat; IVF with a single list on 30 items): the old ranking minus the removed ids
        for row in range(3):
            keep = ~np.isin(ids_before[row], drop)
            np.testing.assert_array_equal(ids_after[row], ids_before[row][keep])
            np.testing.assert_allclose(s_after[row], s_before[row][keep], atol=1e-6)

    with pytest.raises(ImgsimError, match=r"unknown ids: 3, 999"):
        remove_ids(out, [3, 999, 5])
    assert _snapshot(out).rows == after.rows  # a refused removal changes nothing
    if index_type.startswith("hnsw"):  # the graph keeps deleted items, filtered, until they are 20 %
        assert after.manifest.deleted == 3
        store = IndexStore.open(out)
        try:  # every way of reading the index leaves the deleted items out
            with pytest.raises(KeyError):
                store.vector(3)
            assert not np.isin(store.live_vectors()[0], drop).any()
            for label in {r.label_name for r in before.rows.values()}:
                hits = query_search(store, probe[0], 30, label=label)
                assert hits and not {h.id for h in hits} & set(drop)
                assert {h.id for h in hits} == {i for i, r in after.rows.items() if r.label_name == label}
        finally:
            store.close()
        with pytest.raises(ImgsimError, match="unknown ids: 3"):  # a deleted id stays deleted
            remove_ids(out, [3])
        remove_ids(out, [1, 2])
        assert _snapshot(out).manifest.deleted == 5
        remove_ids(out, [4, 5])  # 7 of 30 > 20 %: compacted
        compacted = _snapshot(out)
        assert compacted.manifest.deleted == 0 and len(compacted.rows) == 23
        _, ids_compacted = _search(out, probe, 23)
        assert not np.isin(ids_compacted, drop + [1, 2, 4, 5]).any() and ids_compacted[:, 0].tolist() == [0, 10, 20]


def test_add_gets_new_ids_skips_duplicates_and_never_reuses_removed(env: Env, flat_copy: Path, tmp_path: Path) -> None:
    out = flat_copy
    before = _snapshot(out)
    assert remove_ids(out, [29, 4]).count == 28

    new = tmp_path / "new"
    purple = _png(new / "purple.png", (150, 40, 200), seed=1)
    yellow = _png(new / "yellow.png", (230, 220, 30), seed=2)
    same_as_dataset = new / "copy-of-red.png"  # other name, same bytes as an indexed file
    shutil.copyfile(env.data / "train" / "red" / "000.png", same_as_dataset)
    (new / "notes.txt").write_text("not an image")
    r = add_images(out, [purple, yellow, same_as_dataset, purple, new / "notes.txt"], label="red", progress=False)
    assert (r.added, r.duplicates, r.skipped, r.count) == (2, 2, 1, 30)
    step1 = _snapshot(out)
    _no_temp_dirs(out)
    added = {i: row for i, row in step1.rows.items() if i not in before.rows}
    assert sorted(added) == [30, 31]  # above the previous max (29, removed) and not reusing it
    assert {row.key for row in added.values()} == {"purple.png", "yellow.png"}
    for row in added.values():
        assert row.split == "added" and row.label == 2 and row.label_name == "red"
        assert Path(row.source) == new.resolve() / row.key
    assert {i: row for i, row in step1.rows.items() if i in before.rows} == {
        i: row for i, row in before.rows.items() if i not in (29, 4)
    }
    for i in before.rows:
        if i not in (29, 4):
            np.testing.assert_array_equal(step1.vectors[i], before.vectors[i])
    # the new vector is the normalised embedding of the file: it finds itself with cosine 1
    scores, ids = _search(out, np.stack([step1.vectors[30]]), 1)
    assert ids[0, 0] == 30 and abs(scores[0, 0] - 1.0) < 1e-5

    # The same file again (also via its folder) is a duplicate: nothing is written.
    mtime = (out / "index.faiss").stat().st_mtime_ns
    r = add_images(out, [purple], progress=False)
    assert (r.added, r.duplicates, r.skipped, r.count) == (0, 1, 0, 30)
    assert (out / "index.faiss").stat().st_mtime_ns == mtime
    assert _snapshot(out).rows == step1.rows

    # Remove an added item, add another file: it gets 32, not the freed 30 or 31.
    remove_ids(out, [30])
    orange = _png(tmp_path / "more" / "orange.png", (240, 140, 20), seed=3)
    r = add_images(out, [orange.parent], progress=False)  # a folder works too
    assert r.added == 1 and r.count == 30
    step2 = _snapshot(out)
    assert max(step2.rows) == 32 and 30 not in step2.rows and step2.rows[32].label == -1
    assert step2.rows[32].label_name is None
    assert {i: row for i, row in step2.rows.items() if i != 32} == {i: row for i, row in step1.rows.items() if i != 30}


# ----------------------------------------------------- 3. interrupted writes keep the old index
def _interrupting_write(path: str) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("how", ["write_index_files", "faiss.write_index", "embedding"])
def test_interrupted_build_keeps_old_index(
    env: Env, flat_copy: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    import indexer.build

    out = flat_copy
    old_manifest = (out / "manifest.json").read_text()
    old = _snapshot(out)

    if how == "write_index_files":  # after the item table was written into the temp dir

        def boom(*args: object, **kwargs: object) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(indexer.build, "write_index_files", boom)
    elif how == "faiss.write_index":  # a partial index file, then Ctrl-C

        def partial(index: faiss.Index, path: str) -> None:
            Path(path).write_bytes(b"IxF2 half a file")
            raise KeyboardInterrupt

        monkeypatch.setattr(faiss, "write_index", partial)
    else:  # Ctrl-C after the first embedded batch (the cached path runs one batch per split)
        real = Embedder.head_from_features
        calls = []

        def head(self: Embedder, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            calls.append(len(features))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(self, features)

        monkeypatch.setattr(Embedder, "head_from_features", head)

    with pytest.raises(KeyboardInterrupt):
        build_index(env.model, str(env.data), out, index_type="hnsw", settings=env.settings, progress=False)
    if how == "embedding":
        assert calls == [24, 6]  # train, then val
    monkeypatch.undo()
    assert (out / "manifest.json").read_text() == old_manifest
    now = _snapshot(out)
    assert now.manifest.index_type == "flat" and now.rows == old.rows
    _no_temp_dirs(out)


def test_interrupted_update_keeps_old_index(env: Env, flat_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import indexer.update

    out = flat_copy
    old = _snapshot(out)

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(indexer.update, "write_index_files", boom)
    with pytest.raises(KeyboardInterrupt):
        remove_ids(out, [0, 1])
    monkeypatch.undo()
    assert _snapshot(out).rows == old.rows
    _no_temp_dirs(out)


# ------------------------------------------------------------- 4. manifest mismatch
def test_other_model_is_refused(env: Env, model_b: Path) -> None:
    a, b = load_trained(env.model), load_trained(model_b)
    IndexStore.open(env.flat, expect_model=model_identity(a.path, a.manifest)).close()
    with pytest.raises(ImgsimError, match=r"does not match.*model model_sha256: index built with '[0-9a-f]{64}'"):
        IndexStore.open(env.flat, expect_model=model_identity(b.path, b.manifest))
    with pytest.raises(ImgsimError, match="model_sha256"):
        evaluate(model_b, env.flat, str(env.data), settings=env.settings, progress=False)
    with pytest.raises(ImgsimError, match=r"model embedding_dim: index built with 1024, given 512"):
        IndexStore.open(
            env.flat, expect_model=model_identity(a.path, a.manifest).model_copy(update={"embedding_dim": 512})
        )


def _edit_manifest(index_dir: Path, **changes: object) -> None:
    path = index_dir / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def test_tampered_manifest_is_refused(env: Env, tmp_path: Path) -> None:
    count = tmp_path / "count"
    shutil.copytree(env.flat, count)
    _edit_manifest(count, count=31)
    with pytest.raises(ImgsimError, match=r"counts differ: FAISS 30, items table 30, manifest 31"):
        IndexStore.open(count)
    with pytest.raises(ImgsimError, match="counts differ"):
        add_images(count, [env.data / "test" / "red" / "000.png"], progress=False)

    dim = tmp_path / "dim"
    shutil.copytree(env.flat, dim)
    _edit_manifest(dim, embedding_dim=512)
    with pytest.raises(ImgsimError, match=r"FAISS dimension 1024 != manifest 512"):
        IndexStore.open(dim)

    rows = tmp_path / "rows"
    shutil.copytree(env.flat, rows)
    with sqlite3.connect(rows / "items.sqlite") as db:
        db.execute("DELETE FROM items WHERE id = 0")
    with pytest.raises(ImgsimError, match=r"counts differ: FAISS 30, items table 29"):
        IndexStore.open(rows)

    with pytest.raises(ImgsimError, match="is not an index directory"):
        IndexStore.open(tmp_path / "nowhere")


# ------------------------------------------------------------------- 5. metrics
def test_relevance_and_precision_at_k() -> None:
    rel = relevance(np.array([[2, 1, 2, -1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]), np.array([2, 1, 1]))
    assert rel.tolist() == [
        [True, False, True, False, False],
        [False, False, False, False, False],
        [True, True, True, True, True],
    ]
    np.testing.assert_allclose(precision_at_k(rel, 1), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(precision_at_k(rel, 3), [2 / 3, 0.0, 1.0])
    np.testing.assert_allclose(precision_at_k(rel, 5), [0.4, 0.0, 1.0])
    # Fewer results than k (an index smaller than k): missing results count as misses, (1/k) * sum.
    np.testing.assert_allclose(precision_at_k(rel[:, :3], 5), [0.4, 0.0, 0.6])


def test_average_precision_at_k_matches_the_documented_definition() -> None:
    rel = np.array(
        [
            [1, 0, 1, 0, 0],  # R = 10: (P@1 + P@3) / min(5, 10) = (1 + 2/3) / 5
            [1, 0, 1, 0, 0],  # R = 2 < k: (1 + 2/3) / 2
            [1, 1, 0, 0, 0],  # R = 2 < k, both found first: a perfect 1
            [0, 1, 0, 0, 1],  # R = 3: (P@2 + P@5) / 3 = (1/2 + 2/5) / 3
            [0, 0, 0, 0, 0],  # R = 0: 0, not a division by zero
            [1, 1, 1, 1, 1],  # R = 7: 5 / 5
        ],
        dtype=bool,
    )
    ap = average_precision_at_k(rel, 5, np.array([10, 2, 2, 3, 0, 7]))
    np.testing.assert_allclose(ap, [(1 + 2 / 3) / 5, (1 + 2 / 3) / 2, 1.0, 0.3, 0.0, 1.0])
    # only the first k results count
    np.testing.assert_allclose(average_precision_at_k(rel[[3]], 2, np.array([3])), [0.5 / 2])
    assert np.all((ap >= 0) & (ap <= 1))


def test_knn_vote_majority_then_summed_score() -> None:
    labels = np.array(
        [
            [0, 1, 1, 2, 0],  # 0 and 1 tie with 2 votes; 0's scores sum higher (1.2 vs 1.0)
            [1, 0, 0, 1, 2],  # 0 and 1 tie; 1's scores sum higher (1.7 vs 0.4) though 2 has the top score
            [2, 0, 0, 0, 1],  # 3 votes beat one very similar result
            [0, 0, 1, 2, 3],  # 2 votes with cosine -1 still beat single votes with cosine 1
            [-1, -1, 1, -1, 2],  # unknown labels (-1) do not vote: 1 vs 2 tie, 2 scores higher
        ]
    )
    scores = np.array(
        [
            [0.9, 0.5, 0.5, 0.4, 0.3],
            [0.9, 0.2, 0.2, 0.8, 0.95],
            [0.99, 0.1, 0.1, 0.1, 0.9],
            [-1.0, -1.0, 1.0, 1.0, 1.0],
            [0.99, 0.98, 0.3, 0.9, 0.4],
        ]
    )
    assert knn_vote(labels, scores, n_classes=4, k=5).tolist() == [0, 1, 0, 0, 2]
    # k limits the vote to the first k results
    assert knn_vote(labels[[2]], scores[[2]], n_classes=4, k=1).tolist() == [2]


def test_per_class_means() -> None:
    values = {"p": np.array([1.0, 0.0, 1.0, 0.5]), "q": np.array([0.2, 0.4, 0.6, 0.8])}
    rows = per_class(values, np.array([0, 0, 1, 1]), ["a", "b", "c"])
    assert rows[:2] == [
        {"class": "a", "n_queries": 2, "p": 0.5, "q": 0.3},
        {"class": "b", "n_queries": 2, "p": 0.75, "q": 0.7},
    ]
    assert rows[2]["class"] == "c" and rows[2]["n_queries"] == 0 and np.isnan(rows[2]["p"])


def test_float16_hnsw_halves_the_vectors_and_keeps_recall() -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 512))
    vecs = l2_normalise(centres[rng.integers(0, 20, 2000)] + rng.normal(size=(2000, 512)))  # clustered, like classes
    ids = np.arange(2000, dtype=np.int64)
    queries = l2_normalise(centres[rng.integers(0, 20, 50)] + rng.normal(size=(50, 512)))
    exact = new_faiss_index(512, "flat", {}, vecs)
    exact.add_with_ids(vecs, ids)
    truth = exact.search(queries, 10)[1]
    size, recall = {}, {}
    for kind in ("hnsw", "hnsw-fp16"):
        index = new_faiss_index(512, kind, {"hnsw_m": 16}, vecs)
        index.add_with_ids(vecs, ids)
        size[kind] = len(faiss.serialize_index(index))
        found = index.search(queries, 10)[1]
        recall[kind] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=False)])
    assert size["hnsw-fp16"] < 0.6 * size["hnsw"]  # 2 instead of 4 bytes per dimension; the graph is the same
    assert recall["hnsw-fp16"] >= recall["hnsw"] - 0.02, recall


def test_exact_recall_counts_only_real_neighbours() -> None:
    rng = np.random.default_rng(2)
    vecs = l2_normalise(rng.normal(size=(3, 8)))
    index = new_faiss_index(8, "hnsw", {}, vecs)
    index.add_with_ids(vecs, np.array([7, 8, 9], dtype=np.int64))
    store = SimpleNamespace(index=index, live_vectors=lambda: all_vectors(index))
    queries = l2_normalise(rng.normal(size=(4, 8)))
    _, ids = index.search(queries, 3)  # an index of 3 items: every item is found
    assert exact_recall_at_k(store, queries, ids, k=5) == 1.0  # type: ignore[arg-type]


def test_evaluate_end_to_end(env: Env) -> None:
    result, raw = evaluate(env.model, env.flat, str(env.data), settings=env.settings, progress=False)
    for key in REQUIRED_METRICS:
        assert key in result, key
    assert result["n_queries"] == 12 == len(raw["keys"])  # 4 test images per class
    assert result["index_count"] == 30 and result["index_type"] == "flat"
    assert result["embedding_path"] == "cached-features"
    for key in REQUIRED_METRICS[1:-1]:
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    assert "recall_at_5_vs_exact" not in result  # flat search is exact
    assert [c["class"] for c in result["per_class"]] == ["blue", "green", "red"]
    assert [c["n_queries"] for c in result["per_class"]] == [4, 4, 4]
    for c in result["per_class"]:
        for key in REQUIRED_METRICS[1:-1]:
            assert 0.0 <= c[key] <= 1.0
    assert raw["ids"].shape == (12, 10) and raw["scores"].shape == (12, 10)
    json.dumps(result)  # JSON-ready


# -------------------------------------------------------------------------- 6. CLI
def test_cli_index_add_remove_evaluate(
    env: Env, cli_settings: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.cli import main

    out = tmp_path / "idx"
    base = ["index", "build", "--model", str(env.model), "--data", str(env.data), "--out", str(out), "-q"]
    assert main(base) == 0
    text = capsys.readouterr().out
    assert "indexed 30 images (flat)" in text and "reused the training feature cache" in text, text

    assert main([*base, "--no-cache"]) == 0
    text = capsys.readouterr().out
    assert "ran the full model" in text and "feature cache" not in text, text
    assert json.loads((out / "manifest.json").read_text())["embedding_path"] == "full-model"

    new = _png(tmp_path / "new" / "teal.png", (20, 180, 170), seed=4)
    assert main(["index", "add", "--index", str(out), str(new), "-q"]) == 0
    assert "added 1 images, skipped 0 duplicates" in capsys.readouterr().out
    assert main(["index", "add", "--index", str(out), str(new), "-q"]) == 0
    assert "added 0 images, skipped 1 duplicates" in capsys.readouterr().out

    assert main(["index", "remove", "--index", str(out), "0"]) == 0
    assert "removed 1 items; index now holds 30" in capsys.readouterr().out
    assert main(["index", "remove", "--index", str(out), "0", "12345"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "unknown ids: 0, 12345" in err, err
    assert _snapshot(out).manifest.count == 30

    report, plot = tmp_path / "reports" / "eval.json", tmp_path / "eval.png"
    code = main(["evaluate", "--model", str(env.model), "--index", str(out), "--data", str(env.data),
                 "--json", str(report), "--plot", str(plot), "--plot-queries", "2", "-q"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "precision@1" in text and "recall@5 vs exact" not in text
    metrics = json.loads(report.read_text())
    assert all(k in metrics for k in REQUIRED_METRICS) and metrics["n_queries"] == 12
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("index_type", ["hnsw", "hnsw-fp16"])
def test_cli_hnsw_evaluate_reports_recall(
    env: Env, cli_settings: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], index_type: str
) -> None:
    from app.cli import main

    out = tmp_path / "hnsw"
    code = main(["index", "build", "--model", str(env.model), "--data", str(env.data), "--out", str(out),
                 "--index-type", index_type, "--hnsw-m", "8", "-q"])  # fmt: skip
    assert code == 0 and f"({index_type})" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["index_type"] == index_type and manifest["index_params"]["hnsw_m"] == 8
    report = tmp_path / "eval.json"
    code = main(["evaluate", "--model", str(env.model), "--index", str(out), "--data", str(env.data),
                 "--json", str(report), "-q"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "recall@5 vs exact search" in text, text
    assert 0.0 <= json.loads(report.read_text())["recall_at_5_vs_exact"] <= 1.0


def test_cli_index_ivf(env: Env, cli_settings: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    out = tmp_path / "ivf"
    code = main(["index", "build", "--model", str(env.model), "--data", str(env.data), "--out", str(out),
                 "--index-type", "ivf", "--nlist", "4", "-q"])  # fmt: skip
    assert code == 0 and "indexed 30 images (ivf)" in capsys.readouterr().out
    assert _snapshot(out).manifest.faiss_index == "IndexIVFFlat"


# ----------------------------------------------------------- 7. serving item images
def test_item_image_bytes_never_reads_outside_the_dataset(env: Env, flat_copy: Path, tmp_path: Path) -> None:
    store = IndexStore.open(flat_copy)
    row, stored = store.image_bytes(0)
    assert stored is None and not Path(row.key).is_absolute()  # folder datasets serve files by relative key
    assert item_image_bytes(store, 0) == (env.data / row.key).read_bytes()
    assert load_item_image(store, 0).size == (16, 16)
    with pytest.raises(KeyError):
        store.image_bytes(999)
    store.close()

    for evil in ("../../../../../../../../etc/passwd", "/etc/passwd", "train/../../outside.png"):
        with sqlite3.connect(flat_copy / "items.sqlite") as db:
            db.execute("UPDATE items SET key = ? WHERE id = 0", (evil,))
        store = IndexStore.open(flat_copy)
        with pytest.raises(ImgsimError, match="item 0 points outside its dataset"):
            item_image_bytes(store, 0)
        store.close()

    # nor through a tampered source column: keys resolve under the manifest's dataset folder,
    # so this looks for DATA/etc/passwd (absent), never /etc/passwd
    with sqlite3.connect(flat_copy / "items.sqlite") as db:
        db.execute("UPDATE items SET key = 'etc/passwd', source = '/' WHERE id = 0")
    store = IndexStore.open(flat_copy)
    with pytest.raises(ImgsimError, match="image of item 0 is no longer readable"):
        item_image_bytes(store, 0)
    store.close()

    # a file that went away is a clear error too
    with sqlite3.connect(flat_copy / "items.sqlite") as db:
        db.execute("UPDATE items SET key = 'train/red/gone.png' WHERE id = 0")
    store = IndexStore.open(flat_copy)
    with pytest.raises(ImgsimError, match="no longer readable"):
        item_image_bytes(store, 0)
    store.close()
