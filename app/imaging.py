"""Turning an upload into a model-ready array, with the right HTTP error for bad input."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.datasets import UnreadableImage, _looks_like_image, decode_image

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


_REASON_STATUS = {"empty": 422, "corrupt": 422, "not_an_image": 415, "too_large": 413}


def check_content_type(content_type: str | None) -> None:
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct not in ALLOWED_CONTENT_TYPES:
        raise UploadError(415, f"unsupported content type {ct!r}: send a JPEG, PNG, WebP, BMP or GIF image")


def decode_upload(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Bytes -> (size, size, 3) uint8, or UploadError(413/415/422) saying what is wrong."""
    if not data:
        raise UploadError(422, "empty upload: the file has no bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:  # header only: no pixels decoded yet
            fmt = img.format
    except UnidentifiedImageError:
        if _looks_like_image(data[:16]):  # a known signature whose header Pillow cannot parse: damaged, not alien
            raise UploadError(422, "corrupt or truncated image: damaged image header") from None
        raise UploadError(415, "not an image (or an unsupported format): send JPEG, PNG, WebP, BMP or GIF") from None
    except Image.DecompressionBombError:
        raise UploadError(413, f"image has too many pixels (limit {max_pixels})") from None
    except Exception as exc:
        raise UploadError(422, f"unreadable image header: {exc}") from None
    if fmt not in ALLOWED_FORMATS:
        raise UploadError(415, f"unsupported image format {fmt}: send JPEG, PNG, WebP, BMP or GIF")
    try:
        return decode_image(data, size, max_pixels=max_pixels)
    except UnreadableImage as exc:
        status = _REASON_STATUS.get(exc.reason, 422)
        detail = {
            "too_large": f"image has too many pixels (limit {max_pixels})",
            "corrupt": "corrupt or truncated image",
            "empty": "empty upload",
            "not_an_image": "not an image",
        }.get(exc.reason, str(exc))
        raise UploadError(status, f"{detail}: {exc.detail}" if exc.detail else detail) from None
