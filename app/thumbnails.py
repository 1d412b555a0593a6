"""An item's image as the web page and clients fetch it: the stored bytes, or a thumbnail
made once and kept on disk.

Thumbnails are keyed by the image's SHA-256 (what every index version records), so a
version made by a later write, or another index of the same photos, finds them too.
Sizes are rounded up to a few buckets, whose files are kept: a client asking for every
size from 16 to 1024 makes at most five files per image, and a size between two buckets
is scaled from the larger bucket's small file, never from the original again.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from models.data.decode import decode_thumbnail
from models.errors import UnreadableImage

log = logging.getLogger("imgsim.app")
BUCKETS = (64, 128, 256, 512, 1024)
FULL = 0  # bucket of a whole image re-encoded (a format browsers may not show)
MEDIA = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp", "GIF": "image/gif"}


def bucket_of(size: int | None) -> int:
    """The smallest bucket at least ``size`` (FULL for the whole image)."""
    return FULL if size is None else next(b for b in BUCKETS if b >= size)


def encode(img: Image.Image) -> tuple[bytes, str]:
    """PNG for tiny images (JPEG blurs them), else JPEG."""
    fmt = "PNG" if max(img.size) <= 64 else "JPEG"
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90)
    return buf.getvalue(), fmt


class ThumbnailCache:
    """``root/<sha[:2]>/<sha>-<bucket>.<jpg|png>``; files are written whole (rename) or not at all."""

    def __init__(self, root: Path, max_pixels: int) -> None:
        self.root = Path(root)
        self.max_pixels = max_pixels
        self._warned = False

    def _path(self, sha256: str, bucket: int, fmt: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}-{bucket}.{'png' if fmt == 'PNG' else 'jpg'}"

    def _read(self, sha256: str, bucket: int) -> tuple[bytes, str] | None:
        for fmt in ("JPEG", "PNG"):
            try:
                return self._path(sha256, bucket, fmt).read_bytes(), fmt
            except OSError:
                continue
        return None

    def _write(self, sha256: str, bucket: int, data: bytes, fmt: str) -> None:
        path = self._path(sha256, bucket, fmt)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only or full disk: serve uncached, say so once
            if not self._warned:
                log.warning("thumbnails are not cached (%s): %s", self.root, exc.strerror)
                self._warned = True

    def render(self, sha256: str, original: Callable[[], bytes], size: int | None) -> tuple[bytes, str]:
        """(body, media type) of an item's image at ``size`` (None: as stored).

        ``original`` reads the stored bytes; it is called only when no cached file serves.
        Raises UnreadableImage when the stored image cannot be decoded."""
        bucket = bucket_of(size)
        cached = self._read(sha256, bucket)
        if cached is None:
            data = original()
            if size is None:
                try:
                    with Image.open(io.BytesIO(data)) as img:  # the header only
                        if img.format in MEDIA:
                            return data, MEDIA[img.format]
                except (OSError, ValueError) as exc:
                    raise UnreadableImage("corrupt", str(exc)) from None
            body, fmt = encode(decode_thumbnail(data, bucket or None, max_pixels=self.max_pixels))
            self._write(sha256, bucket, body, fmt)
            cached = body, fmt
        body, fmt = cached
        if size is not None and size != bucket:  # scaled from the bucket's small file
            body, fmt = encode(decode_thumbnail(body, size, max_pixels=self.max_pixels))
        return body, MEDIA[fmt]
