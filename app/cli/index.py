"""`imgsim index build|add|remove`: the FAISS index of a trained model's embeddings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from app.cli import options

HNSW_PARAMS = ("hnsw_m", "ef_construction", "ef_search")
IVF_PARAMS = ("nlist", "nprobe")
IVFPQ_PARAMS = ("nlist", "nprobe", "pq_m", "rerank")


def _params(args: argparse.Namespace) -> dict[str, int]:
    """The index knobs given on the command line (unset ones: the defaults or the plan's)."""
    family = "hnsw" if (args.index_type or "").startswith("hnsw") else args.index_type  # hnsw-fp16: same graph
    keep = {"hnsw": HNSW_PARAMS, "ivf": IVF_PARAMS, "ivfpq": IVFPQ_PARAMS}.get(family or "", ())
    return {k: getattr(args, k) for k in keep if getattr(args, k) is not None}


def build(args: argparse.Namespace) -> int:
    from indexer.build import Engine, build_index
    from indexer.index_plan import parse_bytes

    report = build_index(
        args.model,
        args.data,
        args.out,
        index_type=args.index_type,
        params=_params(args),
        max_index_memory=parse_bytes(args.max_index_memory) if args.max_index_memory else None,
        engine=Engine(args.engine, args.ray_address, args.actors, args.cpus_per_actor),
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_per_class=args.max_per_class,
        batch_size=args.batch_size,
        use_cache=not args.no_cache,
        tta=args.tta,
        labels=args.labels,
        progress=not args.quiet,
    )
    if report.skipped.total:
        print(report.skipped.summary(), file=sys.stderr)
    how = (
        "reused the training feature cache (only the layers above the frozen cut ran)"
        if report.path_taken == "cached-features"
        else f"ran the full model over every image on runtime {report.runtime}"
    )
    print(
        f"indexed {report.count} images ({report.index_type}) in {report.seconds:.1f} s; embedding "
        f"{report.embed_seconds:.1f} s = {report.images_per_second:.1f} img/s; {how} -> {args.out}"
    )
    for note in report.notes:
        print(f"  flip TTA, {note}")
    for node, (decoded, embedded) in sorted(report.nodes.items()):
        print(f"  Ray node {node[:12]}: decoded {decoded} images, embedded {embedded}")
    return 0


def add(args: argparse.Namespace) -> int:
    from indexer.update import add_images

    r = add_images(args.index, args.paths, label=args.label, progress=not args.quiet, lock_timeout=args.wait)
    print(
        f"added {r.added} images, skipped {r.duplicates} duplicates and {r.skipped} unreadable; "
        f"index now holds {r.count}"
    )
    return 0


def remove(args: argparse.Namespace) -> int:
    from indexer.update import remove_ids

    r = remove_ids(args.index, args.ids, lock_timeout=args.wait)
    print(f"removed {len(r.removed)} items; index now holds {r.count}")
    return 0


def sync(args: argparse.Namespace) -> int:
    from indexer.sync import sync_index

    report = sync_index(args.index, args.data, progress=not args.quiet, lock_timeout=args.wait)
    if not args.quiet:
        print(report.summary())
    return 0


def _index_dir() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--index", type=Path, required=True, help="INDEX_DIR")
    p.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS", help="wait for another writer (default: refuse at once)"
    )
    return p


def _register_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        parents=[*options.model_over_data(), options.quiet()],
        help="build a FAISS cosine index of a folder of images",
        description="Embed a folder of images (any tree; of a labelled dataset, its train and validation "
        "images) with a trained model's embedding layer or a backbone's ImageNet features, L2-normalise, "
        "and write INDEX_DIR (FAISS inner-product index, SQLite item table, manifest) atomically. "
        "Example: imgsim index build --model resnet50 --data ~/photos --out ~/photos-index",
    )
    p.add_argument("--out", type=Path, required=True, help="INDEX_DIR to create or replace")
    p.add_argument(
        "--index-type",
        choices=("flat", "hnsw", "hnsw-fp16", "ivf", "ivfpq"),
        default=None,
        help="flat: exact (the default without --max-index-memory); hnsw / ivf: approximate, for large "
        "collections; hnsw-fp16: HNSW with vectors stored as float16 (half the memory); ivfpq: compressed "
        "(IVF-PQ codes in RAM, exact float16 vectors on disk for re-ranking), for 10M-100M images",
    )
    p.add_argument(
        "--max-index-memory",
        default=None,
        metavar="SIZE",
        help="RAM the index may use, e.g. 500M or 4G: picks HNSW if it fits, else ivfpq with the longest "
        "codes that fit (autofaiss' rules); refused, naming the smallest that works, if nothing fits",
    )
    p.add_argument("--hnsw-m", type=options.positive_int, default=None, help="HNSW links per node (default 32)")
    p.add_argument("--ef-construction", type=options.positive_int, default=None, help="HNSW build depth (80)")
    p.add_argument("--ef-search", type=options.positive_int, default=None, help="HNSW search depth (64)")
    p.add_argument(
        "--nlist", type=options.positive_int, default=None, help="IVF lists (ivf: 256; ivfpq: about sqrt(n))"
    )
    p.add_argument(
        "--nprobe", type=options.positive_int, default=None, help="IVF lists probed per query (ivf 16; ivfpq 64)"
    )
    p.add_argument("--pq-m", type=options.positive_int, default=None, help="ivfpq: code bytes per vector (64)")
    p.add_argument(
        "--rerank", type=int, default=None, help="ivfpq: re-rank k x this many candidates exactly (40; 0: off)"
    )
    _engine_options(p)
    p.add_argument(
        "--tta",
        choices=("none", "flip"),
        default="none",
        help="test-time augmentation: 'flip' embeds each image plus its mirror image (about +1 point of "
        "precision@5 on CIFAR-10; every query then costs two forward passes). Default %(default)s",
    )
    p.set_defaults(func=build)


def _engine_options(p: argparse.ArgumentParser) -> None:
    """Where a build embeds its images: here, or on a Ray cluster."""
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="where images are embedded: local (this process, default) or ray (a Ray cluster; "
        "pip install -e '.[cluster]'; images and model on storage every node reads at the same path)",
    )
    p.add_argument(
        "--ray-address", default=None, help="Ray cluster address, host:port or 'auto' (default: a local Ray)"
    )
    p.add_argument(
        "--actors",
        type=options.positive_int,
        default=None,
        help="Ray: model actors (default: CPUs / (cpus per actor + 1))",
    )
    p.add_argument(
        "--cpus-per-actor", type=float, default=1.0, help="Ray: CPUs each model actor reserves (default %(default)s)"
    )


def _register_add(sub: argparse._SubParsersAction, name: str, **kwargs: Any) -> None:
    p = sub.add_parser(
        name,
        parents=[_index_dir(), options.runtime(), options.quiet()],
        description="Embed image files (or folders of them) and append them to INDEX_DIR; files whose "
        "bytes are already indexed are skipped. Ids of existing items never change.",
        **kwargs,
    )
    p.add_argument("--label", default=None, help="class name to record for the new images (default: unknown)")
    p.add_argument("paths", type=Path, nargs="+", help="image files or folders")
    p.set_defaults(func=add)


def _register_remove(sub: argparse._SubParsersAction, name: str, **kwargs: Any) -> None:
    p = sub.add_parser(
        name, parents=[_index_dir()], description="Remove items from INDEX_DIR by id. Other ids never change.", **kwargs
    )
    p.add_argument("ids", type=int, nargs="+", help="item ids")
    p.set_defaults(func=remove)


def _register_sync(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sync",
        parents=[_index_dir(), options.runtime(), options.quiet()],
        help="bring an index in step with its folder",
        description="Rescan the folder the index was built from (or --data DIR): embed new files, drop "
        "vanished ones, re-embed changed ones (size and time first, then the content hash). Unchanged items "
        "keep their ids; a sync with nothing to do reads no image. Interrupted, it changes nothing; rerun it. "
        "Exit codes: 0 done, 2 error (one line on stderr), 75 another process is changing the index "
        "(try again later). For cron: imgsim index sync --index DIR --quiet",
    )
    p.add_argument("--data", default=None, help="the folder (default: the one recorded in the index)")
    p.set_defaults(func=sync)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="build or change a FAISS index: index build | add | remove",
        description="The FAISS index of a trained model's embeddings.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    _register_build(actions)
    _register_add(actions, "add", help="embed and append image files")
    _register_remove(actions, "remove", help="remove items by id")
    _register_sync(actions)
    # The old spellings `imgsim index-add` and `imgsim index-remove`, kept as aliases.
    _register_add(sub, "index-add", help="alias of `imgsim index add`")
    _register_remove(sub, "index-remove", help="alias of `imgsim index remove`")
