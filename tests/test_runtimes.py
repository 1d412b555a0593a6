"""Inference runtimes: the choice and its fallbacks, and real OpenVINO conversions of a tiny model."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models import openvino_runtime, runtimes
from models.errors import ImgsimError
from models.runtimes import RuntimeUnavailable, check_runtime, cpu_flags, first_available, plan

AMX = frozenset({"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni"})
OLD_CPU = frozenset({"avx2", "fma"})


def test_unknown_runtime_is_an_error_listing_the_choices() -> None:
    with pytest.raises(ImgsimError) as err:
        check_runtime("fp16")
    for name in ("auto", "tf", "bf16", "int8"):
        assert f"{name}:" in str(err.value)


def test_unknown_runtime_on_the_command_line_and_in_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.cli import main
    from models.settings import get_settings

    with pytest.raises(SystemExit) as stop:
        main(["serve", "--runtime", "fp16"])
    assert stop.value.code == 2
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    monkeypatch.setenv("IMGSIM_RUNTIME", "fp16")
    get_settings.cache_clear()
    try:
        assert main(["serve"]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "IMGSIM_RUNTIME='fp16'" in err and "'bf16'" in err and "'int8'" in err


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 amx_int8\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16", "amx_int8"}
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_plan_takes_the_fastest_runtime_the_cpu_supports() -> None:
    assert plan("auto", AMX, gpu=False) == (["int8", "bf16", "tf"], [])
    assert plan("auto", OLD_CPU, gpu=False) == (["tf"], [])
    assert plan("auto", AMX, gpu=True) == (["tf"], [])  # the GPU path is TensorFlow's
    assert plan("tf", AMX, gpu=False) == (["tf"], [])
    assert plan("int8", frozenset({"avx512_bf16"}), gpu=False)[0] == ["bf16", "tf"]
    tried, notes = plan("bf16", OLD_CPU, gpu=False)
    assert tried == ["tf"] and len(notes) == 1 and "BF16" in notes[0]


def test_a_runtime_the_cpu_cannot_run_falls_back_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    runtime, built = first_available("bf16", lambda r: f"forward-{r}", "model m", flags=OLD_CPU)
    assert (runtime, built) == ("tf", "forward-tf")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "bf16" in lines[0] and "lacks BF16" in lines[0] and "running tf" in lines[0]


def test_an_unavailable_runtime_falls_back_to_the_next(caplog: pytest.LogCaptureFixture) -> None:
    def build(runtime: str) -> str:
        if runtime == "int8":
            raise RuntimeUnavailable("no calibration images")
        return runtime

    caplog.set_level(logging.INFO)
    assert first_available("auto", build, "model m", flags=AMX) == ("bf16", "bf16")
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(lines) == 1 and "no calibration images" in lines[0][1] and "running bf16" in lines[0][1]
    assert lines[0][0] == logging.INFO  # expected under auto: no warning
    caplog.clear()
    assert first_available("int8", build, "model m", flags=AMX) == ("bf16", "bf16")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]  # asked for by name: a warning


# ---- real conversions of a tiny trained model ---------------------------------------------


@pytest.fixture
def model_copy(service_pairs: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of tiny model ``a`` (its conversions are written next to it) on an AMX CPU."""
    monkeypatch.setattr(runtimes, "cpu_flags", lambda: AMX)
    return Path(shutil.copytree(service_pairs[0].model, tmp_path / "model"))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _count_conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = openvino_runtime.convert

    def counted(runtime: str, *args: Any) -> Any:
        calls.append(runtime)
        return real(runtime, *args)

    monkeypatch.setattr(openvino_runtime, "convert", counted)
    return calls


def test_bf16_is_converted_once_cached_checked_and_close_to_tensorflow(
    model_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.embedder import Embedder
    from models.inference import load_trained

    calls = _count_conversions(monkeypatch)
    trained = load_trained(model_copy)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    emb_tf, probs_tf = Embedder(trained, runtime="tf")(images)
    bf16 = Embedder(trained, runtime="bf16")
    emb, probs = bf16(images)
    assert bf16.runtime == "bf16" and calls == ["bf16"]
    assert emb.shape == emb_tf.shape and probs.shape == probs_tf.shape
    assert _cosine(emb, emb_tf).min() > 0.99
    (folder,) = (model_copy / "runtimes").glob("bf16-*")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["check"]["passed"] and meta["check"]["images"] > 0 and meta["check"]["mean_cosine"] >= 0.995
    assert meta["model_sha256"] and set(meta["files"]) == {"model.xml", "model.bin"}

    assert Embedder(trained, runtime="bf16").runtime == "bf16" and calls == ["bf16"]  # from the cache

    (folder / "model.bin").write_bytes((folder / "model.bin").read_bytes()[:100])  # a corrupt cache
    again = Embedder(trained, runtime="bf16")
    assert again.runtime == "bf16" and calls == ["bf16", "bf16"]
    assert _cosine(again(images)[0], emb_tf).min() > 0.99

    monkeypatch.setattr(openvino_runtime, "_version", lambda package: "9999.0")  # an upgraded OpenVINO
    assert Embedder(trained, runtime="bf16").runtime == "bf16" and calls == ["bf16"] * 3
    assert len(list((model_copy / "runtimes").glob("bf16-*"))) == 1  # the stale one is gone


def test_two_processes_converting_at_once_both_get_a_working_runtime(model_copy: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from models.embedder import Embedder
    from models.inference import load_trained

    trained = load_trained(model_copy)
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    level = logging.root.level
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda _: Embedder(trained, runtime="bf16"), range(2)))
    assert [e.runtime for e in both] == ["bf16", "bf16"]
    assert _cosine(both[0](images)[0], both[1](images)[0]).min() > 0.999
    assert len(list((model_copy / "runtimes").glob("bf16-*"))) == 1
    assert not list((model_copy / "runtimes").glob(".bf16-*"))  # no temporary folder left behind
    assert logging.root.level == level  # OpenVINO's converter sets it while it runs


def test_int8_calibrates_on_the_models_training_images_and_records_them(
    model_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from models.data import open_dataset
    from models.embedder import Embedder
    from models.inference import load_trained

    trained = load_trained(model_copy)
    int8 = Embedder(trained, runtime="int8")
    (folder,) = (model_copy / "runtimes").glob("int8-*")
    meta = openvino_runtime.RuntimeCache.model_validate_json((folder / "meta.json").read_text())
    train_keys = {i.key for i in open_dataset(trained.manifest.training.data, val_fraction=0.2, seed=1).select("train")}
    assert meta.calibration is not None and meta.calibration.data == trained.manifest.training.data
    assert 0 < meta.calibration.images == len(meta.calibration.keys) <= openvino_runtime.CALIBRATION_IMAGES
    assert set(meta.calibration.keys) <= train_keys
    assert meta.check is not None and meta.nncf
    if meta.check.passed:
        assert int8.runtime == "int8"
    else:  # a quality check that fails sends the model one runtime down, with one log line
        assert int8.runtime == "bf16" and any("below the bar" in r.getMessage() for r in caplog.records)


def test_int8_without_calibration_images_falls_back_to_bf16(model_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    from models.embedder import Embedder
    from models.inference import load_trained

    manifest = json.loads((model_copy / "manifest.json").read_text())
    manifest["training"]["data"] = str(model_copy / "gone")
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    embedder = Embedder(load_trained(model_copy), runtime="int8")
    assert embedder.runtime == "bf16"
    lines = [r.getMessage() for r in caplog.records if "runtime int8 unavailable" in r.getMessage()]
    assert len(lines) == 1 and "IMGSIM_CALIBRATION_DATA" in lines[0]


def test_the_service_reports_each_models_runtime(make_service_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtimes, "cpu_flags", lambda: AMX)
    with TestClient(make_service_app(("a",), runtime="bf16")) as client:
        assert client.get("/readyz").json()["runtimes"] == {"a": "bf16"}
        assert client.get("/v1/models").json()["models"][0]["runtime"] == "bf16"
        assert 'imgsim_model_runtime{model="a",runtime="bf16"} 1.0' in client.get("/metrics").text
        r = client.post("/v1/search", files={"file": ("q.png", _png(), "image/png")}, data={"k": "3"})
        assert r.status_code == 200 and len(r.json()["results"]) == 3


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_a_backbone_name_calibrates_int8_on_the_collection_it_indexes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ImageNet features have no training data here: the photos being indexed calibrate int8."""
    from indexer.build import build_index
    from models.settings import get_settings
    from tests.test_train import make_colour_dataset

    monkeypatch.setattr(runtimes, "cpu_flags", lambda: AMX)
    monkeypatch.setattr(openvino_runtime, "cache_root", lambda *args: tmp_path / "runtimes")
    photos = make_colour_dataset(tmp_path / "photos", per_class=6, test_per_class=0, size=40)
    settings = get_settings().model_copy(update={"runtime": "int8"})
    report = build_index("resnet50:32", str(photos), tmp_path / "index", settings=settings, progress=False,
                         labels="none")  # fmt: skip
    (meta_file,) = (tmp_path / "runtimes").glob("int8-*/meta.json")
    meta = openvino_runtime.RuntimeCache.model_validate_json(meta_file.read_text())
    assert meta.calibration is not None and meta.calibration.data == str(photos)
    assert 0 < meta.calibration.images <= report.count
    assert report.runtime == ("int8" if meta.check is None or meta.check.passed else "bf16")
