"""Turning an upload into a model-ready array, with the right HTTP error for bad input."""

from __future__ import annotations

import numpy as np

from models.data import decode_image
from models.errors import UNREADABLE_STATUS, UnreadableImage, UnsupportedType

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
SEND = "send JPEG, PNG, WebP, BMP or GIF"


def check_content_type(content_type: str | None) -> None:
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct not in ALLOWED_CONTENT_TYPES:
        raise UnsupportedType(f"unsupported content type {ct[:64]!r}: {SEND}")


def decode_upload(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Bytes -> (size, size, 3) uint8, or an error (413/415/422) saying what is wrong.

    One ``Image.open``: the format and the pixel count are checked from the header
    before any pixel is decoded.
    """
    try:
        return decode_image(data, size, max_pixels=max_pixels, formats=ALLOWED_FORMATS)
    except UnreadableImage as exc:
        raise UNREADABLE_STATUS[exc.reason](_upload_detail(exc, max_pixels)) from None


def _upload_detail(exc: UnreadableImage, max_pixels: int) -> str:
    detail = exc.reason_detail
    message = {
        "unsupported_format": f"unsupported image format {detail}: {SEND}",
        "not_an_image": f"not an image (or an unsupported format): {SEND}",
        "empty": "empty upload: the file has no bytes",
        "too_large": f"image has too many pixels (limit {max_pixels})",
        "corrupt": "corrupt or truncated image",
    }[exc.reason]
    return f"{message}: {detail}" if detail and exc.reason in ("too_large", "corrupt") else message
