"""Turning an upload into a model-ready array, with the right HTTP error for bad input."""

from __future__ import annotations

import contextlib
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from models.data import decode_image
from models.errors import UNREADABLE_STATUS, TooLarge, UnreadableImage, UnsupportedType

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
DECODE_NICENESS = 10  # CPU weight about a tenth of a normal thread's when the cores are contended


def _lower_priority() -> None:
    """A decode thread yields the CPU to the event loop and the model calls (Linux: per thread)."""
    with contextlib.suppress(OSError, AttributeError):  # not permitted or not Linux: normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)


def decode_pool(workers: int) -> ThreadPoolExecutor:
    """The threads that decode uploads: a burst of 40-megapixel images keeps them busy, and at a
    lower priority they cannot starve the event loop (``/healthz`` stays fast) or the model."""
    return ThreadPoolExecutor(workers, thread_name_prefix="imgsim-decode", initializer=_lower_priority)


def check_content_type(content_type: str | None) -> None:
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct not in ALLOWED_CONTENT_TYPES:
        raise UnsupportedType(f"unsupported content type {ct[:64]!r}: {SEND}")


def _check_webp(data: bytes, max_pixels: int) -> None:
    """Pillow's WebP decoder holds the GIL while it copies the decoded frame (about 80 ms at
    40 megapixels, measured by benchmarks/worst_uploads.py), stalling every other request:
    WebP uploads get a smaller pixel limit than other formats."""
    if not (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only
            w, h = img.size
    except Exception:  # noqa: BLE001 - a broken header is decode_image's to report
        return
    if w * h > max_pixels:
        raise TooLarge(f"WebP image has too many pixels ({w}x{h}; the WebP limit is {max_pixels}): send a JPEG or PNG")


def decode_upload(data: bytes, size: int, max_pixels: int, max_webp_pixels: int | None = None) -> np.ndarray:
    """Bytes -> (size, size, 3) uint8, or an error (413/415/422) saying what is wrong.

    The format and the pixel count are checked from the header before any pixel is decoded.
    """
    if max_webp_pixels is not None:
        _check_webp(data, max_webp_pixels)
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
