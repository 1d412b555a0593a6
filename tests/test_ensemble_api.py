"""model=ensemble in /v1/classify: each member answers once, then the hard and soft votes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.ensemble import vote
from tests.test_service import RED, assert_error, noisy, png, upload


def test_soft_vote_is_the_mean_and_neighbours_pool() -> None:
    names = ["blue", "green", "red"]
    probs = [np.array([0.6, 0.0, 0.4]), np.array([0.0, 0.45, 0.55]), np.array([0.1, 0.5, 0.4])]
    pooled = (["red", "green", "red", "blue"], [0.5, 0.9, 0.4, 0.8])
    p = vote(names, probs, pooled, names)
    assert p.label == "red" and p.probability == pytest.approx(0.45)  # hard vote would be a tie
    assert [c.label for c in p.top] == ["red", "green", "blue"]
    assert p.neighbour_vote == "red"  # two votes
    tie = (["green", "red", "red", "green", None], [0.9, 0.5, 0.45, 0.2, 0.99])
    assert vote(names, probs, tie, names).neighbour_vote == "green"  # 2-2: the larger summed cosine (1.1 > 0.95)


def test_the_service_and_evaluate_share_the_neighbour_vote() -> None:
    """A 2-2 tie whose nearest neighbour is red goes to green (summed cosine), as evaluate scores it."""
    from app.uploads import neighbour_vote
    from indexer.metrics import knn_vote

    names = ["blue", "green", "red"]
    labels, scores = ["red", "green", "green", "red", "blue"], [0.95, 0.9, 0.85, 0.3, 0.2]
    ids = np.array([[names.index(n) for n in labels]])
    assert neighbour_vote((labels, scores), names) == names[int(knn_vote(ids, np.array([scores]), 3, 5)[0])] == "green"
    assert neighbour_vote(([None, None], [0.9, 0.8]), names) is None


def test_classify_with_the_ensemble(make_service_app: Callable[..., Any]) -> None:
    with TestClient(make_service_app(names=("a", "b"))) as c:
        single = {m: c.post("/v1/classify", files=upload(png(noisy(RED))), data={"model": m}).json() for m in "ab"}
        r = c.post("/v1/classify?model=ensemble", files=upload(png(noisy(RED))))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "ensemble"
        members = {m["model"]: m for m in body["ensemble"]["members"]}
        assert set(members) == {"a", "b"}
        for name, answer in single.items():  # each member answers as it does alone
            assert members[name]["label"] == answer["prediction"]["label"]
            assert members[name]["probability"] == pytest.approx(answer["prediction"]["probability"], abs=1e-5)
        mean = {}
        for answer in single.values():
            for t in answer["prediction"]["top"]:
                mean[t["label"]] = mean.get(t["label"], 0.0) + t["probability"] / 2
        assert body["prediction"]["label"] == max(mean, key=mean.get) == body["ensemble"]["soft_vote"]
        assert body["ensemble"]["hard_vote"] in mean
        assert c.get("/v1/models").json()["ensemble"] == ["a", "b"]
        # The form field works too; search cannot use the ensemble.
        assert c.post("/v1/classify", files=upload(png()), data={"model": "ensemble"}).status_code == 200
        assert_error(c.post("/v1/search", files=upload(png()), data={"model": "ensemble"}), 404, "only classifies")


def test_an_ensemble_needs_two_classifiers(make_service_app: Callable[..., Any]) -> None:
    with TestClient(make_service_app(names=("a",))) as c:
        assert_error(c.post("/v1/classify?model=ensemble", files=upload(png())), 409, "two or more")
        assert c.get("/v1/models").json()["ensemble"] == []
    with TestClient(make_service_app(names=("a", "b"), ensemble=["a", "nope"])) as c:
        assert_error(c.post("/v1/classify?model=ensemble", files=upload(png())), 404, "unknown model")
