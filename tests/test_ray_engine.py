"""`imgsim index build --engine ray` on a real two-node Ray cluster started on this machine.

The head and a second worker node are separate `ray start` processes (as on two machines,
but sharing this disk, the shared storage the README asks for). Skipped only when Ray is
not installed (`pip install -e .[cluster]`).
"""

from __future__ import annotations

import os
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[cluster]'")

from indexer.build import Engine, build_index  # noqa: E402
from indexer.store import IndexStore  # noqa: E402
from models.errors import ImgsimError  # noqa: E402
from models.settings import Settings, get_settings  # noqa: E402
from models.train import TrainOptions, train  # noqa: E402
from tests.ray_cluster import free_port  # noqa: E402
from tests.test_train import make_colour_dataset  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Settings]:
    """(model, images, settings): a one-epoch simple-cnn and 66 real PNG files."""
    root = tmp_path_factory.mktemp("ray")
    data = make_colour_dataset(root / "data", per_class=20, test_per_class=2)
    settings = get_settings().model_copy(update={"cache_dir": root / "cache"})
    opts = TrainOptions(backbone="simple-cnn", data=str(data), out=root / "model", input_size=16, epochs=1,
                        batch_size=16, val_fraction=0.2, seed=1)  # fmt: skip
    train(opts, settings, progress=False)
    return opts.out, data, settings


def _vectors(index_dir: Path) -> dict[str, np.ndarray]:
    with closing(IndexStore.open(index_dir)) as store:
        ids, vectors = store.live_vectors()
        keys = [k for _, k in store.labels_and_keys(ids)]
    return dict(zip(keys, vectors, strict=False))


def test_ray_build_matches_the_local_engine_and_uses_both_nodes(ray_cluster: str, tiny: tuple, tmp_path: Path) -> None:
    model, data, settings = tiny
    local = build_index(model, str(data), tmp_path / "local", settings=settings, use_cache=False, progress=False)
    # Batches of 2: 30 hand-outs, so that the second actor gets work even when decoded blocks
    # arrive one at a time and the first actor is idle again at most of them (seen: 60 / 0).
    report = build_index(model, str(data), tmp_path / "ray", settings=settings, progress=False, batch_size=2,
                         engine=Engine("ray", ray_cluster, actors=2, cpus_per_actor=1.5))  # fmt: skip
    assert report.count == local.count == 60  # train + val of 3 classes x 20
    assert len(report.nodes) == 2, report.nodes  # node id -> (images decoded, images embedded) there
    assert all(decoded > 0 and embedded > 0 for decoded, embedded in report.nodes.values()), report.nodes
    a, b = _vectors(tmp_path / "local"), _vectors(tmp_path / "ray")
    assert a.keys() == b.keys()
    cos = np.array([a[k] @ b[k] / (np.linalg.norm(a[k]) * np.linalg.norm(b[k])) for k in a])
    assert cos.min() >= 0.9999
    assert not list((tmp_path / ".ray.imgsim").glob("shards-*"))  # the shards are cleaned up


def test_a_killed_actor_is_retried_and_every_image_counted_once(ray_cluster: str, tiny: tuple, tmp_path: Path) -> None:
    from indexer.ray_engine import EmbedActor, embed_on_ray
    from models.data import open_dataset

    model, data, _ = tiny
    marker = tmp_path / "killed"

    class DiesOnce(EmbedActor):  # defined here, so Ray ships it by value to the workers
        def __call__(self, batch: dict) -> dict:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL)  # the first call anywhere, once
            except FileExistsError:
                return super().__call__(batch)
            os.close(fd)
            os._exit(1)  # the process dies mid-run, as on a lost machine

    dataset = open_dataset(str(data))
    items = dataset.select(["train", "val"])
    keys, vectors, skipped, nodes = embed_on_ray(str(model), dataset, items, 16, shards=tmp_path / "shards",
                                                 address=ray_cluster, actors=2, cpus_per_actor=1.5, progress=False,
                                                 actor_class=DiesOnce)  # fmt: skip
    assert marker.exists()  # an actor really died
    assert sorted(keys) == sorted(i.key for i in items) and len(vectors) == len(items) and skipped.total == 0


def test_an_address_that_does_not_answer_fails_fast_and_writes_nothing(tiny: tuple, tmp_path: Path) -> None:
    model, data, settings = tiny
    start = time.monotonic()
    with pytest.raises(ImgsimError, match=r"no Ray cluster answers at 127\.0\.0\.1:\d+"):
        build_index(model, str(data), tmp_path / "idx", settings=settings, progress=False,
                    engine=Engine("ray", f"127.0.0.1:{free_port()}"))  # fmt: skip
    assert time.monotonic() - start < 10
    assert not (tmp_path / "idx").exists() and not (tmp_path / ".idx.imgsim").exists()
