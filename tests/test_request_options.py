"""Upload routes take their options as form fields or query parameters, never silently ignored."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.test_service import assert_error, noisy, png, upload

BLUE = (30, 60, 220)


@pytest.fixture(scope="module")
def client(make_service_app: Callable[..., Any]) -> Iterator[TestClient]:
    with TestClient(make_service_app(names=("a", "b"), reload_seconds=0)) as c:
        yield c


def test_search_options_as_query_parameters(client: TestClient) -> None:
    """Was: `curl -F file=@x 'host/v1/search?k=10'` returned 5 results, ?label= was ignored."""
    r = client.post("/v1/search", params={"k": 10}, files=upload(png()))
    assert r.status_code == 200 and len(r.json()["results"]) == 10, r.text
    blue = client.post("/v1/search", params={"k": 4, "label": "red"}, files=upload(png(noisy(BLUE))))
    assert {n["label"] for n in blue.json()["results"]} == {"red"}
    everything = client.post("/v1/search", params={"k": 30}, files=upload(png())).json()["results"]
    cut = sorted(n["score"] for n in everything)[15]
    some = client.post("/v1/search", params={"k": 30, "min_score": cut}, files=upload(png())).json()["results"]
    assert len(some) < 30 and all(n["score"] >= cut for n in some)
    assert client.post("/v1/search", params={"model": "b"}, files=upload(png())).json()["model"] == "b"


def test_the_same_option_twice_must_agree(client: TestClient) -> None:
    assert_error(client.post("/v1/search", params={"k": 10}, data={"k": "5"}, files=upload(png())), 422, "k is given")
    same = client.post("/v1/search", params={"k": 7}, data={"k": "7"}, files=upload(png()))
    assert same.status_code == 200 and len(same.json()["results"]) == 7
    r = client.post("/v1/classify", params={"model": "a"}, data={"model": "b"}, files=upload(png()))
    assert_error(r, 422, "model is given")


@pytest.mark.parametrize("path", ["/v1/search", "/v1/analyze", "/v1/classify", "/v1/embed"])
def test_unknown_fields_and_parameters_are_named(client: TestClient, path: str) -> None:
    assert_error(
        client.post(path, params={"kk": 3}, files=upload(png())), 422, "unknown field 'kk'", "this route takes"
    )
    r = client.post(path, data={"colour": "red"}, files=upload(png()))
    assert_error(r, 422, "unknown field 'colour'")
    assert client.post(path, params={"model": "a"}, files=upload(png())).status_code == 200


def test_embed_only_routes_never_search_and_a_filter_searches_once(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: every batch searched (embed and add too), and a label filter threw that search away
    and ran a second one."""
    from indexer.store import IndexStore

    searches: list[int] = []
    real = IndexStore.search
    monkeypatch.setattr(
        IndexStore, "search", lambda self, v, k, params=None: searches.append(len(v)) or real(self, v, k, params)
    )
    assert client.post("/v1/embed", files=upload(png())).status_code == 200
    assert searches == []
    r = client.post("/v1/search", data={"label": "red", "k": "3"}, files=upload(png(noisy(BLUE))))
    assert r.status_code == 200 and {n["label"] for n in r.json()["results"]} == {"red"}
    assert searches == [1]  # one FAISS search, restricted to the label
    searches.clear()
    from indexer.query import SearchSpec, search_batch

    store = client.app.state.registry.models["a"].store
    vectors = np.random.default_rng(0).normal(size=(4, store.index.d)).astype(np.float32)
    specs = [SearchSpec(3), SearchSpec(5, min_score=0.0), SearchSpec(2, label="red"), SearchSpec(4, label="red")]
    hits = search_batch(store, vectors, specs)
    assert searches == [2, 2]  # a batch's queries: one FAISS search per label, not one per query
    assert [len(h) <= s.k for h, s in zip(hits, specs, strict=True)] == [True] * 4
    assert {store.label_names([x.id for x in hits[3]])[0]} == {"red"}
