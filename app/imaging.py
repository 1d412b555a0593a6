"""Turning an upload into a model-ready array, with the right HTTP error for bad input."""

from __future__ import annotations

import numpy as np

from models.datasets import UnreadableImage, decode_image

ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "MPO"}  # MPO: multi-picture JPEG from cameras
ALLOWED_CONTENT_TYPES = {
    "image/jpeg",
    "image/png",
    "image/webp",
    "image/bmp",
    "image/x-ms-bmp",
    "image/gif",
    "application/octet-stream",
    "",
}


class UploadError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


_REASON_STATUS = {"empty": 422, "corrupt": 422, "not_an_image": 415, "unsupported_format": 415, "too_large": 413}


def check_content_type(content_type: str | None) -> None:
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct not in ALLOWED_CONTENT_TYPES:
        raise UploadError(415, f"unsupported content type {ct!r}: send a JPEG, PNG, WebP, BMP or GIF image")


def decode_upload(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Bytes -> (size, size, 3) uint8, or UploadError(413/415/422) saying what is wrong.

    One ``Image.open``: the format and the pixel count are checked from the header
    before any pixel is decoded.
    """
    try:
        return decode_image(data, size, max_pixels=max_pixels, formats=ALLOWED_FORMATS)
    except UnreadableImage as exc:
        raise UploadError(_REASON_STATUS.get(exc.reason, 422), _upload_detail(exc, max_pixels)) from None


def _upload_detail(exc: UnreadableImage, max_pixels: int) -> str:
    if exc.reason == "unsupported_format":
        return f"unsupported image format {exc.detail}: send JPEG, PNG, WebP, BMP or GIF"
    if exc.reason == "not_an_image":
        return "not an image (or an unsupported format): send JPEG, PNG, WebP, BMP or GIF"
    if exc.reason == "empty":
        return "empty upload: the file has no bytes"
    detail = {
        "too_large": f"image has too many pixels (limit {max_pixels})",
        "corrupt": "corrupt or truncated image",
    }.get(exc.reason, str(exc))
    return f"{detail}: {exc.detail}" if exc.detail else detail
