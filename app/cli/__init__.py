"""``imgsim``: one subcommand per pipeline stage, one module per subcommand.

weights -> embed -> train -> index build|add|remove -> evaluate -> serve. Heavy imports
(TensorFlow) happen inside the subcommands so ``--help`` is instant. Errors meant for
users (:class:`models.errors.ImgsimError`) print as one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

# Quiet TensorFlow's C++ start-up chatter before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pydantic import ValidationError

from app.cli import collection, embed, evaluate, index, serve, train, weights
from models.errors import Busy, ImgsimError
from models.settings import get_settings

STAGES = (weights, embed, train, index, evaluate, collection, serve)
EXIT_BUSY = 75  # EX_TEMPFAIL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgsim",
        description="Image similarity search: ImageNet backbones, fine-tuning, FAISS index, web service.",
        epilog="Settings come from IMGSIM_* environment variables (docs/settings.md).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        stage.register(sub)
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
    args = build_parser().parse_args(argv)
    if getattr(args, "runtime", None):  # an option that mirrors a setting overrides it, in every layer
        os.environ["IMGSIM_RUNTIME"] = args.runtime
        get_settings.cache_clear()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    func: Callable[[argparse.Namespace], int] = args.func
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    try:
        return func(args)
    except Busy as exc:  # another writer has the index: a cron job can simply try again
        print(f"imgsim {command}: busy: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except ImgsimError as exc:
        print(f"imgsim {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"imgsim {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
