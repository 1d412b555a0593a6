"""`imgsim embed`: ImageNet backbone features of a dataset split, into an .npz."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.cli import options
from app.cli.weights import BACKBONE_CHOICES
from models.errors import ImgsimError
from models.settings import get_settings


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from models.backbones import build_backbone, get_spec, make_forward
    from models.data import open_dataset
    from models.embed import embed_items, save_embeddings
    from models.embedder import Embedder
    from models.inference import load_trained

    settings = get_settings()
    spec = get_spec(args.backbone)
    dataset = open_dataset(
        args.data,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_per_class=args.max_per_class,
        labels=args.labels,
        settings=settings,
    )
    items = dataset.select(args.split)
    if not items:
        raise ImgsimError(f"no images in split(s) {args.split} of {args.data}")
    print(
        f"dataset: {dataset.kind} {args.data}: {len(items)} images in {args.split or 'all splits'}, "
        f"{len(dataset.class_names)} classes",
        file=sys.stderr,
    )
    if args.random_init:
        model, _ = build_backbone(args.backbone, args.input_size, pretrained=False, settings=settings)
        forward, runtime, weights = make_forward(model, spec.preprocessing), "tf", None
    else:  # the backbone as a model (ImageNet features), on the chosen runtime
        embedder = Embedder(load_trained(f"{args.backbone}:{args.input_size}"), settings=settings)
        runtime, weights = embedder.runtime, embedder.trained.manifest.weights
        forward = lambda batch: embedder(batch)[0]  # noqa: E731
    forward(np.zeros((1, args.input_size, args.input_size, 3), np.uint8))  # warm-up: trace once
    emb = embed_items(forward, dataset, items, args.input_size, args.batch_size, progress=not args.quiet)
    emb.meta = {
        "backbone": args.backbone,
        "input_size": args.input_size,
        "preprocessing": spec.preprocessing,
        "pooling": "avg",
        "runtime": runtime,
        "weights_sha256": weights.sha256 if weights else None,
        "weights_source": weights.source if weights else "random-init",
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        parents=[options.data(), options.input_size(), options.batch_size(), options.runtime(), options.quiet()],
        help="embed dataset images with an ImageNet backbone into an .npz",
        description="Batched backbone inference (global-average-pooled features) over a dataset "
        "split; writes float32 vectors, keys, labels and splits to an .npz and reports images/s.",
    )
    p.add_argument("--backbone", choices=BACKBONE_CHOICES, required=True)
    p.add_argument("--split", default=None, help="train, val or test (default: all)")
    p.add_argument("--random-init", action="store_true", help="random weights instead of ImageNet (a baseline)")
    p.add_argument("--out", type=Path, required=True, help="output .npz file")
    p.set_defaults(func=run)
