"""What a runtime conversion records in its ``meta.json``: what int8 was calibrated on, and
how the conversion's outputs compared with the fp32 reference (the check that decides
whether it is used)."""

from __future__ import annotations

import numpy as np

from models.manifests import _Record

CACHE_FORMAT = 2  # part of every cache key: a new recipe converts afresh
QUALITY_BARS = {"bf16": 0.995, "int8": 0.98}  # mean cosine to the fp32 reference's embeddings


class Calibration(_Record):
    data: str
    images: int
    keys: list[str]


class QualityCheck(_Record):
    data: str
    images: int
    mean_cosine: float
    min_cosine: float
    top1_agreement: float | None = None
    bar: float
    passed: bool


class RuntimeCache(_Record):
    """``meta.json`` of one cached conversion."""

    format: int = CACHE_FORMAT
    runtime: str
    key: str
    openvino: str
    nncf: str | None = None
    model_sha256: str
    input_size: int
    files: dict[str, str]  # name -> sha256
    calibration: Calibration | None = None
    check: QualityCheck | None = None
    convert_seconds: float
    created: str


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    return np.sum(unit(a) * unit(b), axis=1)


def quality_check(runtime: str, ours: list[np.ndarray], reference: list[np.ndarray], data: str) -> QualityCheck:
    """Embeddings (output 0) and, with a classifier, top-1 classes (output 1) against fp32."""
    cos = _cosines(ours[0], reference[0])
    agree = float(np.mean(ours[1].argmax(1) == reference[1].argmax(1))) if len(ours) > 1 else None
    bar = QUALITY_BARS[runtime]
    return QualityCheck(
        data=data,
        images=len(cos),
        mean_cosine=round(float(cos.mean()), 6),
        min_cosine=round(float(cos.min()), 6),
        top1_agreement=agree,
        bar=bar,
        passed=bool(cos.mean() >= bar),
    )
