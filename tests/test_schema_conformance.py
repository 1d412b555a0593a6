"""The OpenAPI schema against the real app: schemathesis generates valid and invalid requests for
every operation, and every answer must be a non-5xx that the schema documents (status, headers, body).
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest

from tests.test_service import noisy, png

schemathesis = pytest.importorskip("schemathesis")
# after the importorskip: without schemathesis the module is skipped, not an import error
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

KEY = "secret"
EXAMPLES = 60  # per operation and generation mode: about 20 operations -> about 1,500 requests


@pytest.fixture(scope="module")
def api_schema(service_pairs: list[Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Model ``a`` over a private index copy (generated requests add and delete items), no API key."""
    from app.config import ModelPair, ServiceSettings
    from app.main import create_app

    index = tmp_path_factory.mktemp("schema") / "index"
    shutil.copytree(service_pairs[0].index, index)
    pair = ModelPair(model=service_pairs[0].model, index=index, name="a")
    app = create_app(ServiceSettings(models=[pair], reload_seconds=0, api_key=KEY))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def valid_request(case: Any) -> None:
    """What a schema cannot say: a valid request's files are images, its meta is a JSON object, its
    label one of the index's classes, an option not sent twice (form and query) with two values, its key right. (An empty file part the schema itself refuses:
    minLength 1, so a 422 for it is expected, not a rejected valid request, ST202.)"""
    if isinstance(case.body, dict) and isinstance(case.body.get("file"), list):
        case.body["file"] = [png(noisy(seed=i)) for i in range(len(case.body["file"]))]
    if isinstance(case.body, dict) and "meta" in case.body:
        case.body["meta"] = '{"album": "tests"}'
    if isinstance(case.body, dict) and "label" in case.body:
        case.body["label"] = "red"
    for where in (case.body, case.query):  # options may come as query parameters too
        if isinstance(where, dict) and "label" in where:
            where["label"] = "red"
        if isinstance(where, dict) and "meta" in where:
            where["meta"] = '{"album": "tests"}'
    if isinstance(case.body, dict) and case.query:  # an option as a form field and a query parameter must agree
        for name in [n for n in case.query if n in case.body]:
            del case.query[name]
    if case.headers and "X-API-Key" in case.headers:
        case.headers["X-API-Key"] = KEY


def exercise(operation: Any, mode: GenerationMode, sent: list[int]) -> None:
    """EXAMPLES generated requests to one operation; raises what schemathesis found."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
    )
    def run(case: Any) -> None:
        sent.append(1)
        if mode is GenerationMode.POSITIVE:
            valid_request(case)
        case.call_and_validate()

    run()


def test_every_answer_matches_the_schema(api_schema: Any) -> None:
    failures: dict[str, str] = {}
    sent: list[int] = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:
            try:
                exercise(operation, mode, sent)
            except Unsatisfiable:  # no parameters, no body: nothing to make invalid
                assert mode is GenerationMode.NEGATIVE, operation.label
            except BaseException as exc:  # noqa: BLE001 - hypothesis raises groups; report every operation together
                failures[f"{operation.label} [{mode}]"] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    print(f"schemathesis: {len(sent)} requests, no failures")
    assert len(sent) >= 1000, len(sent)
