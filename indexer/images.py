"""Serving an indexed item's image without ever reading outside its source."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image

from indexer.store import IndexStore
from models.errors import Gone


def item_image_bytes(store: IndexStore, item_id: int) -> bytes:
    """Encoded bytes of an item: from the table, or from its file inside the dataset folder.

    Folder datasets store a relative key; it is resolved under the dataset root and refused
    if it escapes it (a tampered table must not turn into an arbitrary file read).
    Images added later (`imgsim index add`) store their own absolute path as the source;
    their bytes must still hash to the recorded sha256, so a tampered path reads nothing.
    """
    row, data = store.image_bytes(item_id)
    if data is not None:
        return data
    source = Path(row.source)
    if row.split == "added":
        path = source.resolve()
    else:
        root = Path(store.manifest.dataset.spec).resolve()  # not the row's source: the table may be tampered
        path = (root / row.key).resolve()
        if not path.is_relative_to(root):
            raise Gone(f"item {item_id} points outside its dataset")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Gone(f"image of item {item_id} is no longer readable: {exc.strerror}") from None
    if hashlib.sha256(data).hexdigest() != row.sha256:
        raise Gone(f"image of item {item_id} changed on disk since it was indexed")
    return data


def load_item_image(store: IndexStore, item_id: int) -> Image.Image:
    img = Image.open(io.BytesIO(item_image_bytes(store, item_id)))
    img.load()
    return img
