"""Options shared by several subcommands, each declared once (argparse parent parsers)."""

from __future__ import annotations

import argparse
from pathlib import Path

from models.settings import get_settings


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def quiet() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def data(required: bool = True) -> argparse.ArgumentParser:
    """The dataset and how it is split; unset split options mean the settings' (or, for an
    index or an evaluation, the model's own) values."""
    s = get_settings()
    p = _parent()
    p.add_argument(
        "--data",
        required=required,
        help="dataset: class-folder tree, .tar.gz of one, 'fashion-mnist[:DIR]' or 'keras:cifar10' (needs internet)",
    )
    p.add_argument("--max-per-class", type=positive_int, default=None, help="cap images per class and split")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help=f"validation share carved from train when there is no val/ (default {s.val_fraction}; "
        "index and evaluate: the model's)",
    )
    p.add_argument("--seed", type=int, default=None, help=f"seed for splits and sampling (default {s.seed})")
    p.add_argument(
        "--labels",
        choices=("auto", "folders", "none"),
        default="auto",
        help="folders: class folders give the labels; none: any tree, unlabelled, keyed by relative path; "
        "auto (default): folders when the tree looks like class folders",
    )
    return p


def batch_size(default: int | None = None) -> argparse.ArgumentParser:
    p = _parent()
    default = default or get_settings().batch_size
    p.add_argument("--batch-size", type=positive_int, default=default, help="batch size (default %(default)s)")
    return p


def input_size() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument(
        "--input-size",
        type=positive_int,
        default=get_settings().input_size,
        help="square input size in px (default %(default)s)",
    )
    return p


def no_cache() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--no-cache", action="store_true", help="run the full model even when cached features exist")
    return p


def model_help() -> str:
    """What --model takes: every registered encoder kind says it (models/encoders)."""
    from models.encoders import spec_help

    return f"the image encoder: {spec_help()}"


def model_dir(help_text: str | None = None) -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--model", type=Path, required=True, help=help_text or model_help())
    return p


def json_out() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    return p


def runtime() -> argparse.ArgumentParser:
    """``--runtime``: sets IMGSIM_RUNTIME for this run (applied in ``app.cli.main``)."""
    from models.runtimes import DESCRIPTIONS, RUNTIME_CHOICES

    p = _parent()
    p.add_argument(
        "--runtime",
        choices=RUNTIME_CHOICES,
        default=None,
        help=f"inference runtime (default IMGSIM_RUNTIME or {get_settings().runtime}): "
        + "; ".join(f"{n}: {DESCRIPTIONS[n]}" for n in RUNTIME_CHOICES),
    )
    return p


def model_over_data() -> list[argparse.ArgumentParser]:
    """The options of a command that runs a model over a dataset (index build, evaluate)."""
    return [model_dir(), data(), batch_size(), no_cache(), runtime()]
