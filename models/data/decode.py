"""Image bytes (or arrays) to RGB pixels, with a reason for every image that cannot be used."""

from __future__ import annotations

import io
import zlib
from collections.abc import Collection

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.data.budget import DECODES
from models.errors import UnreadableImage
from models.settings import get_settings

# Magic numbers of formats Pillow reads; used to tell "corrupt image" from
# "not an image" when Pillow cannot even identify the file.
_IMAGE_MAGIC: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
)


REDUCING_GAP = 3.0  # the final resize: a box reduce to within 3x of the target, then bicubic


def _shrink(img: Image.Image, size: int | None) -> Image.Image:
    """Box-reduce a large decoded image before its conversion to RGB, so that the conversion's
    copies (palette expansion, alpha compositing) are made at the small size, not at 40 MP.

    The factor is the one the final ``resize(reducing_gap=3)`` would use, so RGB and grey
    images come out as before within a few levels of 255 (Pillow's own reduce also keeps the
    fractional remainder); only the decode itself is paid at full size.
    """
    if size is None:
        return img
    fx, fy = int(img.width / size / REDUCING_GAP) or 1, int(img.height / size / REDUCING_GAP) or 1
    if (fx, fy) == (1, 1):
        return img
    if img.mode.startswith("I;16"):  # 16-bit grey: its top byte, as _to_rgb does; Pillow's C code
        # throughout (no numpy copy through tobytes), so other threads keep the GIL meanwhile
        return img.convert("I").reduce((fx, fy)).point(lambda v: v / 256).convert("L")
    if img.mode in ("P", "PA") or "transparency" in img.info:  # palette indices cannot be averaged
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    return img.reduce((fx, fy))


def _looks_like_image(head: bytes) -> bool:
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return True
    return head.startswith(_IMAGE_MAGIC)


def decode_image(
    raw: bytes | np.ndarray,
    size: int | None,
    *,
    max_pixels: int | None = None,
    formats: Collection[str] | None = None,
) -> np.ndarray:
    """Decode a payload to a uint8 RGB array, ``(size, size, 3)`` or native size.

    Non-square images are squashed to the square (as Keras'
    image_dataset_from_directory does) rather than cropped, so nothing is cut.
    Raises ``UnreadableImage`` with reason empty / not_an_image / corrupt /
    too_large (and unsupported_format when ``formats``, Pillow format names, is given);
    the pixel limit and the format are checked from the header before decoding.

    Pillow's own bomb guard still applies: its DecompressionBombError (images
    over 2x ``Image.MAX_IMAGE_PIXELS``) maps to too_large.  Its
    DecompressionBombWarning is not turned into an error, because
    ``warnings.catch_warnings`` mutates process-global state and this
    function runs in worker threads; with the default ``max_pixels`` every
    image that triggers the warning is rejected as too_large right after.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be positive or None, got {size}")
    limit = get_settings().max_image_pixels if max_pixels is None else max_pixels
    with DECODES.slot():
        if isinstance(raw, np.ndarray):
            img = _image_from_array(raw, limit)
        else:
            img = _image_from_bytes(bytes(raw), limit, size, formats)
        try:
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP)
            return np.array(img, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, EOFError, zlib.error) as exc:
            raise UnreadableImage("corrupt", str(exc)) from exc


def decode_thumbnail(data: bytes, size: int | None, *, max_pixels: int | None = None) -> Image.Image:
    """Bytes -> an RGB image whose longest side is at most ``size`` (aspect kept; None: full
    size), decoded as ``decode_image`` decodes: the same pixel limit, reduced decoding, EXIF
    orientation and the process's decode budget."""
    limit = get_settings().max_image_pixels if max_pixels is None else max_pixels
    with DECODES.slot():
        img = _image_from_bytes(bytes(data), limit, size)
        try:
            if size is not None:
                img.thumbnail((size, size), Image.Resampling.LANCZOS)  # never enlarges
            img.load()
        except (OSError, ValueError, SyntaxError, EOFError, zlib.error) as exc:
            raise UnreadableImage("corrupt", str(exc)) from exc
        return img


def _image_from_array(arr: np.ndarray, limit: int) -> Image.Image:
    if arr.size == 0:
        raise UnreadableImage("empty", "array has no pixels")
    if arr.dtype != np.uint8:
        raise UnreadableImage("not_an_image", f"array dtype {arr.dtype} is not uint8")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise UnreadableImage("not_an_image", f"array shape {arr.shape} is not HxW or HxWx{{1,3,4}}")
    h, w = arr.shape[:2]
    if h * w > limit:
        raise UnreadableImage("too_large", f"{w}x{h} pixels exceeds the limit of {limit}")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(arr)))


def _image_from_bytes(data: bytes, limit: int, size: int | None, formats: Collection[str] | None = None) -> Image.Image:
    if not data:
        raise UnreadableImage("empty", "zero-byte file")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise UnreadableImage("too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        if _looks_like_image(data[:16]):
            raise UnreadableImage("corrupt", "damaged image header") from exc
        raise UnreadableImage("not_an_image", "not a recognised image format") from exc
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error) as exc:
        raise UnreadableImage("corrupt", str(exc)) from exc

    if formats is not None and img.format not in formats:
        raise UnreadableImage("unsupported_format", str(img.format))
    w, h = img.size  # header only; no pixel has been decoded yet
    if w * h > limit:
        raise UnreadableImage("too_large", f"{w}x{h} pixels exceeds the limit of {limit}")
    if w == 0 or h == 0:
        raise UnreadableImage("corrupt", f"image has size {w}x{h}")
    try:
        if size is not None and img.format == "JPEG":
            # Let libjpeg decode at 1/2..1/8 scale when that still covers `size`.
            img.draft("RGB", (size, size))
        img.load()  # first frame for animated formats
        orientation = img.getexif().get(0x0112, 1)
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        return _to_rgb(_shrink(img, size))
    except Image.DecompressionBombError as exc:
        raise UnreadableImage("too_large", str(exc)) from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, zlib.error) as exc:
        # Pillow plugins signal damaged data with a variety of exception types.
        raise UnreadableImage("corrupt", str(exc) or type(exc).__name__) from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency composited onto white; 16-bit grey scaled, not clipped."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.uint32)
        if mode != "I" or arr.max(initial=0) > 255:
            arr = (arr >> 8).astype(np.uint32)
        img = Image.fromarray(arr.astype(np.uint8))
        mode = "L"
    elif mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
