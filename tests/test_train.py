"""`imgsim train` / evaluate-ensemble on a tiny synthetic dataset (seconds, real Keras)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import ImgsimError
from models.settings import Settings, get_settings
from models.train import TrainOptions, train

COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}
OUTPUT_FILES = ("model.keras", "manifest.json", "history.json", "curves.png", "confusion.png", "report.txt")


def make_colour_dataset(root: Path, per_class: int = 10, test_per_class: int = 4, size: int = 16) -> Path:
    """train/ and test/ trees of noisy single-colour images: learnable in a couple of epochs."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("colours"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Real ImageNet weights from the shared cache, feature caches in a per-test folder."""
    base = get_settings()
    weights = tmp_path / "cache" / "weights"
    weights.parent.mkdir()
    weights.symlink_to(base.weights_dir.resolve(), target_is_directory=True)
    base.weights_dir.mkdir(parents=True, exist_ok=True)
    return base.model_copy(update={"cache_dir": tmp_path / "cache"})


def _opts(data: Path, out: Path, **kw: object) -> TrainOptions:
    defaults = dict(input_size=32, epochs=2, batch_size=8, val_fraction=0.2, patience=5)
    return TrainOptions(data=str(data), out=out, **{**defaults, **kw})  # type: ignore[arg-type]


@pytest.mark.slow
def test_frozen_resnet_writes_every_output_and_reuses_cache(
    colour_data: Path, tmp_path: Path, settings: Settings
) -> None:
    first = train(_opts(colour_data, tmp_path / "m", backbone="resnet50"), settings, progress=False)
    for name in OUTPUT_FILES:
        assert (tmp_path / "m" / name).is_file(), name
    assert not (tmp_path / "m" / ".state").exists()
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert m["class_names"] == ["blue", "green", "red"]
    assert m["embedding_layer"] == "embedding" and m["embedding_dim"] == 1024
    assert m["backbone"] == "resnet50" and m["weights"]["sha256"] and m["input_size"] == 32
    assert m["dataset"]["fingerprint"] and m["metrics"]["test_count"] == 12
    assert 0.0 <= m["metrics"]["test_accuracy"] <= 1.0
    assert first.cache_hit is False

    second = train(_opts(colour_data, tmp_path / "m", backbone="resnet50", force=True), settings, progress=False)
    assert second.cache_hit is True
    assert second.manifest.feature_cache == first.manifest.feature_cache

    with pytest.raises(ImgsimError, match="already holds a trained model"):
        train(_opts(colour_data, tmp_path / "m", backbone="resnet50"), settings, progress=False)


def test_shift_batch_translates_each_map_within_its_cells() -> None:
    from models.fitting import shift_batch

    x = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 1)
    shifted = shift_batch(x, 1, np.random.default_rng(0))
    assert shifted.shape == x.shape
    for original, moved in zip(x[..., 0], shifted[..., 0], strict=False):
        # The centre 2x2 of the original survives somewhere within one cell of its place.
        centre = original[1:3, 1:3]
        assert any(np.array_equal(moved[i : i + 2, j : j + 2], centre) for i in range(3) for j in range(3))
    assert shift_batch(x, 0, np.random.default_rng(0)) is x
    pooled = np.ones((3, 1024), np.float32)
    assert shift_batch(pooled, 1, np.random.default_rng(0)) is pooled  # no spatial axes: unchanged


@pytest.mark.slow
def test_last_block_flip_shift_bf16_reuses_plain_cache(colour_data: Path, tmp_path: Path, settings: Settings) -> None:
    import keras

    from models.inference import load_trained

    plain = train(
        _opts(colour_data, tmp_path / "plain", backbone="vgg16", trainable="last-block"), settings, progress=False
    )
    assert plain.cache_hit is False
    aug = train(
        _opts(
            colour_data,
            tmp_path / "aug",
            backbone="vgg16",
            trainable="last-block",
            flip=True,
            shift=1,
            mixed_precision=True,
            lr_schedule="cosine",
            label_smoothing=0.1,
        ),
        settings,
        progress=False,
    )
    assert aug.manifest.feature_cache == plain.manifest.feature_cache  # plain features reused
    assert aug.messages[0] == f"feature cache hit: {plain.manifest.feature_cache}", aug.messages
    assert any(m.startswith("mirrored feature cache built") for m in aug.messages), aug.messages
    training = aug.manifest.training
    assert training.flip and training.shift == 1 and training.mixed_precision
    assert (
        training.label_smoothing == 0.1
        and len(json.loads((tmp_path / "aug" / "history.json").read_text())["loss"]) == 2
    )
    # bfloat16 was only for fitting: the saved model computes in float32 like every other.
    model = load_trained(tmp_path / "aug").model
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert keras.config.dtype_policy().name == "float32"


class _Interrupt:
    """A Keras callback that simulates Ctrl-C after a given epoch."""

    def __new__(cls, after_epoch: int):
        import keras

        class Stop(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                if epoch == after_epoch:
                    raise KeyboardInterrupt

        return Stop()


def test_interrupted_run_resumes(colour_data: Path, tmp_path: Path, settings: Settings) -> None:
    out = tmp_path / "cnn"
    opts = _opts(colour_data, out, backbone="simple-cnn", epochs=3)
    with pytest.raises(KeyboardInterrupt):
        train(opts, settings, progress=False, callbacks=[_Interrupt(0)])
    assert not (out / "manifest.json").exists() and (out / ".state" / "history.json").is_file()

    with pytest.raises(ImgsimError, match="different options"):
        train(_opts(colour_data, out, backbone="simple-cnn", epochs=3, learning_rate=0.5), settings, progress=False)

    # State from an older version lacks options added since: at their defaults it still resumes.
    saved = out / ".state" / "options.json"
    older = json.loads(saved.read_text())
    del older["label_smoothing"]
    saved.write_text(json.dumps(older))
    result = train(opts, settings, progress=False)
    assert result.resumed_from_epoch == 1
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == 3, history
    assert result.manifest.training.resumed_from_epoch == 1
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name


def test_simple_cnn_ensemble_votes(colour_data: Path, tmp_path: Path, settings: Settings) -> None:
    from models.ensemble import evaluate_ensemble, majority_vote, soft_vote

    dirs = []
    for seed in (1, 2, 3):
        dirs.append(tmp_path / f"cnn{seed}")
        train(_opts(colour_data, dirs[-1], backbone="simple-cnn", seed=seed, epochs=1), settings, progress=False)
    res = evaluate_ensemble(dirs, str(colour_data), "test", settings, progress=False)
    assert res["count"] == 12 and len(res["members"]) == 3
    assert 0.0 <= res["ensemble_accuracy"] <= 1.0
    labels = np.array(res["labels"])
    assert res["soft_vote_accuracy"] == pytest.approx(float((np.array(res["soft_predictions"]) == labels).mean()))

    # Two of three models say class 1: the vote is 1 even though model 0 is very sure of class 0.
    p = [np.array([[0.99, 0.01, 0.0]]), np.array([[0.4, 0.6, 0.0]]), np.array([[0.3, 0.7, 0.0]])]
    assert majority_vote(p).tolist() == [1]
    assert soft_vote(p).tolist() == [0]  # the mean probability: 0.56 for class 0, 0.44 for class 1
    # A three-way tie goes to the largest summed probability.
    p = [np.array([[0.5, 0.3, 0.2]]), np.array([[0.1, 0.8, 0.1]]), np.array([[0.2, 0.2, 0.6]])]
    assert majority_vote(p).tolist() == [1]


def test_clear_errors(colour_data: Path, tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(ImgsimError, match="unknown backbone"):
        train(_opts(colour_data, tmp_path / "x", backbone="alexnet"), settings, progress=False)
    with pytest.raises(ImgsimError, match=r"inceptionv3: it takes 75\.\.1024 pixels"):
        train(_opts(colour_data, tmp_path / "i", backbone="inceptionv3", input_size=64), settings, progress=False)
    with pytest.raises(ImgsimError, match="not found"):
        train(_opts(tmp_path / "nowhere", tmp_path / "y", backbone="simple-cnn"), settings, progress=False)
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i, i, i)).save(one / f"{i}.png")
    with pytest.raises(ImgsimError, match="at least 2 classes"):
        train(_opts(tmp_path / "one", tmp_path / "z", backbone="simple-cnn"), settings, progress=False)


def test_cli_train_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    code = main(
        ["train", "--backbone", "simple-cnn", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not found" in err, err
