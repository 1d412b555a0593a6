"""Typed manifests: older formats load, newer ones and damaged ones get a clear error."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from indexer.store import IndexStore
from models.errors import BadInput, ImgsimError, NotFound, UnreadableImage
from models.manifests import FORMAT, read_index_manifest, read_model_manifest


def _copy(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    shutil.copytree(src, dst)
    raw = json.loads((dst / "manifest.json").read_text())
    edit(raw)
    (dst / "manifest.json").write_text(json.dumps(raw))
    return dst


def test_format_1_directories_still_load(service_pairs: list[Any], tmp_path: Path) -> None:
    """Model and index directories written before the typed manifests keep working."""
    pair = service_pairs[0]
    model = _copy(pair.model, tmp_path / "model", lambda m: m.update(format=1))
    index = _copy(pair.index, tmp_path / "index", lambda m: m.update(format=1))
    assert read_model_manifest(model).format == FORMAT
    store = IndexStore.open(index)
    assert store.manifest.format == FORMAT and store.manifest.count == store.index.ntotal
    store.close()


def test_a_newer_format_asks_for_a_newer_imgsim(service_pairs: list[Any], tmp_path: Path) -> None:
    index = _copy(service_pairs[0].index, tmp_path / "index", lambda m: m.update(format=FORMAT + 1))
    with pytest.raises(ImgsimError, match="newer than this imgsim.*upgrade imgsim"):
        read_index_manifest(index)


def test_a_damaged_manifest_names_the_field(service_pairs: list[Any], tmp_path: Path) -> None:
    model = _copy(service_pairs[0].model, tmp_path / "model", lambda m: m.pop("input_size"))
    with pytest.raises(ImgsimError, match=r"damaged \(input_size: Field required\).*imgsim train"):
        read_model_manifest(model)
    (model / "manifest.json").write_text("{not json")
    with pytest.raises(ImgsimError, match="cannot be read"):
        read_model_manifest(model)


def test_a_directory_without_a_manifest_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ImgsimError, match="not a trained model directory.*imgsim train"):
        read_model_manifest(tmp_path)
    with pytest.raises(ImgsimError, match="not an index directory.*imgsim index build"):
        read_index_manifest(tmp_path)


def test_errors_carry_their_http_status() -> None:
    assert NotFound("x").status == 404 and BadInput("x").status == 422
    assert UnreadableImage("too_large").status == 413 and UnreadableImage("not_an_image").status == 415
    assert UnreadableImage("corrupt").status == 422
    with pytest.raises(ValueError, match="unknown reason"):
        UnreadableImage("sideways")
