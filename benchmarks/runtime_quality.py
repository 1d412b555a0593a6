"""Quality of each inference runtime against TensorFlow fp32 on the model's own test split.

For every runtime: embed the test split (queries) and the train+val splits (the indexed
collection) with that runtime, then report the test embeddings' mean cosine to fp32's,
retrieval precision@5 / mAP@5 of an exact cosine index of its own collection embeddings,
and the classifier's test accuracy. (The issue's quality bars: mean cosine >= 0.995 bf16,
>= 0.98 int8; P@5 and accuracy within 0.5 points of fp32.)

    python -m benchmarks.runtime_quality --model runs/resnet50-cifar10 \
        --data ../shared/data/cifar10-jpg.tar.gz --out docs/runtime_quality.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import faiss
import numpy as np

from indexer.embedding import embed_split
from indexer.faiss_index import l2_normalise
from indexer.metrics import average_precision_at_k, precision_at_k, relevance
from models.embedder import Embedder
from models.inference import load_trained, open_as_trained
from models.settings import get_settings


def _metrics(queries: np.ndarray, q_labels: np.ndarray, probs: np.ndarray, base: np.ndarray, b_labels: np.ndarray,
             n_classes: int) -> dict[str, float]:  # fmt: skip
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(l2_normalise(base))
    _, ids = index.search(l2_normalise(queries), 5)
    rel = relevance(b_labels[ids], q_labels)
    n_rel = np.bincount(b_labels, minlength=n_classes)[q_labels]
    return {
        "precision_at_5": round(float(precision_at_k(rel, 5).mean()), 4),
        "map_at_5": round(float(average_precision_at_k(rel, 5, n_rel).mean()), 4),
        "classifier_accuracy": round(float((probs.argmax(1) == q_labels).mean()), 4),
    }


def measure(model: str, data: str, runtimes: list[str], batch_size: int) -> dict[str, object]:
    settings = get_settings()
    trained = load_trained(model)
    dataset = open_as_trained(trained.manifest, data, settings)
    test, collection = dataset.select("test"), dataset.select(["train", "val"])
    rows: dict[str, dict[str, object]] = {}
    reference: np.ndarray | None = None
    for name in runtimes:
        embedder = Embedder(trained, runtime=name)
        if embedder.runtime != name:
            rows[name] = {"skipped": f"ran {embedder.runtime} instead (see the log)"}
            continue
        # TensorFlow may use the training feature cache (the same network, so the same vectors);
        # the other runtimes must run their own.
        cache = name == "tf"
        q = embed_split(embedder, dataset, test, batch_size, settings, cache, True)
        b = embed_split(embedder, dataset, collection, batch_size, settings, cache, True)
        row: dict[str, object] = _metrics(q.vectors, q.labels, q.probs, b.vectors, b.labels, len(dataset.class_names))
        if reference is None:
            reference = l2_normalise(q.vectors)
        cos = np.sum(l2_normalise(q.vectors) * reference, axis=1)
        row |= {"mean_cosine_to_first": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 4)}
        row["conversion_check"] = embedder.runtime_record.check.model_dump() if embedder.runtime_record else None
        rows[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "conversion_check"}), flush=True)
    return {"model": model, "input_size": trained.manifest.input_size, "test_images": len(test),
            "collection_images": len(collection), "runtimes": rows}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="MODEL_DIR trained on --data (its test split is the query set)")
    p.add_argument("--data", required=True)
    p.add_argument("--runtime", action="append", help="runtimes, the first is the reference (default tf bf16 int8)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, required=True, help="JSON file (results of several models are merged in)")
    args = p.parse_args()
    result = measure(args.model, args.data, args.runtime or ["tf", "bf16", "int8"], args.batch_size)
    merged = json.loads(args.out.read_text()) if args.out.is_file() else {}
    merged[Path(args.model).name] = result
    args.out.write_text(json.dumps(merged, indent=1) + "\n")


if __name__ == "__main__":
    main()
