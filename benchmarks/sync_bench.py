"""A sync with nothing to do, on a large tree: is it stat-only, and how long does it take?

Makes a synthetic folder of ``--files`` small files (100 per sub-folder), an index that
already holds all of them (random vectors, each row with its file's size and time, as a
build records them), then times ``imgsim index sync`` as a user runs it (a new process:
imports, listing, comparison). The model is never loaded: there is nothing to embed.

    python -m benchmarks.sync_bench --files 100000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import log, write_json

DIM = 8


def make_tree(root: Path, n: int) -> None:
    for i in range(n):
        folder = root / f"{i // 10000:02d}" / f"{i // 100 % 100:02d}"
        if i % 100 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(b"%06d" % i)


def make_index(root: Path, out: Path) -> None:
    """An index of every file of ``root``, as `imgsim index build` would record it."""
    from indexer.faiss_index import new_faiss_index
    from indexer.items_table import create_items_db, insert_items
    from indexer.store import write_index_files
    from indexer.versions import new_version
    from models.data import open_dataset
    from models.manifests import IndexDataset, IndexManifest, ModelIdentity

    ds = open_dataset(root, labels="none")
    vectors = np.random.default_rng(0).standard_normal((len(ds.items), DIM)).astype(np.float32)
    index = new_faiss_index(DIM, "flat", {}, vectors)
    index.add_with_ids(vectors, np.arange(len(ds.items), dtype=np.int64))
    spec = str(root.resolve())
    rows = [(i, it.key, spec, -1, None, "train", f"{i:064x}", None, None, None, *ds.file_stats[it.key], None)
            for i, it in enumerate(ds.items)]  # fmt: skip
    identity = ModelIdentity(name="synthetic", path="synthetic", backbone="none", model_sha256="-",
                             embedding_layer="none", embedding_dim=DIM, input_size=32)  # fmt: skip
    manifest = IndexManifest(
        model=identity, embedding_layer="none", embedding_dim=DIM, count=len(rows), next_id=len(rows),
        dataset=IndexDataset(spec=spec, kind="folder", fingerprint=ds.fingerprint, splits=["train"], class_names=[],
                             images_stored=False, labels="none"),
        index_type="flat", faiss_index="IndexFlatIP", embedding_path="synthetic",
    )  # fmt: skip
    with new_version(out) as tmp:
        db = create_items_db(tmp / "items.sqlite")
        insert_items(db, rows)
        db.commit()
        db.close()
        write_index_files(tmp, index, manifest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sync_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=100_000, help="files in the tree (default %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="imgsim-sync-bench-") as tmp:
        root, index = Path(tmp) / "photos", Path(tmp) / "index"
        t0 = time.perf_counter()
        make_tree(root, args.files)
        make_index(root, index)
        log(f"tree of {args.files:,} files and its index made in {time.perf_counter() - t0:.0f} s")
        exe = Path(sys.executable).parent / "imgsim"
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            done = subprocess.run([str(exe), "index", "sync", "--index", str(index)], capture_output=True, text=True,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, check=True)  # fmt: skip
            runs.append(round(time.perf_counter() - t0, 2))
            log(f"imgsim index sync: {runs[-1]} s: {done.stdout.strip()}")
        assert f"unchanged {args.files}" in done.stdout, done.stdout
    write_json(args.json, {"kind": "sync", "files": args.files, "seconds": runs, "output": done.stdout.strip()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
