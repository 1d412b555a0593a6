"""`imgsim train`: transfer learning (backbone + 1024-d embedding head)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.cli import options
from models.errors import ImgsimError
from models.settings import get_settings


def run(args: argparse.Namespace) -> int:
    from models.train import TrainOptions, train

    s = get_settings()
    if args.labels == "none":
        raise ImgsimError("training needs labels: give a folder of class folders, or index with --model resnet50")
    fields = {k: v for k, v in vars(args).items() if k in TrainOptions.__dataclass_fields__}
    fields["val_fraction"] = s.val_fraction if args.val_fraction is None else args.val_fraction
    fields["seed"] = s.seed if args.seed is None else args.seed
    opts = TrainOptions(**fields)
    result = train(opts, progress=not args.quiet)
    for line in result.messages:
        print(line, file=sys.stderr)
    m, t = result.manifest.metrics, result.manifest.training
    assert m is not None and t is not None, "train() writes both"  # for the type checker
    depth = "from scratch" if opts.backbone == "simple-cnn" else opts.trainable
    test = (
        f"test accuracy {m.test_accuracy:.4f} on {m.test_count} images"
        if m.test_accuracy is not None
        else "no test split"
    )
    resumed = f", resumed after epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else ""
    print(
        f"trained {opts.backbone} ({depth}, {opts.input_size} px): best epoch {m.best_epoch}/{m.epochs_run}, "
        f"val accuracy {m.val_accuracy:.4f}, {test}; wall {t.wall_seconds:.0f} s "
        f"(features {t.extract_seconds:.0f} s, fit {t.fit_seconds:.0f} s{resumed}) -> {opts.out}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from models.architecture import BACKBONES, TRAINABLE_CHOICES

    p = sub.add_parser(
        "train",
        parents=[options.data(), options.input_size(), options.batch_size(64), options.quiet()],
        help="transfer-learn a classifier (backbone + 1024-d embedding head)",
        description="Fine-tune an ImageNet backbone (or train the simple CNN baseline) on a labelled "
        "dataset. The frozen part runs once per image and is cached on disk; training is resumable "
        "(rerun the same command after an interruption).",
    )
    p.add_argument("--backbone", choices=BACKBONES, required=True)
    p.add_argument("--out", type=Path, required=True, help="MODEL_DIR to create")
    p.add_argument(
        "--trainable",
        choices=TRAINABLE_CHOICES,
        default="frozen",
        help="frozen: only the new head learns; last-block: also the backbone's last block (default %(default)s)",
    )
    p.add_argument("--epochs", type=options.positive_int, default=10, help="maximum epochs (default %(default)s)")
    p.add_argument("--patience", type=options.positive_int, default=3, help="early-stopping patience on val loss")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate (default %(default)s)")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout before the classifier (default %(default)s)")
    p.add_argument("--flip", action="store_true", help="horizontal-flip augmentation (one more extraction pass)")
    p.add_argument(
        "--shift",
        type=int,
        default=0,
        metavar="CELLS",
        help="random translation of the cached feature map by up to CELLS cells (last-block only; "
        "1 cell = 16 input px for resnet50 and vgg16; default %(default)s)",
    )
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant", help="learning-rate schedule")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing, e.g. 0.1 (default: none)")
    p.add_argument(
        "--mixed-precision",
        action="store_true",
        help="fit in bfloat16 (faster on CPUs with AVX512-BF16); the saved model stays float32",
    )
    p.add_argument("--test-data", default=None, help="separate dataset to evaluate on when --data has no test split")
    p.add_argument("--tensorboard", type=Path, default=None, help="write TensorBoard logs to this folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing MODEL_DIR / discard an interrupted run")
    p.set_defaults(func=run)
