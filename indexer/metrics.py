"""Retrieval metrics over a query set (pure functions on label arrays).

For a query with label y and retrieved labels r_1..r_k (best first), rel_i = [r_i == y]:

* precision@k = (1/k) * sum_{i<=k} rel_i
* AP@k        = (1/min(k, R)) * sum_{i<=k} precision@i * rel_i, with R the number of indexed
                items sharing the query's label (so a perfect top-k scores 1 even when R < k)
* mAP@k       = mean of AP@k over queries
* kNN accuracy: the most frequent label among the top k (ties: the larger summed score)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def relevance(retrieved_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """(Q, k) booleans: is the i-th result of the same class as its query."""
    return retrieved_labels == np.asarray(query_labels)[:, None]


def precision_at_k(rel: np.ndarray, k: int) -> np.ndarray:
    return rel[:, :k].sum(axis=1) / k  # fewer than k results (a tiny index): the missing ones are misses


def average_precision_at_k(rel: np.ndarray, k: int, n_relevant: np.ndarray) -> np.ndarray:
    r = rel[:, :k].astype(np.float64)
    precision_at_i = np.cumsum(r, axis=1) / np.arange(1, r.shape[1] + 1)
    denom = np.minimum(k, np.maximum(np.asarray(n_relevant), 1))
    return (precision_at_i * r).sum(axis=1) / denom


def knn_vote(retrieved_labels: np.ndarray, scores: np.ndarray, n_classes: int, k: int = 5) -> np.ndarray:
    """Majority label of the top k; ties go to the label with the larger summed score."""
    labels = retrieved_labels[:, :k]
    s = scores[:, :k].astype(np.float64)
    votes = np.zeros((labels.shape[0], n_classes))
    weight = np.zeros_like(votes)
    valid = labels >= 0
    rows = np.repeat(np.arange(labels.shape[0])[:, None], labels.shape[1], axis=1)
    np.add.at(votes, (rows[valid], labels[valid]), 1.0)
    np.add.at(weight, (rows[valid], labels[valid]), s[valid])
    # Scores are cosines in [-1, 1]; scaled below 1 they only break ties between equal vote counts.
    return np.argmax(votes + (weight + k) / (4.0 * k + 1.0), axis=1)


def per_class(values: dict[str, np.ndarray], query_labels: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """Mean of each per-query metric within each true class."""
    rows = []
    for c, name in enumerate(class_names):
        mask = query_labels == c
        row: dict[str, float | int | str] = {"class": name, "n_queries": int(mask.sum())}
        for key, v in values.items():
            row[key] = round(float(v[mask].mean()), 4) if mask.any() else float("nan")
        rows.append(row)
    return rows
