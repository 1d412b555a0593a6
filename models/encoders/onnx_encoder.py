"""Your own image encoder as ONNX: a folder with ``encoder.onnx`` and ``encoder.json``.

The sidecar says how to feed the network (docs/encoders.md)::

    {"name": "clip-vit-b32", "input_size": 224, "layout": "NCHW",
     "mean": [0.4815, 0.4578, 0.4082], "std": [0.2686, 0.2613, 0.2758], "output": "image_embeds"}

Pixels are scaled to 0..1, then ``(x - mean) / std`` per channel (RGB), then laid out as
``layout`` says. ``output`` names the network output that is the embedding (default: the
first). OpenVINO reads ONNX directly: ``tf`` (the reference runtime) runs it in fp32;
``bf16`` and ``int8`` are converted, checked against fp32 and cached as for the Keras models.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models import openvino_runtime
from models.encoders.registry import EncoderKind, ImageEncoder, l2_normalise, register
from models.errors import ImgsimError
from models.manifests import ModelIdentity, ModelManifest, WeightsRef, file_digest
from models.runtimes import first_available
from models.settings import Settings

if TYPE_CHECKING:
    from models.data import Dataset

ONNX_FILE = "encoder.onnx"
SIDECAR = "encoder.json"


class Sidecar(BaseModel):
    """encoder.json: what the network expects."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="Default: the folder's name")
    input_size: int = Field(ge=8, le=4096)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    output: str | None = Field(None, description="The embedding output's name (default: the first output)")


def _folder(spec: str) -> Path:
    path = Path(spec)
    return path.parent if path.name == ONNX_FILE else path


def _is_onnx(spec: str) -> bool:
    folder = _folder(spec)
    return (folder / ONNX_FILE).is_file() and (folder / SIDECAR).is_file()


def read_sidecar(folder: Path) -> Sidecar:
    try:
        return Sidecar.model_validate(json.loads((folder / SIDECAR).read_text()))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ImgsimError(f"{folder / SIDECAR} cannot be used: {problems}") from None
    except (OSError, ValueError) as exc:
        raise ImgsimError(f"{folder / SIDECAR} cannot be used: {exc}") from None


def _describe(spec: str, settings: Settings) -> tuple[ModelManifest, ModelIdentity]:
    folder = _folder(spec).resolve()
    return _describe_model(folder, read_sidecar(folder), _read_model(folder))


def _read_model(folder: Path) -> Any:
    return openvino_runtime.openvino().Core().read_model(str(folder / ONNX_FILE))


def _describe_model(folder: Path, side: Sidecar, model: Any) -> tuple[ModelManifest, ModelIdentity]:
    sha = file_digest(folder / ONNX_FILE)
    dim = _output_dim(folder, side, model)
    name = side.name or folder.name
    manifest = ModelManifest(
        name=name, backbone="onnx", weights=WeightsRef(source=f"onnx:{folder / ONNX_FILE}", sha256=sha),
        input_size=side.input_size, preprocessing="onnx", class_names=[], embedding_layer=side.output or "output:0",
        embedding_dim=dim,
    )  # fmt: skip
    identity = ModelIdentity(name=name, path=str(folder), backbone="onnx", model_sha256=f"onnx:{sha}",
                             embedding_layer=manifest.embedding_layer, embedding_dim=dim, input_size=side.input_size)  # fmt: skip
    return manifest, identity


def _output_dim(folder: Path, side: Sidecar, model: Any) -> int:
    out = _output_port(model, side.output)
    shape = out.get_partial_shape()
    if shape.rank.get_length() != 2 or not shape[1].is_static:
        raise ImgsimError(f"{folder / ONNX_FILE}: output {out.get_any_name()} has shape {shape}; want (batch, dim)")
    return int(shape[1].get_length())


def _output_port(model: Any, name: str | None) -> Any:
    if name is None:
        return model.outputs[0]
    for out in model.outputs:
        if name in out.get_names():
            return out
    names = ", ".join(n for o in model.outputs for n in o.get_names())
    raise ImgsimError(f"the ONNX model has no output {name!r}; its outputs: {names}")


def prepare(batch: np.ndarray, side: Sidecar) -> np.ndarray:
    """uint8 RGB (N, S, S, 3) -> the network's float32 input."""
    x = (np.asarray(batch, np.float32) / 255.0 - np.asarray(side.mean, np.float32)) / np.asarray(side.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if side.layout == "NCHW" else x, dtype=np.float32)


class OnnxEncoder:
    """An ONNX image tower run by OpenVINO: embeddings only (no classifier)."""

    has_classifier = False
    class_names: list[str] = []

    def __init__(self, spec: str, runtime: str | None, settings: Settings, collection: Dataset | None) -> None:
        self.folder = _folder(spec).resolve()
        self.side = read_sidecar(self.folder)
        model = _read_model(self.folder)  # read once: described, then compiled
        self._manifest, self.identity = _describe_model(self.folder, self.side, model)
        self.name, self.input_size = self._manifest.name, self.side.input_size
        self.settings, self.collection = settings, collection
        self._prepare = partial(prepare, side=self.side)
        self._reference = self._compile_fp32(model)
        self.runtime, self._forward = first_available(runtime or settings.runtime, self._build, f"encoder {self.name}")

    @property
    def manifest(self) -> ModelManifest:
        return self._manifest

    def _compile_fp32(self, model: Any) -> openvino_runtime.OpenVinoForward:
        ov = openvino_runtime.openvino()
        model = ov.Model([_output_port(model, self.side.output)], model.get_parameters())
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return openvino_runtime.OpenVinoForward(compiled)

    def _build(self, runtime: str) -> Any:
        if runtime == "tf":  # the reference runtime: fp32, here on OpenVINO
            return self._reference
        s = self.input_size
        shape = (-1, 3, s, s) if self.side.layout == "NCHW" else (-1, s, s, 3)
        source = openvino_runtime.Source(str(self.folder / ONNX_FILE), shape)
        sha = self.identity.model_sha256.removeprefix("onnx:")
        root = openvino_runtime.cache_root(self.folder, sha, self.settings.cache_dir)
        forward, _ = openvino_runtime.load(runtime, root, sha, s, self._reference, self._prepare,
                                           self._samples, source)  # fmt: skip
        return forward

    def _samples(self, kind: str, n: int) -> tuple[np.ndarray, list[str], str] | None:
        """Calibration and check images: the collection being indexed (an ONNX file has no data)."""
        from models.inference import model_samples

        return model_samples(self._manifest, self.settings, self.collection)(kind, n)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self._forward(self._prepare(batch))
        emb = np.asarray(out[0] if isinstance(out, list) else out, np.float32)
        return emb, np.zeros((len(batch), 0), np.float32)

    def embed(self, batch: np.ndarray, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
        emb, probs = self(batch)
        if tta == "flip":
            emb = emb + self(batch[:, :, ::-1])[0]
        elif tta != "none":
            raise ImgsimError(f"unknown test-time augmentation {tta!r}; choose none or flip")
        return l2_normalise(emb), probs


def _load(spec: str, runtime: str | None, settings: Settings, collection: Dataset | None) -> ImageEncoder:
    return OnnxEncoder(spec, runtime, settings, collection)


ONNX = register(EncoderKind(
    "onnx", f"a folder with {ONNX_FILE} and {SIDECAR} (docs/encoders.md)", _is_onnx, _describe, _load,
))  # fmt: skip
