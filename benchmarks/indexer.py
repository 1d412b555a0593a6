"""(3) The indexer: `imgsim index` speed, full-model path and cached-feature path.

* full-model path: ``build_index(..., use_cache=False)`` over a documented subset of
  CIFAR-10 train+val (``--max-per-class N`` source images per class from the train
  folder, of which the model's val fraction becomes val); every image is read from the
  archive, decoded (2 background threads) and run through the whole model in batches of
  ``--batch-size``. Reported: images/s of the embedding phase (what `imgsim index`
  prints) and of the whole build (listing, embedding, FAISS, SQLite with image bytes).
* cached-feature path: ``build_index(..., use_cache=True)`` on the model's own training
  subset, when its feature cache exists in IMGSIM_CACHE_DIR: only the layers above the
  frozen cut run. Skipped (with the reason) when there is no matching cache, because it
  would silently fall back to a full-model run over the whole training set.

Indexes go to a temporary folder that is deleted afterwards.

    python -m benchmarks.indexer --model runs/resnet50-cifar10 --max-per-class 500
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_DATA, log, quiet_tensorflow, read_manifest, write_json


def cache_status(model_dir: Path, data: str) -> str | None:
    """None when the cached-feature path will be taken for ``data``, else why not."""
    from models.data import open_dataset
    from models.features import load_cache
    from models.settings import get_settings

    m = read_manifest(model_dir)
    if not m.get("feature_cache"):
        return "the model records no feature cache (trained with trainable layers below the cut?)"
    t = m["training"]
    settings = get_settings()
    cache = load_cache(settings.cache_dir / "features" / m["feature_cache"])
    if cache is None:
        return f"feature cache {m['feature_cache']} is not in {settings.cache_dir / 'features'}"
    dataset = open_dataset(data, val_fraction=t["val_fraction"], seed=t["seed"], max_per_class=t["max_per_class"])
    if dataset.fingerprint != m["dataset"]["fingerprint"]:
        return f"{data} is not the dataset the model was trained on (fingerprint differs)"
    missing = [s for s in ("train", "val") if s in dataset.splits() and s not in cache]
    if missing:
        return f"the cache lacks split(s) {', '.join(missing)}"
    return None


def run_build(model_dir: Path, data: str, *, use_cache: bool, max_per_class: int | None, batch_size: int) -> dict:
    from indexer.build import build_index

    with tempfile.TemporaryDirectory(prefix="imgsim-bench-index-") as tmp:
        t0 = time.perf_counter()
        report = build_index(
            model_dir,
            data,
            Path(tmp) / "index",
            use_cache=use_cache,
            max_per_class=max_per_class,
            batch_size=batch_size,
            progress=False,
        )
        wall = time.perf_counter() - t0
    return {
        "path_taken": report.path_taken,
        "count": report.count,
        "unreadable": report.skipped.total,
        "embed_seconds": round(report.embed_seconds, 3),
        "embed_images_per_s": round(report.images_per_second, 2),
        "build_seconds": round(report.seconds, 3),
        "wall_seconds": round(wall, 3),
        "wall_images_per_s": round(report.count / wall, 2) if wall > 0 else None,
    }


def bench_indexer(model_dir: Path, data: str, *, max_per_class: int, batch_size: int, cached: bool) -> dict[str, Any]:
    m = read_manifest(model_dir)
    out: dict[str, Any] = {
        "model_dir": str(model_dir),
        "name": m.get("name") or model_dir.name,
        "backbone": m["backbone"],
        "input_size": m["input_size"],
        "batch_size": batch_size,
        "data": data,
        "subset": f"--max-per-class {max_per_class}: {max_per_class} train images per class, "
        f"split into train/val as in training (val fraction {m['training']['val_fraction']})",
    }
    log(f"{model_dir}: full-model index build over {max_per_class} images/class, batch {batch_size}")
    full = run_build(model_dir, data, use_cache=False, max_per_class=max_per_class, batch_size=batch_size)
    out["full_model"] = full
    log(
        f"  full model: {full['count']} images, embedding {full['embed_seconds']:.1f} s = "
        f"{full['embed_images_per_s']:.1f} img/s; whole build {full['wall_seconds']:.1f} s"
    )
    if not cached:
        out["cached_features"] = {"not_run": "--no-cached"}
        return out
    why_not = cache_status(model_dir, data)
    if why_not:
        out["cached_features"] = {"not_run": why_not}
        log(f"  cached path skipped: {why_not}")
        return out
    cached_run = run_build(model_dir, data, use_cache=True, max_per_class=None, batch_size=batch_size)
    cached_run["subset"] = "the model's training subset (train + val)"
    out["cached_features"] = cached_run
    log(
        f"  cached features: {cached_run['count']} images, head {cached_run['embed_seconds']:.1f} s; "
        f"whole build {cached_run['wall_seconds']:.1f} s ({cached_run['path_taken']})"
    )
    return out


def build_parser() -> argparse.ArgumentParser:
    from models.settings import get_settings

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.indexer",
        description="Index-build speed: the full-model path (every image decoded and embedded) over a "
        "CIFAR-10 subset, and the cached-feature path over the model's training set.",
    )
    p.add_argument("--model", type=Path, action="append", required=True, help="MODEL_DIR (repeatable)")
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 JPEG archive (default %(default)s)")
    p.add_argument(
        "--max-per-class",
        type=int,
        default=500,
        help="train images per class for the full-model path (default %(default)s = 5,000 images)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=get_settings().batch_size,
        help="inference batch, as `imgsim index build --batch-size` (default %(default)s)",
    )
    p.add_argument("--no-cached", action="store_true", help="skip the cached-feature run")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="10 images per class (smoke run)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_tensorflow()
    if args.quick:
        args.max_per_class = min(args.max_per_class, 10)
    results = [
        bench_indexer(
            model_dir,
            args.data,
            max_per_class=args.max_per_class,
            batch_size=args.batch_size,
            cached=not args.no_cached,
        )
        for model_dir in args.model
    ]
    write_json(args.json, {"kind": "indexer", "models": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
