"""(3) The indexer: `imgsim index build` speed, full-model path and cached-feature path.

* full model (``use_cache=False``): every image of a CIFAR-10 subset (``--max-per-class``,
  default 500 -> 5,000 train images, split into train/val as in training) is decoded and
  run through the whole network, at ``--batch-size``. Reported: images/s of the embedding
  phase (what `imgsim index build` prints), and of the whole build.
* per runtime (``--runtime bf16 --runtime int8``): the full-model build again on each.
* cached features (``use_cache=True``) on the model's own training subset: only the layers
  above the frozen cut run. Reported only when the build really took that path.

    python -m benchmarks.indexer --model runs/resnet50-cifar10 --json /tmp/indexer.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_DATA, log, quiet_tensorflow, write_json


def run_build(
    model_dir: Path, data: str, *, use_cache: bool, max_per_class: int | None, batch_size: int, runtime: str = "tf"
) -> dict:
    from indexer.build import build_index
    from models.settings import get_settings

    settings = get_settings().model_copy(update={"runtime": runtime})

    with tempfile.TemporaryDirectory(prefix="imgsim-bench-index-") as tmp:
        t0 = time.perf_counter()
        r = build_index(
            model_dir, data, Path(tmp) / "i", use_cache=use_cache, max_per_class=max_per_class,
            batch_size=batch_size, progress=False, settings=settings,
        )  # fmt: skip
        wall = time.perf_counter() - t0
    return {
        "runtime": r.runtime,
        "path_taken": r.path_taken,
        "count": r.count,
        "embed_seconds": round(r.embed_seconds, 3),
        "embed_images_per_s": round(r.images_per_second, 2),
        "wall_seconds": round(wall, 3),
        "wall_images_per_s": round(r.count / wall, 2),
    }


def bench_indexer(
    model_dir: Path, data: str, max_per_class: int, batch_size: int, runtimes: list[str]
) -> dict[str, Any]:
    from models.manifests import read_model_manifest

    m = read_model_manifest(model_dir)
    log(f"{model_dir}: full-model index build over {max_per_class} images/class, batch {batch_size}")
    full = run_build(model_dir, data, use_cache=False, max_per_class=max_per_class, batch_size=batch_size)
    log(f"  full model: {full['count']} images, {full['embed_images_per_s']:.1f} img/s")
    by_runtime = {"tf": full}
    for runtime in (r for r in runtimes if r != "tf"):  # the same build on each faster runtime
        by_runtime[runtime] = run_build(
            model_dir, data, use_cache=False, max_per_class=max_per_class, batch_size=batch_size, runtime=runtime
        )
        log(f"  full model, {runtime}: {by_runtime[runtime]['embed_images_per_s']:.1f} img/s")
    cached = run_build(model_dir, data, use_cache=True, max_per_class=None, batch_size=batch_size)
    if cached["path_taken"] != "cached-features":
        cached = {"not_run": "no feature cache of the model's training run in IMGSIM_CACHE_DIR"}
    return {
        "model_dir": str(model_dir),
        "backbone": m.backbone,
        "input_size": m.input_size,
        "batch_size": batch_size,
        "subset": f"{max_per_class} train images per class, split into train/val as in training",
        "full_model": full,
        "full_model_by_runtime": by_runtime,
        "cached_features": cached,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.indexer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, action="append", required=True, help="MODEL_DIR (repeatable)")
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 JPEG archive (default %(default)s)")
    p.add_argument("--max-per-class", type=int, default=500, help="images per class, full-model path (default 500)")
    p.add_argument("--batch-size", type=int, default=32, help="as `imgsim index build --batch-size` (default 32)")
    p.add_argument("--runtime", action="append", default=[], help="also build on this runtime (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="10 images per class (smoke run)")
    args = p.parse_args(argv)
    quiet_tensorflow()
    per_class = min(args.max_per_class, 10) if args.quick else args.max_per_class
    results = [bench_indexer(m, args.data, per_class, args.batch_size, args.runtime) for m in args.model]
    write_json(args.json, {"kind": "indexer", "models": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
