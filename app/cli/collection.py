"""`imgsim duplicates` and `imgsim export`: what is in an index, taken out of it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.cli import options
from models.errors import BadInput


def duplicates(args: argparse.Namespace) -> int:
    from indexer.duplicates import HASH_FLOOR, find_duplicates, write_contact_sheet
    from indexer.store import IndexStore

    if not -1.0 <= args.threshold <= 1.0:
        raise BadInput(f"--threshold is a cosine, -1..1; got {args.threshold}")
    store = IndexStore.open(args.index)
    try:
        groups = find_duplicates(store, args.threshold, hash_check=args.hash_check, progress=not args.quiet)
        report = [{"ids": g.ids, "keys": g.keys, "pairs": g.pairs} for g in groups]
        if args.json:
            head = {"threshold": args.threshold, "hash_check": args.hash_check}
            args.json.write_text(json.dumps({**head, "groups": report}, indent=1))
        if args.out:
            write_contact_sheet(store, groups, args.out)
    finally:
        store.close()
    n = sum(len(g.ids) for g in groups)
    rule = f"cosine >= {args.threshold}" + (
        f", or >= {HASH_FLOOR} with matching image hashes" if args.hash_check else ""
    )
    print(f"{len(groups)} groups of near-duplicates ({n} images) at {rule}"
          + (f" -> {args.out}" if args.out else ""))  # fmt: skip
    return 0


def export(args: argparse.Namespace) -> int:
    from indexer.export import export_index

    n = export_index(args.index, args.out)
    print(f"exported {n} items (vectors and rows) -> {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from indexer.duplicates import DEFAULT_THRESHOLD, HASH_BITS, HASH_FLOOR

    p = sub.add_parser(
        "duplicates",
        help="find groups of near-duplicate images in an index",
        parents=[options.quiet()],
        description="Every pair of items whose cosine is at least --threshold (an exact range search over the "
        f"stored vectors), and, with --hash-check, pairs down to a cosine of {HASH_FLOOR} whose perceptual "
        "hashes agree; "
        "grouped by connected components: resized, recompressed, lightly cropped or brightened copies. "
        "Writes a JSON report and an HTML contact sheet.",
    )
    p.add_argument("--index", type=Path, required=True, help="INDEX_DIR")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="cosine (default %(default)s)")
    p.add_argument(
        "--hash-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also pair images with a cosine of at least {HASH_FLOOR} whose perceptual hashes (pHash) differ in at "
        f"most {HASH_BITS} of 64 bits; reads those images once (default: on)",
    )
    p.add_argument("--out", type=Path, default=None, help="HTML contact sheet of the groups")
    p.add_argument("--json", type=Path, default=None, help="the groups as JSON")
    p.set_defaults(func=duplicates)

    p = sub.add_parser(
        "export",
        help="all vectors and item rows of an index, to .npz",
        description="Write every item's id, vector (L2-normalised), key, source, label, sha256, size and "
        "metadata to a NumPy .npz file (numpy.load(FILE) reads it back).",
    )
    p.add_argument("--index", type=Path, required=True, help="INDEX_DIR")
    p.add_argument("--out", type=Path, required=True, help="output file (.npz)")
    p.set_defaults(func=export)
