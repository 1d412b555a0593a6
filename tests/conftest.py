"""Shared fixtures: two tiny trained models with their indexes, and a factory for service apps."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

# Tests run TensorFlow fp32 unless they name another runtime (tests/test_runtimes.py): the
# automatic choice would convert every tiny test model to int8 on a CPU that has VNNI.
os.environ.setdefault("IMGSIM_RUNTIME", "tf")

import pytest

from tests.ray_cluster import ray_cluster  # noqa: F401 - the session's Ray cluster, for the Ray tests
from tests.test_train import make_colour_dataset

SERVICE_IMAGE_SIZE = 40  # dataset images are 40x40, so ?size=16 really shrinks them


@pytest.fixture(scope="session")
def service_pairs(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """Two simple-cnn models (seeds 1 and 2, one epoch, 32 px) and a flat index for each: ``a`` and ``b``.

    No ImageNet weights are involved; feature caches go to a private folder.
    """
    from app.config import ModelPair
    from indexer.build import build_index
    from models.settings import get_settings
    from models.train import TrainOptions, train

    root = tmp_path_factory.mktemp("service")
    data = make_colour_dataset(root / "colours", per_class=10, test_per_class=3, size=SERVICE_IMAGE_SIZE)
    settings = get_settings().model_copy(update={"cache_dir": root / "cache"})
    pairs = []
    for name, seed in (("a", 1), ("b", 2)):
        opts = TrainOptions(
            backbone="simple-cnn",
            data=str(data),
            out=root / f"model-{name}",
            input_size=32,
            epochs=1,
            batch_size=8,
            val_fraction=0.2,
            seed=seed,
        )
        train(opts, settings, progress=False)
        build_index(opts.out, str(data), root / f"index-{name}", settings=settings, progress=False)
        pairs.append(ModelPair(model=opts.out, index=root / f"index-{name}", name=name))
    return pairs


@pytest.fixture(scope="session")
def make_service_app(service_pairs: list[Any]) -> Callable[..., Any]:
    """``make_service_app(names=("a", "b"), **settings)`` -> a FastAPI app (lifespan not started yet)."""
    from app.config import ServiceSettings
    from app.main import create_app

    def make(names: tuple[str, ...] = ("a", "b"), **overrides: Any) -> Any:
        pairs = [p for n in names for p in service_pairs if p.name == n]
        return create_app(ServiceSettings(models=pairs, **overrides))

    return make
