"""Embedding on a Ray cluster: `imgsim index build --engine ray [--ray-address ADDR]`.

The item list is cut into blocks of a Ray Dataset. Decoding runs in Ray tasks (any node,
one CPU each); the model runs in a pool of actors, each loading it once, with TensorFlow's
threads set to the CPUs Ray gave the actor. The driver collects the vectors (4 KB per image)
into shard files under the output's hidden folder and the index is built from the shards,
as the local engine builds it from memory. Ray retries the tasks of a worker that dies and
restarts dead actors; the shards are then checked to hold every readable item exactly once.

Ray is an optional extra (`pip install -e .[cluster]`); the local engine never imports it.
Images (and the model) must be readable at the same path on every node: shared storage.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.data import Dataset, Item, SkipCounter
from models.errors import ImgsimError

CONNECT_TIMEOUT = 5.0  # seconds to wait for a Ray address to answer before giving up
ACTOR_START_TIMEOUT = 600  # seconds for the pool's actors to load the model
BLOCK_ITEMS = 256  # items per block: small enough to spread over nodes, big enough for batches
DECODE_CPUS = 0.5  # a decoding task's share of a CPU: decoding is lighter than the model


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImgsimError("--engine ray needs Ray: pip install -e '.[cluster]' (or pip install 'ray[data]')") from None
    return ray


def connect(address: str | None, cpus: int | None = None) -> Any:
    """Join the cluster at ``address`` (host:port, 'auto', or None: a local Ray on this machine).

    An address that does not answer fails within CONNECT_TIMEOUT with a clear error; Ray's own
    connection retries would keep the user waiting for a minute or more.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address and address not in ("auto", "local") and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port or 6379)), timeout=CONNECT_TIMEOUT).close()
        except (OSError, ValueError) as exc:
            raise ImgsimError(
                f"no Ray cluster answers at {address} ({exc}); start one with `ray start --head`"
            ) from None
    try:
        ray.init(address=address, num_cpus=cpus if not address else None, log_to_driver=False,
                 include_dashboard=False, ignore_reinit_error=True)  # fmt: skip
    except (ConnectionError, RuntimeError) as exc:
        raise ImgsimError(f"cannot join the Ray cluster at {address or 'a new local instance'}: {exc}") from None
    return ray


def _decode_block(batch: dict[str, np.ndarray], reader: Any, size: int) -> dict[str, np.ndarray]:
    """Ray task: read and decode a block of items; unreadable ones keep a zero image and a reason.

    ``reader`` is the dataset's payload reader (a folder's root, an archive's member offsets):
    small, so it travels with the task instead of every node listing the collection again.
    """
    import ray

    from models.embed import decoded_batches

    items = [
        Item(str(k), int(lab), str(s)) for k, lab, s in zip(batch["key"], batch["label"], batch["split"], strict=False)
    ]
    skipped = SkipCounter()
    good: dict[str, np.ndarray] = {}
    for got, images in decoded_batches(reader, items, size, len(items) or 1, skipped, workers=1):
        good.update(zip((i.key for i in got), images, strict=False))
    reasons = {i.key: why for i, why in skipped.skipped}
    blank = np.zeros((size, size, 3), np.uint8)
    return {
        **batch,
        "image": np.stack([good.get(i.key, blank) for i in items]) if items else np.zeros((0, size, size, 3), np.uint8),
        "reason": np.array([reasons.get(i.key, "") for i in items], dtype=object),
        "decoded_on": np.array([ray.get_runtime_context().get_node_id()] * len(items), dtype=object),
    }


class EmbedActor:
    """Ray actor: the model, loaded once; TensorFlow limited to the actor's CPUs."""

    def __init__(self, model: str, runtime: str, tta: str, cpus: float) -> None:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(max(1, round(cpus)))
        tf.config.threading.set_inter_op_parallelism_threads(1)
        import ray

        from models.encoders import open_encoder

        self.embedder = open_encoder(model, runtime=runtime)
        self.tta = tta
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["reason"] == ""
        n = len(batch["key"])
        vectors = np.zeros((n, self.embedder.manifest.embedding_dim), np.float32)
        if ok.any():
            vectors[ok] = self.embedder.embed(batch["image"][ok], self.tta)[0]
        out = {k: v for k, v in batch.items() if k != "image"}
        return {**out, "vector": vectors, "node": np.array([self.node] * n, dtype=object)}


def embed_on_ray(
    model: str,
    dataset: Dataset,
    items: Sequence[Item],
    input_size: int,
    *,
    shards: Path,
    address: str | None = None,
    runtime: str = "tf",
    tta: str = "none",
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    batch_size: int = 32,
    progress: bool = True,
    actor_class: type = EmbedActor,
) -> tuple[list[str], np.ndarray, SkipCounter, dict[str, tuple[int, int]]]:
    """(keys, vectors, skipped, per node id: images decoded and embedded there) of ``items``,
    in the items' order.

    Leaves Ray disconnected, so that one process can run several builds on several clusters.
    """
    ray = connect(address)
    try:
        return _run(ray, model, dataset, items, input_size, shards, runtime, tta, actors, cpus_per_actor, batch_size,
                    progress, actor_class)  # fmt: skip
    finally:
        ray.shutdown()


def _run(
    ray: Any,
    model: str,
    dataset: Dataset,
    items: Sequence[Item],
    input_size: int,
    shards: Path,
    runtime: str,
    tta: str,
    actors: int | None,
    cpus_per_actor: float,
    batch_size: int,
    progress: bool,
    actor_class: type,
) -> tuple[list[str], np.ndarray, SkipCounter, dict[str, tuple[int, int]]]:
    actors = actors or max(1, int(ray.cluster_resources().get("CPU", 1) // (cpus_per_actor + 1)))
    # A dataset keeps a copy of the context current when it is made: set it first.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT  # every model loaded before work is handed out
    if not progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ds = ray.data.from_items(
        [{"key": i.key, "label": i.label, "split": i.split} for i in items],
        override_num_blocks=max(1, min(len(items), 4 * actors), len(items) // BLOCK_ITEMS),  # work for every actor
    )
    ds = ds.map_batches(_decode_block, fn_kwargs={"reader": dataset.reader, "size": input_size},
                        batch_size=None, num_cpus=DECODE_CPUS)  # fmt: skip
    ds = ds.map_batches(
        actor_class,
        fn_constructor_kwargs={"model": model, "runtime": runtime, "tta": tta, "cpus": cpus_per_actor},
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        num_cpus=cpus_per_actor,
        scheduling_strategy="SPREAD",  # one model per node before two on one
    )
    return _collect(ds, items, shards)


def _collect(
    ds: Any, items: Sequence[Item], shards: Path
) -> tuple[list[str], np.ndarray, SkipCounter, dict[str, tuple[int, int]]]:
    """Write the results as shards, then read them back checked: every item exactly once."""
    shards.mkdir(parents=True, exist_ok=True)
    for n, batch in enumerate(ds.iter_batches(batch_size=4096, batch_format="numpy")):
        arrays = {k: np.asarray(v, dtype=str if v.dtype == object else None) for k, v in batch.items()}
        np.savez(shards / f"shard-{n:06d}.npz", **arrays)  # type: ignore[arg-type]  # stub: **arrays vs allow_pickle
    keys: list[str] = []
    vectors, reasons, decoded_on, embedded_on = [], [], [], []
    for path in sorted(shards.glob("shard-*.npz")):
        with np.load(path) as z:
            keys += z["key"].tolist()
            vectors.append(z["vector"])
            reasons += z["reason"].tolist()
            decoded_on += z["decoded_on"].tolist()
            embedded_on += z["node"].tolist()
    _check_exactly_once(keys, items)
    by_key = {i.key: i for i in items}
    order = {i.key: n for n, i in enumerate(items)}
    rank = sorted(range(len(keys)), key=lambda j: order[keys[j]])
    kept = [j for j in rank if not reasons[j]]
    skipped = SkipCounter()
    for j in rank:
        if reasons[j]:
            skipped.add(by_key[keys[j]], reasons[j])
    work: dict[str, tuple[int, int]] = {}
    for node in set(decoded_on) | set(embedded_on):
        work[node] = (decoded_on.count(node), sum(embedded_on[j] == node for j in kept))
    all_vectors = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
    return [keys[j] for j in kept], all_vectors[kept], skipped, work


def _check_exactly_once(keys: list[str], items: Sequence[Item]) -> None:
    wanted = {i.key for i in items}
    seen = set(keys)
    if len(keys) != len(seen) or seen != wanted:
        extra, missing = len(keys) - len(seen), len(wanted - seen)
        raise ImgsimError(
            f"the Ray run returned {extra} items twice and lost {missing}: nothing was written; run again"
        )
