"""OpenVINO runtimes: a trained model converted once, cached next to it, run in bf16 or int8.

Why OpenVINO: on CPUs with BF16/AMX or VNNI instructions it runs the same network several
times faster than TensorFlow fp32 (docs/results.md), and NNCF quantises it to int8 after
training from a few hundred of the model's own training images, with no retraining.

A conversion lives in ``MODEL_DIR/runtimes/<runtime>-<key>/`` (``model.xml``, ``model.bin``,
``meta.json``); the key covers the model file, the input size and the OpenVINO/NNCF
versions, so a retrained model or an upgraded runtime converts afresh. The files' checksums
are verified on every load: a corrupt or half-written conversion is redone, never run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from models.manifests import file_digest, now_utc
from models.runtime_records import CACHE_FORMAT, Calibration, QualityCheck, RuntimeCache, quality_check
from models.runtimes import RuntimeUnavailable

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 300  # NNCF's default subset size; the issue allows "a few hundred"
CHECK_IMAGES = 128
PRECISION_HINT = {"bf16": "bf16", "int8": "bf16"}  # int8 layers run int8; the rest in bf16

# ("calibration" | "check", n) -> (uint8 images, their keys, their data) or None if unreadable here.
Samples = Callable[[str, int], tuple[np.ndarray, list[str], str] | None]


@dataclass(frozen=True)
class Source:
    """What ``ov.convert_model`` reads: a TensorFlow function or a model file (ONNX), and the
    input shape it is given (batch dimension -1)."""

    model: Any
    input_shape: tuple[int, ...]


# ov.convert_model sets the root logger to ERROR while it runs and then restores the level it
# found: two conversions at once left it at ERROR, silencing every warning of the process.
_CONVERT_LOCK = threading.Lock()


def _version(package: str) -> str | None:
    with contextlib.suppress(PackageNotFoundError):
        return version(package)
    return None


def cache_key(runtime: str, model_sha256: str, input_size: int) -> str:
    parts = [CACHE_FORMAT, runtime, model_sha256, input_size, _version("openvino")]
    if runtime == "int8":
        parts.append(_version("nncf"))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def cache_root(model_dir: Path, model_sha256: str, fallback: Path) -> Path:
    """``MODEL_DIR/runtimes``; the settings' cache folder for a backbone name or a read-only model."""
    if model_dir.is_dir() and _writable(model_dir / "runtimes"):
        return model_dir / "runtimes"
    return fallback / "runtimes" / model_sha256.replace(":", "-")[:40]


def read_cache(folder: Path, key: str) -> RuntimeCache | None:
    """The cached conversion in ``folder`` if it is complete and intact, else None (logged)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = RuntimeCache.model_validate_json(meta_path.read_text())
        intact = meta.key == key and all(file_digest(folder / n) == sha for n, sha in meta.files.items())
    except (OSError, ValueError) as exc:
        log.warning("cached conversion %s unreadable (%s): converting again", folder, exc)
        return None
    if not intact:
        log.warning("cached conversion %s is corrupt or stale: converting again", folder)
        return None
    return meta


class OpenVinoForward:
    """A compiled OpenVINO model called like the TensorFlow forward: batch -> list of outputs.

    One infer request per calling thread: a request holds its input and output buffers, so
    the service's concurrent model streams must not share one.
    """

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.outputs = len(compiled.outputs)
        self._local = threading.local()

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return [np.array(request.get_output_tensor(i).data) for i in range(self.outputs)]


def openvino() -> Any:
    """The openvino module, or RuntimeUnavailable saying how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise RuntimeUnavailable(f"openvino cannot be imported ({exc}); pip install openvino nncf") from exc
    return openvino


def _outputs(out: Any) -> list[np.ndarray]:
    return [np.asarray(o) for o in out] if isinstance(out, list | tuple) else [np.asarray(out)]


def _quantize(model: Any, samples: Samples, prepare: Callable[[np.ndarray], np.ndarray]) -> tuple[Any, Calibration]:
    """NNCF post-training quantisation, calibrated on the model's own training images."""
    try:
        import nncf
    except ImportError as exc:
        raise RuntimeUnavailable(f"nncf cannot be imported ({exc}); pip install nncf") from exc
    got = samples("calibration", CALIBRATION_IMAGES)
    if got is None:
        raise RuntimeUnavailable(
            "int8 calibrates on the model's training images, which cannot be read here "
            "(set IMGSIM_CALIBRATION_DATA to a folder of similar images)"
        )
    images, keys, data = got
    batches = [prepare(images[i : i + 1]) for i in range(len(images))]
    # The first convolution sees pixels at their raw scale and is the layer int8 hurts most:
    # kept in bf16, ResNet50's CIFAR-10 accuracy drop went from about 0.5 to 0.15 points
    # (docs/results.md), for a few percent of the network's compute.
    first = next(op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution")
    quantized = nncf.quantize(
        model, nncf.Dataset(batches), subset_size=len(batches), ignored_scope=nncf.IgnoredScope(names=[first])
    )
    return quantized, Calibration(data=data, images=len(keys), keys=keys)


def compile_forward(xml: Path, runtime: str) -> OpenVinoForward:
    ov = openvino()
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": PRECISION_HINT[runtime]})
    return OpenVinoForward(compiled)


def _check(
    runtime: str, ours: OpenVinoForward, reference: Callable[[np.ndarray], Any], samples: Samples,
    prepare: Callable[[np.ndarray], np.ndarray],
) -> QualityCheck | None:  # fmt: skip
    """The conversion against TensorFlow fp32 on held-out images of the model's own data."""
    got = samples("check", CHECK_IMAGES)
    if got is None:
        return None
    images, _, data = got
    mine: list[list[np.ndarray]] = []
    ref: list[list[np.ndarray]] = []
    for i in range(0, len(images), 32):
        x = prepare(images[i : i + 32])
        mine.append(ours(x))
        ref.append(_outputs(reference(x)))
    join = lambda runs: [np.concatenate(parts) for parts in zip(*runs, strict=True)]  # noqa: E731
    return quality_check(runtime, join(mine), join(ref), data)


def convert(
    runtime: str, folder: Path, key: str, model_sha256: str, input_size: int,
    reference: Callable[[np.ndarray], Any], prepare: Callable[[np.ndarray], np.ndarray], samples: Samples,
    source: Source | None = None,
) -> tuple[RuntimeCache, OpenVinoForward]:  # fmt: skip
    """Convert (and for int8 quantise) ``source`` (default: the TensorFlow forward ``reference``,
    NHWC input), check it against ``reference``, store it in ``folder``.

    Written to a temporary folder and renamed into place, so a crash or a concurrent
    conversion never leaves a half-written one behind. The forward returned was compiled
    before the rename: a concurrent conversion replacing the folder cannot pull it away.
    """
    ov = openvino()
    start = time.perf_counter()
    log.warning("converting the model for runtime %s (once; cached in %s)", runtime, folder)
    source = source or Source(reference, (-1, input_size, input_size, 3))
    with _CONVERT_LOCK:
        model = ov.convert_model(source.model, input=[source.input_shape])
    # Stateful layers (random augmentation, seed generators) leave scalar outputs in the graph.
    batched = [o for o in model.outputs if o.get_partial_shape().rank.get_length() > 0]
    if len(batched) < len(model.outputs):
        model = ov.Model(batched, model.get_parameters())
    calibration = None
    if runtime == "int8":
        model, calibration = _quantize(model, samples, prepare)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for left in folder.parent.glob(f".{runtime}-*"):  # from conversions killed an hour or more ago
        if time.time() - left.stat().st_mtime > 3600:
            shutil.rmtree(left, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{runtime}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is read by whoever runs the model
    try:
        ov.save_model(model, tmp / "model.xml", compress_to_fp16=False)
        forward = compile_forward(tmp / "model.xml", runtime)
        check = _check(runtime, forward, reference, samples, prepare)
        meta = RuntimeCache(
            runtime=runtime, key=key, openvino=_version("openvino") or "?",
            nncf=_version("nncf") if runtime == "int8" else None, model_sha256=model_sha256,
            input_size=input_size, files={n: file_digest(tmp / n) for n in ("model.xml", "model.bin")},
            calibration=calibration, check=check, convert_seconds=round(time.perf_counter() - start, 1),
            created=now_utc(),
        )  # fmt: skip
        (tmp / "meta.json").write_text(meta.model_dump_json(indent=1))
        for old in folder.parent.glob(f"{runtime}-*"):  # older keys and a corrupt copy of this one
            shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):  # another process stored the same conversion first
            os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta, forward


def load(
    runtime: str, root: Path, model_sha256: str, input_size: int,
    reference: Callable[[np.ndarray], Any], prepare: Callable[[np.ndarray], np.ndarray], samples: Samples,
    source: Source | None = None,
) -> tuple[OpenVinoForward, RuntimeCache]:  # fmt: skip
    """The runtime's forward from the cache (converting on first use) and its record.

    A conversion that failed its quality check is unavailable: the caller falls back.
    """
    key = cache_key(runtime, model_sha256, input_size)
    folder = root / f"{runtime}-{key}"
    meta, forward = read_cache(folder, key), None
    if meta is None:
        meta, forward = convert(runtime, folder, key, model_sha256, input_size, reference, prepare, samples, source)
    check = meta.check
    if check is not None and not check.passed:
        raise RuntimeUnavailable(
            f"its embeddings' mean cosine to fp32 is {check.mean_cosine:.4f} on {check.images} images, "
            f"below the bar {check.bar}"
        )
    return forward or compile_forward(folder / "model.xml", runtime), meta
