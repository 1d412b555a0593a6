"""Hostile input, round two: metadata, thumbnails, near-duplicates, replaced versions, paths and ids."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.test_service import assert_error, encode, noisy, png, upload

KEY = {"X-API-Key": "k"}


@pytest.fixture
def live(service_pairs: list[Any], tmp_path: Path) -> Iterator[TestClient]:
    """Model ``a`` over a private copy of its index, an API key and a private thumbnail cache."""
    from app.config import ModelPair, ServiceSettings
    from app.main import create_app

    index = tmp_path / "index"
    shutil.copytree(service_pairs[0].index, index)
    pair = ModelPair(model=service_pairs[0].model, index=index, name="a")
    settings = ServiceSettings(models=[pair], api_key="k", reload_seconds=0, cache_dir=tmp_path / "cache")
    with TestClient(create_app(settings)) as c:
        yield c


def _add(client: TestClient, data: bytes | None = None, **form: str) -> Any:
    return client.post("/v1/images", files=upload(data or png(noisy(seed=77))), data=form, headers=KEY)


def _nested(levels: int) -> str:
    return '{"a": ' * levels + "1" + "}" * levels


# ---------------------------------------------------------------- 1. metadata
@pytest.mark.parametrize(
    ("meta", "why"),
    [
        (_nested(900), "nested deeper than 8"),
        ('{"a":' + "[" * 4900 + "]" * 4900 + "}", "nested deeper than 8"),  # under the 10,000 characters
        ('{"a": "\\ud800"}', "lone surrogate"),
        ('{"a": NaN}', "finite"),
        ('{"a": [Infinity]}', "finite"),
        ('{"' + "k" * 101 + '": 1}', "longer than 100"),
    ],
)
def test_metadata_that_would_break_a_later_answer_is_refused(live: TestClient, meta: str, why: str) -> None:
    assert_error(_add(live, meta=meta), 422, why)


def test_metadata_within_the_limits_comes_back(live: TestClient) -> None:
    meta = {"album": "Rome 2024", "people": ["Ana", "Bo"], "n": {"x": {"y": 2.5}}, "ü": "✓"}
    r = _add(live, meta=json.dumps(meta))
    assert r.status_code == 200, r.text
    assert live.get(f"/v1/images/{r.json()['ids'][0]}").json()["meta"] == meta


@pytest.mark.parametrize("stored", [_nested(900), '{"a": "\\ud800"}', '{"a": NaN}', "not json"])
def test_stored_metadata_that_breaks_serialisation_is_replaced_by_a_note(live: TestClient, stored: str) -> None:
    """Items stored before the checks (or a tampered table) are still served: never a 500."""
    item = _add(live, meta='{"ok": 1}').json()["ids"][0]
    store = live.app.state.registry.models["a"].store
    with sqlite3.connect(store.path / "items.sqlite") as db:
        db.execute("UPDATE items SET meta = ? WHERE id = ?", (stored, item))
    r = live.get(f"/v1/images/{item}")
    assert r.status_code == 200, r.text
    assert r.json()["meta"]["error"].startswith("stored metadata cannot be shown")


# ---------------------------------------------------------------- 2. thumbnails
def _big_png() -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 255, (900, 1200, 3), np.uint8)), "PNG")


class DecodeSpy:
    """Counts Pillow's pixel decodes and the most that ran at once (each made to last 50 ms)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from PIL import ImageFile

        self.calls = self.running = self.most = 0
        self._lock = threading.Lock()
        real = ImageFile.ImageFile.load

        def load(img: Any) -> Any:
            if getattr(img, "_im", None) is not None:  # already decoded: no work
                return real(img)
            with self._lock:
                self.calls += 1
                self.running += 1
                self.most = max(self.most, self.running)
            try:
                time.sleep(0.05)
                return real(img)
            finally:
                with self._lock:
                    self.running -= 1

        monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_thumbnails_share_the_decode_budget_and_are_made_once(
    live: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ids = [_add(live, _big_png()).json()["ids"][0]]
    spy = DecodeSpy(monkeypatch)
    limit = live.app.state.settings.max_decodes
    results: list[int] = []

    def fetch() -> None:
        results.append(live.get(f"/v1/images/{ids[0]}/file", params={"size": 64}).status_code)

    threads = [threading.Thread(target=fetch) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 16
    assert 1 <= spy.most <= limit, spy.most  # was 16: the thumbnail route ignored IMGSIM_MAX_DECODES
    made = spy.calls
    assert list((tmp_path / "cache" / "thumbnails").rglob("*-64.png"))
    again = live.get(f"/v1/images/{ids[0]}/file", params={"size": 64})
    assert again.status_code == 200 and again.headers["content-type"] == "image/png"
    assert spy.calls == made  # a repeated request decodes nothing
    smaller = live.get(f"/v1/images/{ids[0]}/file", params={"size": 50})
    assert smaller.status_code == 200 and spy.calls == made + 1  # scaled from the cached 64 px file


# ---------------------------------------------------------------- 3. near-duplicates
def _final(client: TestClient, **params: Any) -> Any:
    """The duplicates answer once the background computation is done (polls the 202s)."""
    deadline = time.monotonic() + 120
    while (r := client.get("/v1/duplicates", params=params)).status_code == 202:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    return r


@pytest.mark.parametrize("threshold", ["-1", "0", "0.64"])
def test_a_duplicates_threshold_below_the_hash_floor_is_refused(live: TestClient, threshold: str) -> None:
    assert_error(live.get("/v1/duplicates", params={"threshold": threshold, "hash_check": "false"}), 422, "threshold")


def test_duplicates_run_in_the_background_and_answer_202_meanwhile(
    live: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.duplicate_jobs import DuplicateJobs

    release = threading.Event()
    calls: list[threading.Thread] = []
    real = DuplicateJobs._in_child

    def slow(self: Any, job: Any, *args: Any) -> Any:
        calls.append(threading.current_thread())
        job.progress("pairs", 3, 10)
        release.wait(30)
        return real(self, job, *args)  # the real computation, in a child process

    monkeypatch.setattr(DuplicateJobs, "_in_child", slow)
    start = time.monotonic()
    r = live.get("/v1/duplicates")
    assert time.monotonic() - start < 5 and r.status_code == 202, r.text
    assert r.json() == {"model": "a", "status": "pairs", "done": 3, "total": 10} and r.headers["retry-after"] == "1"
    assert calls and calls[0].name.startswith("imgsim-duplicates")  # never on a request thread
    assert live.get("/healthz").status_code == 200
    release.set()
    r = _final(live)
    assert r.status_code == 200 and "groups" in r.json(), r.text
    assert len(calls) == 1 and live.get("/v1/duplicates").status_code == 200  # cached for this version
    assert len(calls) == 1


def test_a_duplicates_error_in_the_child_process_is_the_answer(
    live: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.duplicate_jobs as jobs_module

    monkeypatch.setattr(jobs_module, "MAX_PAIRS", 0)  # passed to the child with the job
    assert_error(_final(live, threshold=0.65), 422, "more than 0 pairs")


def test_too_many_waiting_duplicate_searches_get_503(live: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.duplicate_jobs as jobs_module
    import app.routers.models as models_router

    release = threading.Event()
    monkeypatch.setattr(jobs_module.DuplicateJobs, "_in_child", lambda *a: release.wait(30) and [])
    monkeypatch.setattr(models_router, "FIRST_WAIT_SECONDS", 0)
    try:
        answers = [live.get("/v1/duplicates", params={"threshold": 0.9 + i / 100}).status_code for i in range(6)]
        assert answers[: jobs_module.MAX_WAITING] == [202] * jobs_module.MAX_WAITING
        assert set(answers[jobs_module.MAX_WAITING :]) == {503}
    finally:
        release.set()


# ---------------------------------------------------------------- 4. replaced versions
def test_a_replaced_version_is_released_after_its_requests(live: TestClient) -> None:
    loaded = live.app.state.registry.models["a"]
    old = loaded.store  # a stray reference (a stored exception, a future) no longer keeps it in memory
    assert _add(live, png(noisy(seed=5))).status_code == 200
    assert loaded.store is not old and old.index is None
    assert live.get(f"/v1/images/{loaded.store.ids()[0]}/similar").status_code == 200


def test_a_request_in_flight_keeps_its_version_until_it_ends() -> None:
    from app.memory import RequestCounter

    requests, released = RequestCounter(), []
    before = requests.enter()
    requests.retire(lambda: released.append("v1"))
    after = requests.enter()  # started after the swap: reads the new version
    assert released == []
    requests.exit(before)
    assert released == ["v1"]
    requests.exit(after)
    requests.retire(lambda: released.append("v2"))  # nothing in flight: at once
    assert released == ["v1", "v2"]


# ---------------------------------------------------------------- 6. paths
def test_server_paths_are_shown_only_with_the_key(live: TestClient, service_pairs: list[Any]) -> None:
    store = live.app.state.registry.models["a"].store
    folder_item = int(store.ids()[0])
    root = Path(store.manifest.dataset.spec)
    shown = live.get(f"/v1/images/{folder_item}").json()["source"]
    assert shown == root.name and "/" not in shown
    assert live.get(f"/v1/images/{folder_item}", headers=KEY).json()["source"] == str(root)
    assert live.get(f"/v1/images/{folder_item}", headers={"X-API-Key": "wrong"}).json()["source"] == root.name


def test_shown_source_of_files_added_by_path() -> None:
    from app.routers.images import shown_source

    root = Path("/photos")
    assert shown_source("/photos/2024/rome/a.jpg", "added", root) == "2024/rome/a.jpg"
    assert shown_source("/home/ana/secret/b.jpg", "added", root) == "b.jpg"
    assert shown_source("upload", "added", root) == "upload"
    assert shown_source("/photos", "train", root) == "photos"


def test_a_busy_index_does_not_name_its_directory(live: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.routers import images
    from indexer.versions import index_lock

    monkeypatch.setattr(images, "WRITE_LOCK_SECONDS", 0.2)
    index_dir = live.app.state.registry.models["a"].index_dir
    with index_lock(index_dir):
        detail = assert_error(_add(live), 503, "being changed by another writer")
    assert str(index_dir) not in detail and "pid" not in detail


# ---------------------------------------------------------------- 7. minor
def test_an_unknown_label_is_refused_at_the_add(live: TestClient) -> None:
    assert_error(_add(live, label="purple"), 422, "unknown label 'purple'", "red")
    assert _add(live, label="red").status_code == 200


@pytest.mark.parametrize("item_id", [" 1", "+1", "1.0", "1e0", "٣"])
def test_ids_are_digits_only(live: TestClient, item_id: str) -> None:
    assert_error(live.get(f"/v1/images/{item_id}"), 422, "digits only")
    assert_error(live.delete(f"/v1/images/{item_id}", headers=KEY), 422, "digits only")


def test_a_405_lists_every_method_of_the_path(live: TestClient) -> None:
    r = live.options("/v1/images/1")
    assert r.status_code == 405 and {"GET", "DELETE"} <= set(r.headers["allow"].replace(" ", "").split(","))
    assert r.json()["detail"] == "Method Not Allowed"


def test_an_empty_file_part_is_refused_and_the_schema_says_so(live: TestClient) -> None:
    schema = live.get("/openapi.json").json()["components"]["schemas"]
    for name in ("Body_search_images_v1_search_post", "Body_add_images_v1_images_post", "Body_embed_v1_embed_post"):
        assert schema[name]["properties"]["file"]["items"]["minLength"] == 1, name
    assert_error(live.post("/v1/search", files=upload(b"")), 422, "empty upload")
    assert_error(live.post("/v1/images", files=upload(b""), headers=KEY), 422, "empty upload")
