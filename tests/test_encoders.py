"""One encoder interface: a new encoder defined here alone goes through `index build`, the
service and a search; a user's own ONNX export (built here, nothing downloaded) too."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.test_service import noisy, png, upload
from tests.test_train import make_colour_dataset

BLUE = (30, 60, 220)


# ---------------------------------------------------------------- a new encoder, in this file only
class HistogramEncoder:
    """Colour histograms as embeddings: a stand-in for any encoder someone adds."""

    has_classifier = False
    class_names: list[str] = []
    runtime = "numpy"
    input_size = 32

    def __init__(self, bins: int) -> None:
        from models.encoders import describe

        self.bins = bins
        self.manifest, self.identity = describe(f"hist:{bins}")
        self.name = self.manifest.name

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        edges = np.linspace(0, 256, self.bins + 1)
        rows = [np.concatenate([np.histogram(img[..., c], edges)[0] for c in range(3)]) for img in batch]
        return np.asarray(rows, np.float32), np.zeros((len(batch), 0), np.float32)

    def embed(self, batch: np.ndarray, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
        from models.encoders import l2_normalise

        emb, probs = self(batch)
        return l2_normalise(emb), probs


def _hist_describe(spec: str, settings: Any) -> tuple[Any, Any]:
    from models.manifests import ModelIdentity, ModelManifest

    bins = int(spec.split(":")[1])
    manifest = ModelManifest(name=f"hist-{bins}", backbone="hist", input_size=32, preprocessing="raw",
                             class_names=[], embedding_layer="histogram", embedding_dim=3 * bins)  # fmt: skip
    identity = ModelIdentity(name=manifest.name, path=spec, backbone="hist", model_sha256=f"hist-v1-{bins}",
                             embedding_layer="histogram", embedding_dim=3 * bins, input_size=32)  # fmt: skip
    return manifest, identity


@pytest.fixture
def histogram_kind() -> Any:
    from models.encoders import EncoderKind, register
    from models.encoders.registry import _KINDS

    kind = register(EncoderKind(
        "hist", "hist:BINS (colour histograms, a test encoder)", lambda spec: re.fullmatch(r"hist:\d+", spec) is not None,
        _hist_describe, lambda spec, runtime, settings, collection: HistogramEncoder(int(spec.split(":")[1])),
    ))  # fmt: skip
    yield kind
    _KINDS.pop(kind.name, None)


def test_a_new_encoder_defined_in_a_test_builds_serves_and_searches(histogram_kind: Any, tmp_path: Path) -> None:
    from app.cli import main, options
    from app.config import ModelPair, ServiceSettings
    from app.main import create_app

    assert "hist:BINS" in options.model_help()  # --help lists it
    data = make_colour_dataset(tmp_path / "colours", per_class=6, test_per_class=1, size=32)
    index = tmp_path / "index"
    assert main(["index", "build", "--model", "hist:8", "--data", str(data), "--out", str(index), "-q"]) == 0
    pair = ModelPair(model=Path("hist:8"), index=index)
    with TestClient(create_app(ServiceSettings(models=[pair], reload_seconds=0))) as client:
        models = client.get("/v1/models").json()["models"][0]
        assert models["name"] == "hist-8" and models["runtime"] == "numpy" and models["embedding_dim"] == 24
        r = client.post("/v1/search", files=upload(png(noisy(BLUE, seed=3))), data={"k": "3"})
        assert r.status_code == 200, r.text
        assert [n["label"] for n in r.json()["results"]] == ["blue"] * 3
    with pytest.raises(Exception, match="model_sha256"):  # an index refuses another encoder's identity
        from indexer.store import IndexStore
        from models.encoders import describe

        IndexStore.open(index, expect_model=describe("hist:4")[1])


def test_an_unknown_model_spec_lists_what_model_takes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    data = make_colour_dataset(tmp_path / "colours", per_class=2, test_per_class=1, size=32)
    code = main(
        ["index", "build", "--model", str(tmp_path / "nothing"), "--data", str(data), "--out", str(tmp_path / "i")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no encoder for" in err and "encoder.onnx" in err and "resnet50" in err


# ---------------------------------------------------------------- your own ONNX export
def write_onnx_encoder(folder: Path, size: int = 32, dim: int = 16, layout: str = "NCHW") -> Path:
    """A small convolutional encoder saved as ONNX with its sidecar: pixels -> conv -> relu ->
    global average pool -> (N, dim). Fixed random weights; nothing is downloaded."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = []
    source = "pixels"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["pixels"], ["nchw"], perm=[0, 3, 1, 2]))
        source = "nchw"
    weights = numpy_helper.from_array(rng.normal(size=(dim, 3, 3, 3)).astype(np.float32), "w")
    nodes += [
        helper.make_node("Conv", [source, "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["image_embeds"]),
    ]
    shape = ["n", 3, size, size] if layout == "NCHW" else ["n", size, size, 3]
    graph = helper.make_graph(
        nodes, "tiny-encoder", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["n", dim])], [weights],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "encoder.onnx")
    sidecar = {"name": "tiny-onnx", "input_size": size, "layout": layout, "mean": [0.48, 0.46, 0.41],
               "std": [0.27, 0.26, 0.28], "output": "image_embeds"}  # fmt: skip
    (folder / "encoder.json").write_text(json.dumps(sidecar))
    return folder


def _reference(batch: np.ndarray, folder: Path) -> np.ndarray:
    """The same network in numpy, from the ONNX file's weights."""
    import onnx
    from onnx import numpy_helper

    w = numpy_helper.to_array(onnx.load(folder / "encoder.onnx").graph.initializer[0])
    side = json.loads((folder / "encoder.json").read_text())
    x = (batch.astype(np.float32) / 255 - np.float32(side["mean"])) / np.float32(side["std"])
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    n, h, wd = batch.shape[:3]
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))  # n, h, w, c, 3, 3
    conv = np.einsum("nhwcij,dcij->nhwd", windows[:, :h, :wd], w)
    return np.maximum(conv, 0).mean(axis=(1, 2))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_an_onnx_encoder_embeds_like_its_network(tmp_path: Path, layout: str) -> None:
    from models.encoders import describe, open_encoder
    from models.settings import get_settings

    folder = write_onnx_encoder(tmp_path / "enc", layout=layout)
    settings = get_settings().model_copy(update={"cache_dir": tmp_path / "cache"})
    manifest, identity = describe(folder, settings)
    assert (manifest.name, manifest.embedding_dim, manifest.input_size) == ("tiny-onnx", 16, 32)
    enc = open_encoder(folder, runtime="tf", settings=settings)
    batch = np.random.default_rng(1).integers(0, 255, (5, 32, 32, 3), np.uint8)
    raw, probs = enc(batch)
    assert probs.shape == (5, 0) and not enc.has_classifier and enc.identity == identity
    np.testing.assert_allclose(raw, _reference(batch, folder), rtol=1e-4, atol=1e-4)
    unit, _ = enc.embed(batch)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)


def test_an_onnx_encoder_through_index_build_serve_and_search(tmp_path: Path) -> None:
    from app.cli import main
    from app.config import ModelPair, ServiceSettings
    from app.main import create_app

    folder = write_onnx_encoder(tmp_path / "enc")
    data = make_colour_dataset(tmp_path / "colours", per_class=6, test_per_class=1, size=32)
    index = tmp_path / "index"
    assert main(["index", "build", "--model", str(folder), "--data", str(data), "--out", str(index), "-q",
                 "--runtime", "tf"]) == 0  # fmt: skip
    pair = ModelPair(model=folder, index=index)
    with TestClient(create_app(ServiceSettings(models=[pair], reload_seconds=0, runtime="tf"))) as client:
        r = client.post("/v1/search", files=upload(png(noisy(BLUE, seed=3))), data={"k": "3"})
        assert r.status_code == 200, r.text
        assert client.get("/v1/models").json()["models"][0]["name"] == "tiny-onnx"
        assert len(r.json()["results"]) == 3


def test_a_broken_sidecar_is_one_clear_error(tmp_path: Path) -> None:
    from models.encoders import describe
    from models.errors import ImgsimError

    folder = write_onnx_encoder(tmp_path / "enc")
    (folder / "encoder.json").write_text('{"input_size": 32, "layout": "CHW"}')
    with pytest.raises(ImgsimError, match="encoder.json cannot be used.*layout"):
        describe(folder)
    (folder / "encoder.json").write_text('{"input_size": 32, "output": "nope"}')
    with pytest.raises(ImgsimError, match="no output 'nope'; its outputs: image_embeds"):
        describe(folder)


@pytest.mark.parametrize("runtime", ["bf16", "int8"])
def test_an_onnx_encoder_runs_on_the_faster_runtimes(tmp_path: Path, runtime: str) -> None:
    """Converted from the ONNX file (int8 calibrated on the collection), checked against fp32
    and cached; a CPU without the instructions falls back to fp32 (runtime 'tf')."""
    from models.data import open_dataset
    from models.encoders import open_encoder
    from models.settings import get_settings

    folder = write_onnx_encoder(tmp_path / "enc")
    data = make_colour_dataset(tmp_path / "colours", per_class=10, test_per_class=1, size=32)
    settings = get_settings().model_copy(update={"cache_dir": tmp_path / "cache"})
    enc = open_encoder(
        folder, runtime=runtime, settings=settings, collection=open_dataset(str(data), settings=settings)
    )
    ref = open_encoder(folder, runtime="tf", settings=settings)
    batch = np.random.default_rng(2).integers(0, 255, (8, 32, 32, 3), np.uint8)
    assert enc.runtime in (runtime, "tf")
    assert float((enc.embed(batch)[0] * ref.embed(batch)[0]).sum(axis=1).min()) > 0.99
    if enc.runtime == runtime:
        assert list((folder / "runtimes").glob(f"{runtime}-*/model.xml"))  # cached for the next load
