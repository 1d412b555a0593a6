"""`imgsim evaluate` (retrieval quality of an index) and `imgsim evaluate-ensemble`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.cli import options


def evaluate(args: argparse.Namespace) -> int:
    from indexer.evaluate import evaluate, format_summary, plot_queries

    result, raw = evaluate(
        args.model,
        args.index,
        args.data,
        args.split,
        batch_size=args.batch_size,
        use_cache=not args.no_cache,
        progress=not args.quiet,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_per_class=args.max_per_class,
        labels=args.labels,
    )
    print(format_summary(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot_queries(raw, args.index, args.plot, n=args.plot_queries, seed=args.plot_seed)
        print(f"plot of {args.plot_queries} queries -> {args.plot}")
    return 0


def evaluate_ensemble(args: argparse.Namespace) -> int:
    from models.ensemble import evaluate_ensemble

    res = evaluate_ensemble(args.model, args.data, args.split, progress=not args.quiet)
    width = max(len(m["name"]) for m in res["members"]) + 2
    print(f"{'model':<{width}}{'backbone':<12}accuracy  ({res['count']} {args.split} images)")
    for m in res["members"]:
        print(f"{m['name']:<{width}}{m['backbone']:<12}{m['accuracy']:.4f}")
    print(f"{'majority vote':<{width}}{'':<12}{res['ensemble_accuracy']:.4f}")
    print(f"{'soft vote':<{width}}{'':<12}{res['soft_vote_accuracy']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if args.report:
        write_vote_reports(res, args.report)
    return 0


def write_vote_reports(res: dict, out: Path) -> None:
    """Per-class tables and confusion matrices of the hard and the soft vote."""
    import numpy as np

    from models.report import confusion_matrix, format_report, per_class_report, plot_confusion

    out.mkdir(parents=True, exist_ok=True)
    names, labels = res["class_names"], np.array(res["labels"])
    for vote in ("hard", "soft"):
        predictions = np.array(res[f"{vote}_predictions"])
        cm = confusion_matrix(labels, predictions, len(names))
        accuracy = float((predictions == labels).mean())
        (out / f"{vote}-vote-report.txt").write_text(format_report(per_class_report(cm, names), accuracy) + "\n")
        plot_confusion(cm, names, out / f"{vote}-vote-confusion.png", f"{vote} vote of {len(res['members'])} models")
        print(f"{vote} vote: {out / f'{vote}-vote-report.txt'}, {out / f'{vote}-vote-confusion.png'}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        parents=[*options.model_over_data(), options.json_out(), options.quiet()],
        help="retrieval quality of an index on a query split",
        description="Query every image of a split against the index: precision@1/5/10, mAP@5, "
        "top-5 kNN accuracy and the classifier's accuracy, per class too (docs/retrieval.md).",
    )
    p.add_argument("--index", type=Path, required=True, help="INDEX_DIR built from that model")
    p.add_argument("--split", default="test", help="query split (default %(default)s)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of random queries and their top-5 results")
    p.add_argument("--plot-queries", type=options.positive_int, default=6, help="queries in the plot")
    p.add_argument("--plot-seed", type=int, default=0, help="seed for picking plot queries")
    p.set_defaults(func=evaluate)

    p = sub.add_parser(
        "evaluate-ensemble",
        parents=[options.json_out(), options.quiet()],
        help="hard (majority) and soft votes of several trained models on a split",
        description="Each model predicts the split; the ensemble takes the most-voted class "
        "(ties: highest summed probability). Prints each member's accuracy next to the ensemble's.",
    )
    p.add_argument("--model", type=Path, action="append", required=True, help="MODEL_DIR (repeat, at least 2)")
    p.add_argument("--data", required=True, help="dataset spec (as for train)")
    p.add_argument("--split", default="test", help="split to evaluate (default %(default)s)")
    p.add_argument(
        "--report", type=Path, default=None, metavar="DIR", help="per-class tables and confusion matrices of both votes"
    )
    p.set_defaults(func=evaluate_ensemble)
