"""Tests for models.data: tiny synthetic datasets built in tmp_path, no network."""

from __future__ import annotations

import gzip
import io
import shutil
import struct
import sys
import tarfile
import types
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from models.data import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    SPLITS,
    Dataset,
    Item,
    SkipCounter,
    UnreadableImage,
    decode_image,
    open_dataset,
)
from models.errors import ImgsimError
from models.settings import get_settings

CLASSES = ("bird", "cat", "dog")


# ---------------------------------------------------------------- helpers


def _noise(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    return _encode(Image.fromarray(arr), "PNG")


def _jpeg(arr: np.ndarray, **kwargs: object) -> bytes:
    return _encode(Image.fromarray(arr), "JPEG", quality=95, **kwargs)


def _make_flat(root: Path, per_class: int = 10, classes: tuple[str, ...] = CLASSES) -> Path:
    """root/<class>/NN.{png,jpg}: alternating formats, sizes 8..16 px."""
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            side = 8 + (i % 9)
            arr = _noise(side, side, seed=100 * c + i)
            if i % 2:
                (folder / f"{i:02d}.jpg").write_bytes(_jpeg(arr))
            else:
                (folder / f"{i:02d}.png").write_bytes(_png(arr))
    return root


def _make_split(root: Path, train: int = 10, test: int = 4, val: int = 0) -> Path:
    _make_flat(root / "train", per_class=train)
    _make_flat(root / "test", per_class=test)
    if val:
        _make_flat(root / "val", per_class=val)
    return root


def _tar(src: Path, dest: Path, arc_prefix: str) -> Path:
    """Archive src's tree with names like f'{arc_prefix}cat/00.png'."""
    with tarfile.open(dest, "w:gz") as tar:
        for path in sorted(src.rglob("*")):
            tar.add(path, arcname=arc_prefix + path.relative_to(src).as_posix(), recursive=False)
    return dest


def _open(spec: str | Path, **kwargs: object) -> Dataset:
    kwargs.setdefault("val_fraction", 0.2)
    kwargs.setdefault("seed", 0)
    return open_dataset(spec, **kwargs)  # type: ignore[arg-type]


def _decode_all(ds: Dataset, items: list[Item], size: int | None = None) -> dict[str, np.ndarray]:
    return {item.key: decode_image(raw, size) for item, raw in ds.iter_raw(items) if raw is not None}


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_idx(directory: Path, n_train: int = 20, n_test: int = 10) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    directory.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, split, n in (("train", "train", n_train), ("t10k", "test", n_test)):
        images = _noise(n, 28, channels=28, seed=n)[:, :4, :5]  # n x 4 x 5
        labels = np.arange(n, dtype=np.uint8) % 10
        (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
        (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
        data[split] = (images, labels)
    return data


# ---------------------------------------------------------------- folders


def test_flat_layout_carves_stratified_val(tmp_path: Path) -> None:
    root = _make_flat(tmp_path / "ds")
    ds = _open(root)

    assert ds.kind == "folder"
    assert ds.class_names == list(CLASSES)
    assert ds.splits() == {"train": 24, "val": 6}
    per_class = Counter((it.split, ds.class_names[it.label]) for it in ds.items)
    assert all(per_class[("val", c)] == 2 and per_class[("train", c)] == 8 for c in CLASSES)
    assert all(it.key.split("/")[0] == ds.class_names[it.label] for it in ds.items)
    # Order: split, label, key.
    rank = {s: i for i, s in enumerate(SPLITS)}
    assert ds.items == sorted(ds.items, key=lambda it: (rank[it.split], it.label, it.key))
    assert len({it.key for it in ds.items}) == 30

    again = _open(root)
    assert again.items == ds.items and again.fingerprint == ds.fingerprint
    other_seed = _open(root, seed=1)
    assert {it.key for it in other_seed.select("val")} != {it.key for it in ds.select("val")}
    assert other_seed.splits() == ds.splits()

    no_val = _open(root, val_fraction=0.0)
    assert no_val.splits() == {"train": 30}


def test_val_carving_rounds_and_keeps_one_train(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _make_flat(root, per_class=2, classes=("a",))
    _make_flat(root, per_class=1, classes=("b",))
    ds = _open(root, val_fraction=0.1)
    counts = Counter((it.split, it.label) for it in ds.items)
    assert counts == {("train", 0): 1, ("val", 0): 1, ("train", 1): 1}


def test_split_layout_keeps_test_and_val(tmp_path: Path) -> None:
    root = _make_split(tmp_path / "ds", train=10, test=4)
    ds = _open(root)
    assert ds.splits() == {"train": 24, "val": 6, "test": 12}
    assert all(it.key.startswith(f"{'train' if it.split == 'val' else it.split}/") for it in ds.items)
    assert [it.split for it in ds.select(["test", "train"])][:1] == ["train"]
    assert len(ds.select(None)) == 42

    with_val = _open(_make_split(tmp_path / "ds2", train=5, test=2, val=3))
    assert with_val.splits() == {"train": 15, "val": 9, "test": 6}


def test_hidden_nested_and_loose_files(tmp_path: Path) -> None:
    root = _make_flat(tmp_path / "ds", per_class=2)
    (root / ".DS_Store").write_bytes(b"x")
    (root / "README.md").write_text("loose file, not in a class folder")
    (root / "cat" / ".hidden.png").write_bytes(_png(_noise(8, 8)))
    (root / ".git" / "x").mkdir(parents=True)
    (root / ".git" / "x" / "y.png").write_bytes(_png(_noise(8, 8)))
    (root / "cat" / "nested").mkdir()
    (root / "cat" / "nested" / "deep.png").write_bytes(_png(_noise(8, 8)))
    (root / "empty_class").mkdir()
    ds = _open(root, val_fraction=0.0)
    keys = {it.key for it in ds.items}
    assert "cat/nested/deep.png" in keys
    assert not any("/." in f"/{k}" for k in keys)
    assert ds.class_names == list(CLASSES)  # empty folder is not a class
    assert len(keys) == 7


def test_max_per_class_caps_before_carving(tmp_path: Path) -> None:
    root = _make_split(tmp_path / "ds", train=10, test=8)
    ds = _open(root, max_per_class=5, val_fraction=0.2)
    counts = Counter((it.split, it.label) for it in ds.items)
    for label in range(3):
        assert counts[("train", label)] == 4
        assert counts[("val", label)] == 1
        assert counts[("test", label)] == 5
    assert ds.items == _open(root, max_per_class=5, val_fraction=0.2).items


def test_select_errors_and_splits(tmp_path: Path) -> None:
    ds = _open(_make_flat(tmp_path / "ds", per_class=3))
    with pytest.raises(ImgsimError, match="available splits are train, val"):
        ds.select("validation")
    with pytest.raises(ImgsimError, match="no test items"):
        ds.select("test")
    assert len(ds.select(["train", "test"])) == ds.splits()["train"]


# ---------------------------------------------------------------- archives


@pytest.mark.parametrize("prefix", ["", "./", "mydata/"])
def test_archive_matches_folder(tmp_path: Path, prefix: str) -> None:
    root = _make_split(tmp_path / "ds", train=4, test=2)
    folder = _open(root)
    archive = _open(_tar(root, tmp_path / "ds.tar.gz", prefix))

    assert archive.kind == "archive"
    assert archive.class_names == folder.class_names
    assert archive.items == folder.items
    assert archive.fingerprint != folder.fingerprint

    a = _decode_all(archive, archive.items)
    f = _decode_all(folder, folder.items)
    assert a.keys() == f.keys() and len(a) == len(folder.items)
    assert all(np.array_equal(a[k], f[k]) for k in f)


def test_archive_iter_raw_order_duplicates_and_unknown(tmp_path: Path) -> None:
    root = _make_flat(tmp_path / "ds", per_class=3)
    ds = _open(_tar(root, tmp_path / "ds.tar", ""))
    folder = _open(root)
    wanted = list(reversed(ds.items)) + [ds.items[0], Item("cat/nope.png", 1, "train")]
    got = list(ds.iter_raw(wanted))
    assert [item for item, _ in got] == wanted
    assert got[-1][1] is None
    raw_by_key = {item.key: raw for item, raw in folder.iter_raw(folder.items)}
    assert all(raw == raw_by_key[item.key] for item, raw in got[:-1])
    assert list(ds.iter_raw([])) == []


def test_archive_with_bad_members_lists_and_skips(tmp_path: Path) -> None:
    root = _make_flat(tmp_path / "ds", per_class=2)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "zero.jpg").write_bytes(b"")
    ds = _open(_tar(root, tmp_path / "ds.tgz", ""), val_fraction=0.0)
    skips = SkipCounter()
    ok = 0
    for item, raw in ds.iter_raw(ds.items):
        try:
            decode_image(raw, 8)  # type: ignore[arg-type]
            ok += 1
        except UnreadableImage as exc:
            skips.add(item, exc.reason)
    assert ok == 6
    assert skips.by_reason == {"not_an_image": 1, "empty": 1}


# ---------------------------------------------------------------- decoding


@pytest.fixture()
def bad_files(tmp_path: Path) -> dict[str, bytes]:
    big_jpeg = _jpeg(_noise(48, 48))
    return {
        "empty": b"",
        "not_an_image": b"just some notes\n",
        "corrupt": big_jpeg[: len(big_jpeg) // 2],
        "corrupt_header": big_jpeg[:40],
        "corrupt_png": _png(_noise(32, 32))[:200],
    }


@pytest.mark.parametrize("name", ["empty", "not_an_image", "corrupt", "corrupt_header", "corrupt_png"])
@pytest.mark.parametrize("size", [None, 8])
def test_decode_bad_files_raise_with_reason(bad_files: dict[str, bytes], name: str, size: int | None) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(UnreadableImage) as info:
        decode_image(bad_files[name], size)
    expected = "corrupt" if name.startswith("corrupt") else name
    assert info.value.reason == expected
    assert isinstance(info.value, ImgsimError)
    assert "\n" not in str(info.value)


def test_decode_modes_to_rgb() -> None:
    gray = _noise(10, 12, channels=1)
    out = decode_image(_png(gray), None)
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], gray) and np.array_equal(out[..., 2], gray)

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    out = decode_image(_png(rgba), None)
    assert out.shape == (8, 8, 3)
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[7, 7]) == (255, 255, 255)

    la = Image.fromarray(np.stack([gray[:8, :8], np.zeros((8, 8), np.uint8)], axis=-1), "LA")
    assert (decode_image(_encode(la, "PNG"), None) == 255).all()

    palette = Image.fromarray(_noise(8, 8)).convert("P")
    assert decode_image(_encode(palette, "PNG"), 16).shape == (16, 16, 3)

    cmyk = Image.fromarray(_noise(8, 8, channels=4), "CMYK")
    assert decode_image(_encode(cmyk, "JPEG"), None).shape == (8, 8, 3)

    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert (decode_image(_encode(sixteen, "PNG"), None) == 255).all()

    frames = [Image.new("RGB", (6, 6), (255, 0, 0)), Image.new("RGB", (6, 6), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    first = decode_image(gif.getvalue(), None)
    assert first.shape == (6, 6, 3) and first[0, 0, 0] > 200 and first[0, 0, 2] < 50

    assert decode_image(_noise(5, 7, channels=1), None).shape == (5, 7, 3)
    assert decode_image(_noise(5, 7)[..., :1], 4).shape == (4, 4, 3)
    assert decode_image(_noise(5, 7, channels=4), 9).shape == (9, 9, 3)


def test_decode_resizes_and_applies_exif_orientation() -> None:
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    data = _jpeg(wide, exif=exif.tobytes())
    upright = decode_image(data, None)
    assert upright.shape == (40, 20, 3)
    assert upright[2, 10].mean() > 200 and upright[-3, 10].mean() < 50  # white ends up on top

    big = _jpeg(_noise(400, 300))
    assert decode_image(big, 32).shape == (32, 32, 3)  # JPEG draft path
    assert decode_image(_png(_noise(50, 30)), 64).shape == (64, 64, 3)


def test_too_large_is_detected_from_header_only() -> None:
    png = _png(_noise(300, 400))
    head = png[:120]  # IHDR plus a sliver of IDAT: pixels cannot be decoded
    with pytest.raises(UnreadableImage) as info:
        decode_image(head, None, max_pixels=100_000)
    assert info.value.reason == "too_large"
    with pytest.raises(UnreadableImage) as info:  # same bytes under the limit -> decoding fails
        decode_image(head, None, max_pixels=200_000)
    assert info.value.reason == "corrupt"

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    bomb += chunk(b"IDAT", b"\x78\x9c" + b"\x00" * 8)
    with pytest.raises(UnreadableImage) as info:
        decode_image(bomb, 32, max_pixels=10**12)  # Pillow's own bomb guard
    assert info.value.reason == "too_large"
    with pytest.raises(UnreadableImage) as info:
        decode_image(np.zeros((100, 100), np.uint8), None, max_pixels=9_999)
    assert info.value.reason == "too_large"


def test_skip_counter_summary() -> None:
    skips = SkipCounter()
    assert skips.summary() == "" and skips.total == 0
    skips.add(Item("a/1.jpg", 0, "train"), "empty")
    assert skips.summary() == "skipped 1 unreadable image (1 empty)"
    skips.add(Item("a/2.jpg", 0, "train"), "corrupt")
    skips.add(Item("a/3.txt", 0, "train"), "not_an_image")
    skips.add(Item("a/4.jpg", 0, "train"), "corrupt")
    assert skips.total == 4
    assert skips.by_reason == {"empty": 1, "corrupt": 2, "not_an_image": 1}
    assert skips.summary() == "skipped 4 unreadable images (1 empty, 2 corrupt, 1 not_an_image)"


def test_folder_with_bad_files_decodes_the_rest(tmp_path: Path) -> None:
    root = _make_flat(tmp_path / "ds", per_class=4)
    big = _jpeg(_noise(48, 48))
    (root / "dog" / "truncated.jpg").write_bytes(big[: len(big) // 2])
    (root / "dog" / "zero.jpg").write_bytes(b"")
    (root / "bird" / "notes.txt").write_text("hello")
    (root / "bird" / "gray.png").write_bytes(_png(_noise(9, 9, channels=1)))
    ds = _open(root, val_fraction=0.0)
    assert len(ds.items) == 16

    missing = ds.items[0]
    (root / missing.key).unlink()
    skips = SkipCounter()
    shapes = set()
    for item, raw in ds.iter_raw(ds.items):
        if raw is None:
            skips.add(item, "missing")
            continue
        try:
            shapes.add(decode_image(raw, 12).shape)
        except UnreadableImage as exc:
            skips.add(item, exc.reason)
    assert shapes == {(12, 12, 3)}
    assert skips.total == 4
    assert sorted(skips.by_reason) == ["corrupt", "empty", "missing", "not_an_image"]


# ---------------------------------------------------------------- IDX / keras


def test_fashion_mnist_idx(tmp_path: Path) -> None:
    data = _write_idx(tmp_path / "fm")
    ds = _open(f"fashion-mnist:{tmp_path / 'fm'}", val_fraction=0.1)
    assert ds.kind == "idx"
    assert ds.class_names == list(FASHION_MNIST_CLASSES)
    assert ds.class_names[0] == "tshirt_top" and ds.class_names[9] == "ankle_boot"
    assert ds.splits() == {"train": 10, "val": 10, "test": 10}  # 2 per class -> 1 val each
    for item, raw in ds.iter_raw(ds.items):
        split, index = item.key.split("/")
        images, labels = data[split]
        assert isinstance(raw, np.ndarray) and np.array_equal(raw, images[int(index)])
        assert item.label == labels[int(index)]
    assert decode_image(next(ds.iter_raw(ds.items[:1]))[1], 8).shape == (8, 8, 3)  # type: ignore[arg-type]

    auto = _open(tmp_path / "fm", val_fraction=0.1)  # auto-detected folder
    assert auto.kind == "idx" and auto.items == ds.items and auto.fingerprint == ds.fingerprint


def test_fashion_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(ImgsimError, match="apt-get install dataset-fashion-mnist"):
        _open(f"fashion-mnist:{tmp_path / 'absent'}")
    settings = get_settings().model_copy(update={"fashion_mnist_dir": tmp_path / "absent"})
    with pytest.raises(ImgsimError, match="IMGSIM_FASHION_MNIST_DIR"):
        open_dataset("fashion-mnist", settings=settings)

    _write_idx(tmp_path / "bad")
    labels = tmp_path / "bad" / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(_idx_bytes(np.arange(20, dtype=np.uint8) % 10)[:-3]))
    with pytest.raises(ImgsimError, match="truncated"):
        _open(tmp_path / "bad")
    labels.write_bytes(gzip.compress(b"\x12\x34\x56\x78junk"))
    with pytest.raises(ImgsimError, match="not an IDX file"):
        _open(tmp_path / "bad")


def test_keras_download_failure_is_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_data() -> None:
        raise OSError("network is unreachable")

    fake = types.ModuleType("keras")
    fake.datasets = types.SimpleNamespace(cifar10=types.SimpleNamespace(load_data=load_data))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "keras", fake)
    with pytest.raises(ImgsimError, match="could not download keras dataset cifar10: network is unreachable"):
        _open("keras:cifar10")
    with pytest.raises(ImgsimError, match="unknown keras dataset"):
        _open("keras:imagenet")


def test_keras_arrays_with_fake_module(monkeypatch: pytest.MonkeyPatch) -> None:
    x_train, y_train = _noise(20, 4, channels=4)[..., :3].reshape(20, 4, 1, 3), np.arange(20).reshape(-1, 1) % 10
    x_test, y_test = _noise(10, 4, channels=4)[..., :3].reshape(10, 4, 1, 3), np.arange(10).reshape(-1, 1)
    fake = types.ModuleType("keras")
    loader = types.SimpleNamespace(load_data=lambda: ((x_train, y_train), (x_test, y_test)))
    fake.datasets = types.SimpleNamespace(cifar10=loader)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "keras", fake)
    ds = _open("keras:cifar10", val_fraction=0.0)
    assert ds.kind == "keras" and ds.class_names == list(CIFAR10_CLASSES)
    assert ds.splits() == {"train": 20, "test": 10}
    _, raw = next(ds.iter_raw([Item("train/00003", 3, "train")]))
    assert np.array_equal(raw, x_train[3])  # type: ignore[arg-type]


# ---------------------------------------------------------------- errors


def test_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(ImgsimError, match="dataset not found"):
        _open(tmp_path / "nope")
    (tmp_path / "data.zip").write_bytes(b"PK")
    with pytest.raises(ImgsimError, match=r"unsupported dataset file .*class sub-folders"):
        _open(tmp_path / "data.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImgsimError, match="no images found"):
        _open(tmp_path / "empty")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "a.png").write_bytes(_png(_noise(8, 8)))
    (tmp_path / "loose" / "emptyclass").mkdir()
    with pytest.raises(ImgsimError, match="no images found"):
        open_dataset(tmp_path / "loose", labels="folders")
    assert [i.key for i in open_dataset(tmp_path / "loose").items] == ["a.png"]  # a flat folder: unlabelled

    only_test = _make_flat(tmp_path / "only_test" / "test", per_class=1).parent
    with pytest.raises(ImgsimError, match="no train/"):
        _open(only_test)
    mixed = _make_flat(tmp_path / "mixed" / "train", per_class=1).parent
    _make_flat(mixed, per_class=1, classes=("extra",))
    with pytest.raises(ImgsimError, match="mixes split folders"):
        _open(mixed)

    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 20)
    with pytest.raises(ImgsimError, match="cannot read archive"):
        _open(tmp_path / "broken.tar.gz")
    with pytest.raises(ImgsimError, match="val_fraction"):
        _open(_make_flat(tmp_path / "ok", per_class=1), val_fraction=1.0)
    with pytest.raises(ImgsimError, match="max_per_class"):
        _open(tmp_path / "ok", max_per_class=0)


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_sensitive(tmp_path: Path) -> None:
    root = _make_split(tmp_path / "ds", train=4, test=2)
    base = _open(root).fingerprint
    assert len(base) == 64 and int(base, 16) >= 0
    assert _open(root).fingerprint == base
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "copy")  # new path and mtimes
    assert _open(moved).fingerprint == base

    assert _open(root, seed=1).fingerprint != base
    assert _open(root, val_fraction=0.5).fingerprint != base
    assert _open(root, max_per_class=3).fingerprint != base
    target = root / "train" / "cat" / "00.png"
    target.write_bytes(target.read_bytes() + b"\0")
    assert _open(root).fingerprint != base
    (moved / "test" / "dog" / "extra.png").write_bytes(_png(_noise(8, 8)))
    assert _open(moved).fingerprint != base

    archive = _tar(tmp_path / "elsewhere" / "copy", tmp_path / "a.tar.gz", "")
    fp = _open(archive).fingerprint
    copied = tmp_path / "other"
    copied.mkdir()
    assert _open(shutil.copy(archive, copied / "a.tar.gz")).fingerprint == fp


# ---------------------------------------------------------------- real data


def test_real_cifar10_archive() -> None:
    archive = get_settings().cifar10_archive
    if not archive.is_file():
        pytest.skip(f"CIFAR-10 archive not found at {archive} (set IMGSIM_DATA_DIR)")
    ds = open_dataset(archive, max_per_class=20, val_fraction=0.1, seed=0)
    assert ds.kind == "archive"
    assert ds.class_names == list(CIFAR10_CLASSES)
    assert ds.splits() == {"train": 180, "val": 20, "test": 200}
    test_items = ds.select("test")
    decoded = [(item, decode_image(raw, None)) for item, raw in ds.iter_raw(test_items) if raw is not None]
    assert [item for item, _ in decoded] == test_items
    assert all(arr.shape == (32, 32, 3) and arr.dtype == np.uint8 for _, arr in decoded)
    assert Counter(item.label for item in test_items) == {label: 20 for label in range(10)}


def _large(mode: str) -> tuple[bytes, tuple[int, int, int]]:
    """A 1500x1200 image in ``mode`` and the RGB colour it must decode to."""
    size = (1500, 1200)
    if mode == "P+transparency":
        img = Image.new("P", size, 1)
        img.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
        img.info["transparency"] = 0  # colour 0 transparent, the image is all colour 1
        return _png_of(img, transparency=0), (200, 30, 40)
    if mode == "RGBA half transparent":
        return _png_of(Image.new("RGBA", size, (0, 0, 255, 128))), (127, 127, 255)
    if mode == "I;16":
        return _png_of(Image.fromarray(np.full(size[::-1], 0x8000, np.uint16))), (128, 128, 128)
    if mode == "1":
        return _png_of(Image.new("1", size, 1)), (255, 255, 255)
    return _png_of(Image.new(mode, size, (10, 200, 30))), (10, 200, 30)


def _png_of(img: Image.Image, **kw: object) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG", **kw)
    return out.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "P+transparency", "RGBA half transparent", "I;16", "1"])
def test_large_images_shrink_before_conversion_without_changing_colours(mode: str) -> None:
    """Large images are box-reduced before palette expansion or alpha compositing (to bound
    memory); the colours must come out as the full-size conversion gives them."""
    data, colour = _large(mode)
    out = decode_image(data, 32)
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - colour).max() <= 2, (mode, out[16, 16])
