"""The collection over the API: more like this, filters, cut-offs, batches, export, live add and delete."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.test_service import assert_error, encode, noisy, png, upload

BLUE = (30, 60, 220)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def live(service_pairs: list[Any], tmp_path: Path) -> Iterator[TestClient]:
    """Model ``a`` over a private copy of its index (tests here change it), with an API key."""
    from app.config import ModelPair, ServiceSettings
    from app.main import create_app

    index = tmp_path / "index"
    shutil.copytree(service_pairs[0].index, index)
    pair = ModelPair(model=service_pairs[0].model, index=index, name="a")
    with TestClient(create_app(ServiceSettings(models=[pair], api_key="k", reload_seconds=0))) as c:
        yield c


KEY = {"X-API-Key": "k"}


def test_more_like_this_excludes_the_item_and_needs_no_upload(live: TestClient) -> None:
    first = live.post("/v1/search", files=upload(png()), data={"k": "3"}).json()["results"][0]
    r = live.get(f"/v1/images/{first['id']}/similar", params={"k": 4})
    assert r.status_code == 200, r.text
    ids = [n["id"] for n in r.json()["results"]]
    assert len(ids) == 4 and first["id"] not in ids
    assert all(-1 <= n["score"] <= 1 for n in r.json()["results"])
    assert_error(live.get("/v1/images/999999/similar"), 404, "no item 999999")


def test_label_filter_and_cut_off(live: TestClient) -> None:
    blue = live.post("/v1/search", files=upload(png(noisy(BLUE))), data={"k": "5", "label": "red"}).json()
    assert len(blue["results"]) == 5 and {n["label"] for n in blue["results"]} == {"red"}
    assert live.post("/v1/search", files=upload(png()), data={"label": "purple"}).json()["results"] == []
    everything = live.post("/v1/search", files=upload(png()), data={"k": "30"}).json()["results"]
    cut = sorted(n["score"] for n in everything)[15]
    some = live.post("/v1/search", files=upload(png()), data={"k": "30", "min_score": str(cut)}).json()["results"]
    assert 0 < len(some) < 30 and min(n["score"] for n in some) >= cut
    got = live.get(f"/v1/images/{everything[0]['id']}/similar", params={"label": "blue", "k": 3}).json()["results"]
    assert {n["label"] for n in got} == {"blue"} and len(got) == 3
    for bad in ("-1.5", "2"):
        assert_error(live.post("/v1/search", files=upload(png()), data={"min_score": bad}), 422, "min_score")
    assert_error(live.get("/v1/images/0/similar", params={"min_score": 3}), 422, "min_score")


def test_several_images_give_one_list_each(live: TestClient) -> None:
    files = [("file", ("r.png", png(), "image/png")), ("file", ("b.png", png(noisy(BLUE)), "image/png"))]
    body = live.post("/v1/search", files=files, data={"k": "2"}).json()
    assert [q["file"] for q in body["queries"]] == ["r.png", "b.png"]
    assert [n["label"] for n in body["queries"][0]["results"]] == ["red", "red"]
    assert [n["label"] for n in body["queries"][1]["results"]] == ["blue", "blue"]
    assert body["results"] == body["queries"][0]["results"]
    assert_error(live.post("/v1/classify", files=files), 422, "one image")


def test_item_details_image_and_embedding(live: TestClient) -> None:
    hit = live.post("/v1/search", files=upload(png())).json()["results"][0]
    info = live.get(f"/v1/images/{hit['id']}").json()
    assert info["id"] == hit["id"] and info["key"] == hit["key"] and info["label_name"] == "red"
    assert live.get(info["file_url"]).headers["content-type"].startswith("image/")
    emb = live.get(f"/v1/images/{hit['id']}/embedding").json()
    assert emb["dim"] == 1024 and abs(sum(x * x for x in emb["vector"]) - 1) < 1e-3
    up = live.post("/v1/embed", files=upload(png())).json()
    assert up["dim"] == 1024 and sum(a * b for a, b in zip(up["vector"], emb["vector"], strict=False)) == pytest.approx(
        hit["score"], abs=1e-3
    )
    assert_error(live.get("/v1/images/424242"), 404)


def test_live_add_and_delete(live: TestClient) -> None:
    new = png(noisy((250, 250, 30), seed=7))
    assert_error(live.post("/v1/images", files=upload(new)), 401, "X-API-Key")
    r = live.post("/v1/images", files=upload(new, "sun.png"), data={"meta": json.dumps({"album": "sky"})}, headers=KEY)
    assert r.status_code == 200, r.text
    (new_id,) = r.json()["ids"]
    assert r.json()["count"] == 31
    assert live.post("/v1/search", files=upload(new), data={"k": "1"}).json()["results"][0]["id"] == new_id
    info = live.get(f"/v1/images/{new_id}").json()
    assert info["meta"] == {"album": "sky"} and info["key"] == "sun.png" and info["added"]
    again = live.post("/v1/images", files=upload(new, "copy.png"), headers=KEY).json()
    assert again["ids"] == [new_id] and again["count"] == 31  # the same bytes: the existing id
    assert_error(live.post("/v1/images", files=upload(new), data={"meta": "[1]"}, headers=KEY), 422, "JSON object")
    assert live.delete(f"/v1/images/{new_id}", headers=KEY).json()["count"] == 30
    for path in (f"/v1/images/{new_id}", f"/v1/images/{new_id}/file", f"/v1/images/{new_id}/similar"):
        assert_error(live.get(path), 404)
    assert_error(live.delete(f"/v1/images/{new_id}", headers=KEY), 404, "unknown ids")


def test_adds_and_deletes_during_concurrent_searches(live: TestClient) -> None:
    async def run(ac: httpx.AsyncClient) -> tuple[list[int], list[int]]:
        stop = asyncio.Event()

        async def searcher() -> list[int]:
            codes = []
            while not stop.is_set():
                r = await ac.post("/v1/search", files=upload(png()), data={"k": "50"})
                codes.append(r.status_code)
                assert len({n["id"] for n in r.json()["results"]}) == len(r.json()["results"])
            return codes

        tasks = [asyncio.ensure_future(searcher()) for _ in range(3)]
        added = []
        for i in range(4):
            body = encode(noisy((10 + 60 * i, 120, 200), seed=50 + i), "PNG")
            r = await ac.post("/v1/images", files=upload(body, f"n{i}.png"), headers=KEY)
            added += r.json()["ids"]
        for item in added[:2]:
            assert (await ac.delete(f"/v1/images/{item}", headers=KEY)).status_code == 200
        stop.set()
        return [c for t in tasks for c in await t], added

    codes, added = live.portal.call(lambda: _with_client(live, run))
    assert codes and set(codes) == {200}
    assert live.get("/v1/models").json()["models"][0]["index_size"] == 32


async def _with_client(client: TestClient, fn: Any) -> Any:
    transport = httpx.ASGITransport(app=client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as ac:
        return await fn(ac)


def _serve(model: Path, index: Path, port: int, log: Path, **settings: str) -> subprocess.Popen:
    """`imgsim serve` in a subprocess, ready to answer; ``settings`` are IMGSIM_* variables."""
    env = {**os.environ, "IMGSIM_API_KEY": "k", "TF_CPP_MIN_LOG_LEVEL": "3", **settings}
    cmd = [sys.executable, "-m", "app.cli", "serve", "--model", str(model), "--index", str(index), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(log.read_text())


def test_an_acknowledged_add_survives_kill_9(service_pairs: list[Any], tmp_path: Path) -> None:
    index = tmp_path / "index"
    shutil.copytree(service_pairs[0].index, index)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    new = png(noisy((250, 250, 30), seed=11))
    proc = _serve(service_pairs[0].model, index, port, tmp_path / "first.log")
    try:
        r = httpx.post(f"{url}/v1/images", files=upload(new, "kept.png"), headers=KEY, timeout=60)
        assert r.status_code == 200, r.text
        (new_id,) = r.json()["ids"]
    finally:
        proc.send_signal(signal.SIGKILL)  # right after the answer: no shutdown, no flush
        proc.wait()
    proc = _serve(service_pairs[0].model, index, port, tmp_path / "second.log")
    try:
        assert httpx.get(f"{url}/v1/images/{new_id}").json()["key"] == "kept.png"
        hit = httpx.post(f"{url}/v1/search", files=upload(new), data={"k": "1"}).json()["results"][0]
        assert hit["id"] == new_id and hit["score"] > 0.9999
    finally:
        proc.kill()
        proc.wait()


def test_concurrent_cli_adds_lose_nothing(service_pairs: list[Any], tmp_path: Path) -> None:
    """Four `imgsim index add` at once on one index, each waiting for the others: every image lands."""
    index = tmp_path / "index"
    shutil.copytree(service_pairs[0].index, index)
    files = []
    for i in range(4):
        files.append(tmp_path / f"new{i}.png")
        files[-1].write_bytes(encode(noisy((40 * i, 250, 200 - 40 * i), seed=30 + i), "PNG"))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "app.cli", "index", "add", "--index", str(index), "--wait", "120", "-q", str(f)],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for f in files
    ]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    from indexer.store import IndexStore

    store = IndexStore.open(index)
    assert store.count() == 34 and store.index.ntotal == 34 and store.manifest.count == 34
    assert {r.key for r in store.rows(range(30, 40)).values()} == {f.name for f in files}
    store.close()


def test_duplicates_with_and_without_the_hash_check(live: TestClient) -> None:
    """A brightened copy whose cosine is under the threshold: grouped only when the perceptual
    hashes are compared (the default)."""
    import io

    import numpy as np
    from PIL import Image, ImageEnhance

    original = png(noisy((250, 120, 30), seed=11))
    buf = io.BytesIO()
    ImageEnhance.Brightness(Image.open(io.BytesIO(original))).enhance(1.3).save(buf, format="PNG")
    files = [("file", ("o.png", original, "image/png")), ("file", ("o-bright.png", buf.getvalue(), "image/png"))]
    r = live.post("/v1/images", files=files, headers=KEY)
    assert r.status_code == 200, r.text
    pair = set(r.json()["ids"])
    a, b = (np.asarray(live.get(f"/v1/images/{i}/embedding").json()["vector"]) for i in sorted(pair))
    cosine = float(a @ b)  # the vectors are L2-normalised
    threshold = min(1.0, cosine + 0.0005)

    def answer(**params: Any) -> dict[str, Any]:
        while (r := live.get("/v1/duplicates", params={"threshold": threshold, **params})).status_code == 202:
            time.sleep(0.1)  # computed in the background; ask again
        assert r.status_code == 200, r.text
        return r.json()

    def grouped(**params: Any) -> bool:
        return any(pair <= set(g["ids"]) for g in answer(**params)["groups"])

    assert not grouped(hash_check="false")
    assert grouped()  # the default checks hashes
    assert answer()["hash_check"] is True
