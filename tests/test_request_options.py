"""Upload routes take their options as form fields or query parameters, never silently ignored."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

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
