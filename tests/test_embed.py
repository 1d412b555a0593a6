"""Embedding pipeline (models.embed, models.backbones.preprocess) and `imgsim embed`.

Everything runs on tiny datasets written to tmp_path with Pillow. A fake forward
function (per-image channel means) stands in for the network, except in the one
test marked slow, which runs the real cached ResNet50 at 32 px.
"""

from __future__ import annotations

import io
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.backbones import preprocess
from models.data import Dataset, SkipCounter, decode_image, open_dataset
from models.embed import Embeddings, embed_items, load_embeddings, prefetch, save_embeddings

CLASSES = ("cat", "dog")
PER_CLASS = 6
SIZE = 16  # decode size for the fake-forward tests

# Deliberately broken files: folder key -> SkipCounter reason.
BAD = {
    "cat/empty.jpg": "empty",
    "dog/truncated.jpg": "corrupt",
    "dog/notes.jpg": "not_an_image",
}


# ---------------------------------------------------------------- helpers


def _thread_names_alive(prefixes: tuple[str, ...], before: set[threading.Thread]) -> list[str]:
    return [t.name for t in threading.enumerate() if t not in before and t.name.startswith(prefixes)]


def _assert_threads_gone(before: set[threading.Thread], prefixes=("imgsim-prefetch",), timeout: float = 2.0) -> None:
    """Threads started since ``before`` with these name prefixes must end within ``timeout``."""
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t not in before and t.name.startswith(prefixes):
            t.join(max(0.0, deadline - time.monotonic()))
    alive = _thread_names_alive(prefixes, before)
    assert not alive, f"threads still running {timeout} s after the consumer stopped: {alive}"


def _image(i: int, c: int) -> np.ndarray:
    """A 20x24 RGB image with a per-image distinct mean colour (plus a little texture)."""
    arr = np.empty((20, 24, 3), np.uint8)
    arr[...] = (15 + 20 * i, 230 - 25 * i, 60 + 120 * c)
    arr[::4, ::4] = 255 - arr[::4, ::4]
    return arr


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_folder(root: Path) -> Path:
    """root/{cat,dog}/NN.{png,jpg} plus the BAD files (zero-byte, truncated JPEG, text)."""
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
            (root / name / f"{i:02d}.{ext}").write_bytes(_encode(_image(i, c), fmt))
    (root / "cat/empty.jpg").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    jpeg = _encode(noise, "JPEG")
    (root / "dog/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "dog/notes.jpg").write_bytes(b"this is not an image\n" * 4)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder"))


class ChannelMeans:
    """Deterministic stand-in for a network: per-image RGB means; records the batches it saw."""

    def __init__(self) -> None:
        self.batches: list[tuple[tuple[int, ...], np.dtype]] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append((batch.shape, batch.dtype))
        return batch.reshape(len(batch), -1, 3).astype(np.float64).mean(axis=1)


def _expected_vector(root: Path, key: str, size: int) -> np.ndarray:
    return decode_image((root / key).read_bytes(), size).reshape(-1, 3).astype(np.float64).mean(axis=0)


# ---------------------------------------------------------------- prefetch


def test_prefetch_keeps_order_and_finishes() -> None:
    before = set(threading.enumerate())
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))
    assert list(prefetch([], depth=1)) == []
    _assert_threads_gone(before)


def test_prefetch_reraises_producer_error_in_consumer() -> None:
    before = set(threading.enumerate())

    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("boom from the producer")

    gen = prefetch(source(), depth=1)
    assert [next(gen), next(gen)] == [1, 2]
    with pytest.raises(ValueError, match="boom from the producer"):
        next(gen)
    _assert_threads_gone(before)


def test_prefetch_stops_endless_producer_when_consumer_stops() -> None:
    before = set(threading.enumerate())
    produced = itertools.count()
    pulled: list[int] = []

    def endless() -> Iterator[int]:
        for n in produced:
            pulled.append(n)
            yield n

    gen = prefetch(endless(), depth=2)
    assert [next(gen) for _ in range(3)] == [0, 1, 2]
    gen.close()
    _assert_threads_gone(before)
    # Bounded read-ahead: consumed + queue depth + the one item in hand, and no more afterwards.
    n = len(pulled)
    assert n <= 3 + 2 + 1, pulled
    time.sleep(0.2)
    assert len(pulled) == n


def test_prefetch_stops_finished_producer_when_consumer_stops() -> None:
    """Source exhausted while the queue is full, then the consumer stops: no thread may be left."""
    before = set(threading.enumerate())
    exhausted = threading.Event()

    def two_items() -> Iterator[int]:
        yield 0
        yield 1
        exhausted.set()

    gen = prefetch(two_items(), depth=1)
    assert next(gen) == 0
    assert exhausted.wait(2.0)  # the producer has queued 1 and now wants to queue the end marker
    gen.close()
    _assert_threads_gone(before, timeout=1.0)


# ---------------------------------------------------------------- embed_items


def _train_val(root: Path) -> tuple[Dataset, list]:
    dataset = open_dataset(root, val_fraction=0.25, seed=3)
    return dataset, dataset.select(["train", "val"])


@pytest.mark.parametrize("batch_size", [1, 4, 5, 64])
def test_embed_items_aligns_outputs_and_skips_bad_files(folder: Path, batch_size: int) -> None:
    dataset, items = _train_val(folder)
    assert len(items) == len(CLASSES) * PER_CLASS + len(BAD)
    assert {i.split for i in items} == {"train", "val"}
    forward = ChannelMeans()
    before = set(threading.enumerate())

    emb = embed_items(forward, dataset, items, SIZE, batch_size, progress=False)

    good = [i for i in items if i.key not in BAD]
    assert emb.keys == [i.key for i in good]  # dataset order, bad files left out
    assert emb.splits == [i.split for i in good]
    assert emb.labels.dtype == np.int64
    np.testing.assert_array_equal(emb.labels, [i.label for i in good])
    assert [dataset.class_names[lbl] for lbl in emb.labels] == [k.split("/")[0] for k in emb.keys]
    assert emb.vectors.dtype == np.float32 and emb.vectors.shape == (len(good), 3)
    expected = np.stack([_expected_vector(folder, k, SIZE) for k in emb.keys])
    np.testing.assert_allclose(emb.vectors, expected, rtol=1e-5)
    # Row i belongs to key i: image colours differ, so any shuffle would show here.
    assert len({tuple(np.round(v)) for v in emb.vectors}) == len(good)

    assert emb.skipped.by_reason == {reason: 1 for reason in BAD.values()}
    assert {item.key: reason for item, reason in emb.skipped.skipped} == BAD
    assert emb.skipped.summary().startswith("skipped 3 unreadable images (")

    assert sum(shape[0] for shape, _ in forward.batches) == len(good)
    for shape, dtype in forward.batches:
        assert 1 <= shape[0] <= batch_size and shape[1:] == (SIZE, SIZE, 3) and dtype == np.uint8
    assert emb.seconds > 0 and emb.images_per_second == pytest.approx(len(good) / emb.seconds)
    _assert_threads_gone(before, prefixes=("imgsim-prefetch", "imgsim-decode"))


def test_embed_items_counts_files_deleted_after_listing(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    dataset, items = _train_val(root)
    (root / "cat/00.jpg").unlink()
    emb = embed_items(ChannelMeans(), dataset, items, SIZE, 4, progress=False)
    assert "cat/00.jpg" not in emb.keys
    assert emb.skipped.by_reason["missing"] == 1
    assert len(emb.keys) == len(items) - len(BAD) - 1 == len(emb.vectors)


def test_embed_items_forward_error_propagates_and_stops_pipeline(folder: Path) -> None:
    dataset, items = _train_val(folder)
    before = set(threading.enumerate())

    def failing(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("model exploded")

    # batch_size 1 -> more batches than the read-ahead can hold, so the producer is mid-way.
    with pytest.raises(RuntimeError, match="model exploded"):
        embed_items(failing, dataset, items, SIZE, 1, progress=False)
    _assert_threads_gone(before, prefixes=("imgsim-prefetch", "imgsim-decode"))


# ---------------------------------------------------------------- save / load


def _embeddings(n: int = 5, dim: int = 7) -> Embeddings:
    rng = np.random.default_rng(1)
    return Embeddings(
        vectors=rng.normal(size=(n, dim)).astype(np.float32),
        keys=[f"train/caf\u00e9/{i:02d}.jpg" for i in range(n)],
        labels=np.arange(n, dtype=np.int64) % 2,
        splits=["train"] * (n - 1) + ["val"],
        skipped=SkipCounter(),
        seconds=1.5,
        meta={"backbone": "resnet50", "input_size": 32, "weights_sha256": None, "nested": {"a": [1, 2.5]}},
    )


def test_save_load_round_trip(tmp_path: Path) -> None:
    emb = _embeddings()
    path = tmp_path / "sub" / "dir" / "e.npz"  # parent folders are created
    save_embeddings(path, emb, ["cat", "dog"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["e.npz"]  # no temporary left behind

    got = load_embeddings(path)
    assert got["vectors"].dtype == np.float32
    np.testing.assert_array_equal(got["vectors"], emb.vectors)
    assert got["keys"].tolist() == emb.keys
    assert got["splits"].tolist() == emb.splits
    assert got["labels"].dtype == np.int64
    np.testing.assert_array_equal(got["labels"], emb.labels)
    assert got["class_names"].tolist() == ["cat", "dog"]
    assert got["meta"] == emb.meta


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _embeddings(n=3)
    kept = tmp_path / "kept.npz"
    save_embeddings(kept, old, ["cat", "dog"])

    def broken_savez(file: object, **arrays: object) -> None:
        Path(str(file)).write_bytes(b"PK\x03\x04 half an archive")  # partial write, then failure
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", broken_savez)
    fresh = tmp_path / "fresh.npz"
    with pytest.raises(OSError, match="No space left"):
        save_embeddings(fresh, _embeddings(), ["cat", "dog"])
    assert not fresh.exists()
    with pytest.raises(OSError, match="No space left"):
        save_embeddings(kept, _embeddings(), ["cat", "dog"])
    monkeypatch.undo()
    # The previous file under the final name is untouched and still loads.
    np.testing.assert_array_equal(load_embeddings(kept)["vectors"], old.vectors)


# ---------------------------------------------------------------- preprocessing


def test_caffe_preprocess_matches_keras() -> None:
    import keras

    batch = np.random.default_rng(2).integers(0, 256, (3, 9, 7, 3), dtype=np.uint8)
    original = batch.copy()
    got = preprocess(batch, "caffe")
    assert got.dtype == np.float32 and got.shape == batch.shape
    np.testing.assert_array_equal(batch, original)  # input not modified
    for module in (keras.applications.resnet50, keras.applications.vgg16):
        expected = np.asarray(module.preprocess_input(batch.astype(np.float32)))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(preprocess(batch, "unit"), batch / 255.0, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown preprocessing"):
        preprocess(batch, "torch")  # type: ignore[arg-type]


# ---------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    from app.cli import main

    return main(argv)


@pytest.mark.slow
def test_cli_embed_end_to_end(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from models.weights import cached_weights

    out = tmp_path / "e.npz"
    code = _cli(
        [
            "embed",
            "--backbone",
            "resnet50",
            "--data",
            str(folder),
            "--split",
            "train",
            "--input-size",
            "32",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [line for line in captured.out.splitlines() if "img/s" in line]
    assert len(lines) == 1 and "resnet50 at 32 px" in lines[0] and str(out) in lines[0], captured.out
    assert "Traceback" not in captured.err
    assert "skipped" in captured.err  # the bad files are summarised on one line

    expected = [i.key for i in open_dataset(folder).select("train") if i.key not in BAD]
    got = load_embeddings(out)
    assert got["vectors"].dtype == np.float32 and got["vectors"].shape == (len(expected), 2048)
    assert np.isfinite(got["vectors"]).all() and got["vectors"].std() > 0
    assert got["keys"].tolist() == expected
    assert got["class_names"].tolist() == list(CLASSES)
    meta = got["meta"]
    assert meta["backbone"] == "resnet50" and meta["input_size"] == 32 and meta["split"] == "train"
    assert meta["weights_sha256"] == cached_weights("resnet50").sha256  # type: ignore[union-attr]


def _assert_one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("imgsim embed: error: "), err
    for needle in needles:
        assert needle in lines[0], err
    assert "Traceback" not in err


def test_cli_missing_data_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-folder"
    out = tmp_path / "e.npz"
    code = _cli(["embed", "--backbone", "resnet50", "--data", str(missing), "--out", str(out), "--quiet"])
    assert code == 2
    _assert_one_line_error(capsys.readouterr().err, "not found", str(missing))
    assert not out.exists()


def test_cli_unknown_split_is_one_line(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "e.npz"
    code = _cli(["embed", "--backbone", "vgg16", "--data", str(folder), "--split", "tset", "--out", str(out)])
    assert code == 2
    _assert_one_line_error(capsys.readouterr().err, "unknown split 'tset'", "train")
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--input-size", "0"], "--input-size: must be >= 1, got 0"),
        (["--batch-size", "-3"], "--batch-size: must be >= 1, got -3"),
        (["--input-size", "big"], "--input-size: invalid"),
        (["--backbone", "alexnet"], "--backbone: invalid choice: 'alexnet'"),
    ],
)
def test_cli_bad_arguments_exit_2(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    argv = ["embed", "--backbone", "resnet50", "--data", str(folder), "--out", str(tmp_path / "e.npz"), *args]
    with pytest.raises(SystemExit) as exc:
        _cli(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("imgsim embed: error: ") and needle in err, err


def test_cli_input_size_below_backbone_minimum(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _cli(
        [
            "embed",
            "--backbone",
            "resnet50",
            "--data",
            str(folder),
            "--split",
            "train",
            "--input-size",
            "16",
            "--out",
            str(tmp_path / "e.npz"),
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    # The dataset summary line comes first; the error is the last line.
    assert err.strip().splitlines()[-1].startswith("imgsim embed: error: input size 16 out of range"), err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["--help"], ["weights", "--help"], ["embed", "--help"]])
def test_cli_help_exits_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _cli(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: imgsim")
    if argv[0] == "embed":
        assert "--input-size" in out and "--batch-size" in out
    if argv[0] == "weights":
        assert "--source" in out


def test_cli_invalid_setting_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from models.settings import get_settings

    monkeypatch.setenv("IMGSIM_INPUT_SIZE", "10")
    get_settings.cache_clear()
    try:
        code = _cli(["weights", "--quiet"])
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "IMGSIM_INPUT_SIZE" in err and "Traceback" not in err, err
