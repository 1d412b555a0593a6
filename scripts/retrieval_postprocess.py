"""Does re-weighting the embeddings after training raise precision@5? (docs/results.md)

Embeds the test queries and the indexed train + val images with a trained model (from the
training feature cache when it applies, as `imgsim evaluate` does), then measures
precision@5 with exact cosine search for classic post-processing of retrieval
embeddings: mean-centering, PCA whitening, database-side augmentation (DBA) and
average query expansion (AQE), each against the plain L2-normalised embeddings that
`imgsim index` stores; and flip test-time augmentation (`imgsim index build --tta flip`) on the
indexed side only, the query side only, and both.

    .venv/bin/python scripts/retrieval_postprocess.py --model runs/resnet50-cifar10
"""

from __future__ import annotations

import argparse
from pathlib import Path

import faiss
import numpy as np

from indexer.build import embed_split
from indexer.faiss_index import l2_normalise
from models.data import open_dataset
from models.embedder import Embedder
from models.inference import load_trained
from models.settings import get_settings


def precision_at_5(queries: np.ndarray, base: np.ndarray, q_labels: np.ndarray, b_labels: np.ndarray) -> float:
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), 5)
    return float((b_labels[ids] == q_labels[:, None]).mean())


def neighbour_mean(vectors: np.ndarray, ids: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Sum of each row's top-k neighbours weighted by cosine^3 (DBA / alpha-QE weighting)."""
    return (vectors[ids[:, :k]] * np.maximum(scores[:, :k], 0)[..., None] ** 3).sum(axis=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="MODEL_DIR")
    p.add_argument("--data", default="../shared/data/cifar10-jpg.tar.gz")
    args = p.parse_args()
    settings = get_settings()
    trained = load_trained(args.model)
    t = trained.manifest["training"]
    dataset = open_dataset(
        args.data, val_fraction=t["val_fraction"], seed=t["seed"], max_per_class=t["max_per_class"], settings=settings
    )
    embedder = Embedder(trained)
    _, qy, qe, _, _, _ = embed_split(embedder, dataset, dataset.select("test"), 64, settings, True, False)
    indexed = dataset.select("train") + dataset.select("val")
    _, by, be, _, _, _ = embed_split(embedder, dataset, indexed, 64, settings, True, False)
    q, b = l2_normalise(qe), l2_normalise(be)

    results = {"plain (as indexed)": precision_at_5(q, b, qy, by)}
    mu = be.mean(axis=0)
    results["mean-centred"] = precision_at_5(l2_normalise(qe - mu), l2_normalise(be - mu), qy, by)
    eigval, eigvec = np.linalg.eigh(np.cov((be - mu).T))
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    for dim in (64, 256):
        proj = eigvec[:, :dim] / np.sqrt(eigval[:dim] + 1e-6)
        results[f"PCA-whitened to {dim}"] = precision_at_5(
            l2_normalise((qe - mu) @ proj), l2_normalise((be - mu) @ proj), qy, by
        )
    index = faiss.IndexFlatIP(b.shape[1])
    index.add(b.astype(np.float32))
    b_scores, b_ids = index.search(b.astype(np.float32), 5)
    results["DBA k=3"] = precision_at_5(q, l2_normalise(neighbour_mean(b, b_ids, b_scores, 3)), qy, by)
    q_scores, q_ids = index.search(q.astype(np.float32), 10)
    for k in (3, 10):
        results[f"AQE k={k}"] = precision_at_5(l2_normalise(q + neighbour_mean(b, q_ids, q_scores, k)), b, qy, by)
    # Flip TTA: the same embeddings with each image's mirror image added (as `--tta flip`).
    _, _, qt, _, _, _ = embed_split(embedder, dataset, dataset.select("test"), 64, settings, True, True, "flip")
    _, _, bt, _, _, _ = embed_split(embedder, dataset, indexed, 64, settings, True, True, "flip")
    qt, bt = l2_normalise(qt), l2_normalise(bt)
    results["flip TTA, indexed side"] = precision_at_5(q, bt, qy, by)
    results["flip TTA, query side"] = precision_at_5(qt, b, qy, by)
    results["flip TTA, both sides"] = precision_at_5(qt, bt, qy, by)
    print(f"{trained.name}: precision@5 of {len(q)} test queries against {len(b)} indexed images")
    for name, value in results.items():
        print(f"  {name:22s} {value:.4f}")


if __name__ == "__main__":
    main()
