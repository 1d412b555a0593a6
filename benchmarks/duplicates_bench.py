"""Near-duplicates: precision and recall of `imgsim duplicates` against perceptual hashing.

The set: ``--originals`` CIFAR-10 test photos (real photographs, 32 x 32) and ``--copies``
near-duplicates of randomly chosen ones, each made by one of: resizing (down to 60-90 %
and back up), JPEG recompression (quality 30-60), cropping up to 10 % of each side, or a
brightness change of 15-30 %. A true pair is two images from the same original. Each
method's predicted pairs are all pairs within one of its groups:

* embeddings: `find_duplicates` at its default threshold (and at ``--thresholds``), with
  and without the hash check, on an index of the set built with ``--model`` (default
  ImageNet ResNet50 at 128 px, no training);
* pHash (``imagehash.phash``, 64 bits): pairs at Hamming distance <= ``--phash-distance``.

Then the time to group all pairs of a 50,000-item index (1024-d vectors, clustered, with
1 % near-duplicates).

    python -m benchmarks.duplicates_bench
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from benchmarks.common import DEFAULT_DATA, load_jpegs, log, write_json

EDITS = ("resize", "recompress", "crop", "brightness")


def near_copy(img: Image.Image, edit: str, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    if edit == "resize":
        f = rng.uniform(0.6, 0.9)
        return img.resize((max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.BILINEAR).resize((w, h))
    if edit == "recompress":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(30, 61)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if edit == "crop":
        dx, dy = int(w * rng.uniform(0, 0.1)), int(h * rng.uniform(0, 0.1))
        return img.crop((dx, dy, w - int(w * rng.uniform(0, 0.1)), h - int(h * rng.uniform(0, 0.1))))
    return ImageEnhance.Brightness(img).enhance(rng.choice([-1, 1]) * rng.uniform(0.15, 0.3) + 1)


def make_set(folder: Path, originals: int, copies: int, data: str, seed: int = 0) -> dict[str, int]:
    """Write the images; their file name -> the original they come from."""
    rng = np.random.default_rng(seed)
    source_of = {}
    jpegs = load_jpegs("cifar", originals, data, seed=seed)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for _, b in jpegs]
    for i, img in enumerate(images):
        img.save(folder / f"o{i:04d}.png")
        source_of[f"o{i:04d}.png"] = i
    for j in range(copies):
        i = int(rng.integers(0, len(images)))
        edit = EDITS[j % len(EDITS)]
        near_copy(images[i], edit, rng).save(folder / f"c{j:04d}-{edit}.png")
        source_of[f"c{j:04d}-{edit}.png"] = i
    return source_of


def pairs_of(groups: list[list[str]]) -> set[tuple[str, str]]:
    return {tuple(sorted(p)) for g in groups for p in itertools.combinations(g, 2)}


def score(predicted: set, truth: set) -> dict[str, float]:
    hits = len(predicted & truth)
    return {"pairs": len(predicted), "precision": round(hits / max(1, len(predicted)), 4),
            "recall": round(hits / max(1, len(truth)), 4)}  # fmt: skip


def false_pair_sheet(folder: Path, groups: list[list[str]], truth: set, out: Path) -> int:
    """A PNG with one row per group that holds a false pair (its first 8 images), to judge them by eye."""
    bad = [g for g in groups if not pairs_of([g]) <= truth]
    sheet = Image.new("RGB", (8 * 70, 70 * max(1, len(bad))), "white")
    for row, group in enumerate(bad):
        for col, name in enumerate(sorted(group)[:8]):
            sheet.paste(Image.open(folder / name).resize((64, 64)), (col * 70, row * 70))
    sheet.save(out)
    return len(bad)


def phash_groups(folder: Path, names: list[str], distance: int) -> list[list[str]]:
    import imagehash

    hashes = {n: imagehash.phash(Image.open(folder / n)) for n in names}
    parent = {n: n for n in names}

    def find(x: str) -> str:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in itertools.combinations(names, 2):
        if hashes[a] - hashes[b] <= distance:
            parent[find(a)] = find(b)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(find(n), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def time_50k() -> float:
    """Seconds to group every near-duplicate pair of 50,000 vectors, in the default mode (the
    range search down to the hash check's floor; these synthetic items have no images to hash,
    the time to hash one is measured on the real set)."""
    from indexer.duplicates import find_duplicates
    from indexer.faiss_index import l2_normalise
    from models.errors import Gone

    rng = np.random.default_rng(1)
    centres = l2_normalise(rng.standard_normal((1000, 1024), dtype=np.float32))
    x = l2_normalise(
        centres[rng.integers(0, 1000, 50_000)] + rng.standard_normal((50_000, 1024), dtype=np.float32) * 0.03
    )
    x[:500] = l2_normalise(x[500:1000] + rng.standard_normal((500, 1024), dtype=np.float32) * 0.003)
    ids = np.arange(50_000, dtype=np.int64)

    class Store:  # what find_duplicates reads
        def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
            return ids, x

        def labels_and_keys(self, ids: list[int]) -> list[tuple[None, str]]:
            return [(None, str(i)) for i in ids]

        def image_bytes(self, item_id: int) -> None:
            raise Gone("synthetic vectors have no images")

    store = Store()
    t0 = time.perf_counter()
    groups = find_duplicates(store, hash_check=True)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    log(f"50,000 items: {len(groups)} groups in {seconds:.1f} s")
    return round(seconds, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.duplicates_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--originals", type=int, default=1000)
    p.add_argument("--copies", type=int, default=200)
    p.add_argument("--model", default="resnet50:128", help="backbone name or MODEL_DIR (default %(default)s)")
    p.add_argument("--phash-distance", type=int, default=8, help="pHash Hamming distance (default %(default)s)")
    p.add_argument(
        "--thresholds",
        default="0.8,0.85,0.9,0.95",
        help="thresholds to try besides the default, with and without the hash check",
    )
    p.add_argument("--seed", type=int, default=0, help="which originals and edits (default %(default)s)")
    p.add_argument("--false-pairs", type=Path, default=None, help="PNG of the default mode's groups with a false pair")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from indexer.build import build_index
    from indexer.duplicates import DEFAULT_THRESHOLD, find_duplicates
    from indexer.store import IndexStore

    with tempfile.TemporaryDirectory(prefix="imgsim-dupes-") as tmp:
        folder = Path(tmp) / "set"
        folder.mkdir()
        source_of = make_set(folder, args.originals, args.copies, args.data, args.seed)
        by_source: dict[int, list[str]] = {}
        for name, i in source_of.items():
            by_source.setdefault(i, []).append(name)
        truth = pairs_of([g for g in by_source.values() if len(g) > 1])
        build_index(Path(args.model), str(folder), Path(tmp) / "index", labels="none", progress=False)
        store = IndexStore.open(Path(tmp) / "index")
        result = {
            "set": {"originals": args.originals, "copies": args.copies, "seed": args.seed, "true_pairs": len(truth)}
        }
        for threshold in sorted({DEFAULT_THRESHOLD, *map(float, args.thresholds.split(","))}):
            groups = [g.keys for g in find_duplicates(store, threshold)]
            result[f"embedding@{threshold}"] = score(pairs_of(groups), truth)
            log(f"embeddings, cosine >= {threshold}: {result[f'embedding@{threshold}']}")
        t0, hashes = time.perf_counter(), {}
        groups = [g.keys for g in find_duplicates(store, DEFAULT_THRESHOLD, hash_check=True, hash_cache=hashes)]
        result["hash_check_seconds"], result["hashed_images"] = round(time.perf_counter() - t0, 2), len(hashes)
        if args.false_pairs:
            n = false_pair_sheet(folder, groups, truth, args.false_pairs)
            log(f"{n} groups with a false pair (default mode) -> {args.false_pairs}")
        result[f"hash_check@{DEFAULT_THRESHOLD}"] = score(pairs_of(groups), truth)
        log(f"embeddings + hash check: {result[f'hash_check@{DEFAULT_THRESHOLD}']} in {result['hash_check_seconds']} s")
        for threshold in sorted(set(map(float, args.thresholds.split(","))) - {DEFAULT_THRESHOLD}):
            groups = [g.keys for g in find_duplicates(store, threshold, hash_check=True, hash_cache=hashes)]
            result[f"hash_check@{threshold}"] = score(pairs_of(groups), truth)
            log(f"embeddings + hash check, threshold {threshold}: {result[f'hash_check@{threshold}']}")
        store.close()
        groups = phash_groups(folder, sorted(source_of), args.phash_distance)
        result[f"phash@{args.phash_distance}"] = score(pairs_of(groups), truth)
        log(f"pHash, distance <= {args.phash_distance}: {result[f'phash@{args.phash_distance}']}")
    result["seconds_50k"] = time_50k()
    write_json(args.json, {"kind": "duplicates", "model": args.model, "default_threshold": DEFAULT_THRESHOLD, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
