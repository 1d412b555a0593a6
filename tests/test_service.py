"""The web service end to end: real app, real (tiny) models and indexes, httpx/TestClient.

Two simple-cnn models ``a`` and ``b`` are trained once per session (see conftest.py).
TestClient runs the lifespan in its own event loop thread; concurrency tests run
``httpx.AsyncClient`` over ``ASGITransport`` *on that loop* via ``client.portal``, so the
requests meet the app's micro-batchers exactly as uvicorn's would.
"""

from __future__ import annotations

import asyncio
import io
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

CLASSES = ["blue", "green", "red"]
RED = (220, 40, 40)

# --------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noisy(rgb: tuple[int, int, int] = RED, size: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def png(img: Image.Image | None = None) -> bytes:
    return encode(img or noisy(), "PNG")


def upload(data: bytes, name: str = "query.png", ctype: str = "image/png") -> dict[str, Any]:
    return {"file": (name, data, ctype)}


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of any size, built without ever holding its pixels (a few KB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = bytearray()
    block = row * max(1, 1_000_000 // len(row))
    rows_per_block = len(block) // len(row)
    left = height
    while left > 0:
        n = min(left, rows_per_block)
        idat += comp.compress(block[: n * len(row)])
        left -= n
    idat += comp.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", bytes(idat)) + chunk(b"IEND", b"")


def metric_samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def batch_stats(client: TestClient, model: str) -> tuple[float, float]:
    """(number of model calls, images in them) so far, from the imgsim_batch_size histogram."""
    m = metric_samples(client)
    key = (("model", model),)
    return m.get(("imgsim_batch_size_count", key), 0.0), m.get(("imgsim_batch_size_sum", key), 0.0)


def run_async(client: TestClient, fn: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    """Run ``fn(async_client)`` on the app's own event loop (the one its batchers live on)."""

    async def main() -> Any:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as ac:
            return await fn(ac)

    return client.portal.call(main)


def assert_error(r: httpx.Response, status: int, *fragments: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail, r.text
    for f in fragments:
        assert f.lower() in detail.lower(), (f, detail)
    return detail


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def client(make_service_app: Callable[..., Any]) -> Iterator[TestClient]:
    """Both models loaded (``a`` active), default settings, no API key."""
    with TestClient(make_service_app(api_key=None)) as c:
        yield c


@pytest.fixture
def active_a(client: TestClient) -> Iterator[TestClient]:
    """The shared client with ``a`` active, before and after the test."""
    assert client.put("/v1/models/active", json={"name": "a"}).status_code == 200
    yield client
    assert client.put("/v1/models/active", json={"name": "a"}).status_code == 200


# --------------------------------------------------------------------------- endpoints


def test_search_default_k(active_a: TestClient) -> None:
    r = active_a.post("/v1/search", files=upload(png()))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "a" and body["took_ms"] >= 0
    results = body["results"]
    assert len(results) == 5
    scores = [x["score"] for x in results]
    assert all(-1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in scores), scores
    assert scores == sorted(scores, reverse=True)
    assert len({x["id"] for x in results}) == 5
    for x in results:
        assert isinstance(x["id"], int) and x["label"] in CLASSES
        assert x["url"] == f"/v1/images/{x['id']}/file?model=a"
    img = active_a.get(results[0]["url"])
    assert img.status_code == 200 and img.headers["content-type"].startswith("image/")
    assert Image.open(io.BytesIO(img.content)).size == (40, 40)


def test_search_k_and_model(active_a: TestClient) -> None:
    r = active_a.post("/v1/search", files=upload(png()), data={"k": "3"})
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    r = active_a.post("/v1/search", files=upload(png()), data={"model": "b"})
    assert r.status_code == 200 and r.json()["model"] == "b"
    assert all(x["url"].endswith("?model=b") for x in r.json()["results"])
    # k above the index size (30 items) returns what there is, never padding ids.
    r = active_a.post("/v1/search", files=upload(png()), data={"k": "100"})
    assert r.status_code == 200 and len(r.json()["results"]) == 30


@pytest.mark.parametrize("path", ["/v1/search", "/v1/classify", "/v1/analyze"])
def test_an_image_sent_as_the_body_is_told_to_use_multipart(active_a: TestClient, path: str) -> None:
    """curl --data-binary @q.jpg -H 'Content-Type: image/jpeg' (the raw-body upload was removed)."""
    jpeg = encode(noisy(size=48), "JPEG", quality=90)
    r = active_a.post(path, content=jpeg, headers={"content-type": "image/jpeg"})
    assert_error(r, 415, "image/jpeg", "multipart field 'file'", "-F file=@")


@pytest.mark.parametrize("path", ["/v1/search", "/v1/classify", "/v1/analyze"])
def test_server_timing_header_splits_took_ms(active_a: TestClient, path: str) -> None:
    r = active_a.post(path, files=upload(png()))
    assert r.status_code == 200, r.text
    ms = {
        name: float(dur.removeprefix("dur="))
        for name, dur in (p.split(";") for p in r.headers["server-timing"].split(", "))
    }
    assert list(ms) == ["parse", "decode", "queue", "infer", "total"]
    assert all(v >= 0 for v in ms.values()) and ms["infer"] > 0
    assert ms["total"] == pytest.approx(r.json()["took_ms"], abs=0.01)
    assert ms["parse"] + ms["decode"] + ms["queue"] + ms["infer"] <= ms["total"] + 0.01
    assert "server-timing" not in active_a.post(path, content=b"", headers={"content-type": "image/jpeg"}).headers


def test_classify(active_a: TestClient) -> None:
    r = active_a.post("/v1/classify", files=upload(png()))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "a"
    p = body["prediction"]
    assert p["label"] in CLASSES and 0.0 <= p["probability"] <= 1.0
    assert p["top"][0]["label"] == p["label"] and len(p["top"]) == 3
    assert sorted(t["label"] for t in p["top"]) == CLASSES
    probs = [t["probability"] for t in p["top"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-3)
    assert p["neighbour_vote"] in CLASSES


@pytest.mark.parametrize("model", ["a", "b"])
def test_analyze_matches_search_and_classify(active_a: TestClient, model: str) -> None:
    data = png(noisy(seed=7))
    form = {"model": model, "k": "4"}
    both = active_a.post("/v1/analyze", files=upload(data), data=form)
    search = active_a.post("/v1/search", files=upload(data), data=form)
    classify = active_a.post("/v1/classify", files=upload(data), data={"model": model})
    assert both.status_code == search.status_code == classify.status_code == 200
    b, s, c = both.json(), search.json(), classify.json()
    assert b["model"] == s["model"] == c["model"] == model
    assert [x["id"] for x in b["results"]] == [x["id"] for x in s["results"]]
    assert [x["score"] for x in b["results"]] == pytest.approx([x["score"] for x in s["results"]], abs=1e-4)
    assert b["prediction"]["label"] == c["prediction"]["label"]
    assert b["prediction"]["neighbour_vote"] == c["prediction"]["neighbour_vote"]
    assert b["prediction"]["probability"] == pytest.approx(c["prediction"]["probability"], abs=1e-4)


def test_models_listing_and_switch(active_a: TestClient) -> None:
    r = active_a.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["active"] == "a"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"a", "b"}
    assert by_name["a"]["active"] is True and by_name["b"]["active"] is False
    for m in by_name.values():
        assert m["backbone"] == "simple-cnn" and m["input_size"] == 32 and m["runtime"] == "tf"
        assert m["classes"] == CLASSES and m["embedding_dim"] == 1024
        assert m["index_size"] == 30 and m["index_type"] == "flat"
        assert 0.0 <= m["metrics"]["test_accuracy"] <= 1.0

    r = active_a.put("/v1/models/active", json={"name": "b"})  # no API key configured: no header needed
    assert r.status_code == 200 and r.json() == {"active": "b", "previous": "a"}
    assert active_a.get("/v1/models").json()["active"] == "b"
    assert active_a.post("/v1/search", files=upload(png())).json()["model"] == "b"
    assert_error(active_a.put("/v1/models/active", json={"name": "nope"}), 404, "nope", "a, b")
    assert active_a.get("/v1/models").json()["active"] == "b"


def test_images_and_thumbnails(active_a: TestClient) -> None:
    item = active_a.post("/v1/search", files=upload(png())).json()["results"][0]["id"]
    full = active_a.get(f"/v1/images/{item}/file")
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(full.content)).size == (40, 40)
    thumb = active_a.get(f"/v1/images/{item}/file", params={"size": 16})
    assert thumb.status_code == 200 and thumb.headers["content-type"].startswith("image/")
    assert Image.open(io.BytesIO(thumb.content)).size == (16, 16)
    assert active_a.get(f"/v1/images/{item}/file", params={"model": "b"}).status_code == 200
    assert_error(active_a.get("/v1/images/999999/file"), 404, "999999")
    assert_error(active_a.get(f"/v1/images/{item}/file", params={"model": "zzz"}), 404, "zzz", "a, b")
    assert_error(active_a.get(f"/v1/images/{item}/file", params={"size": 8}), 422, "size")
    assert_error(active_a.get("/v1/images/cat"), 422, "item_id")


def test_health_ready_metrics(active_a: TestClient) -> None:
    assert active_a.get("/healthz").json() == {"status": "ok"}
    r = active_a.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {
        "status": "ready",
        "device": "CPU",
        "models": {"a": 30, "b": 30},
        "runtimes": {"a": "tf", "b": "tf"},
    }
    active_a.post("/v1/search", files=upload(png()))
    r = active_a.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("imgsim_requests_total", "imgsim_request_seconds", "imgsim_batch_size", "imgsim_queue_depth",
                 'imgsim_model_runtime{model="a",runtime="tf"} 1.0'):  # fmt: skip
        assert name in r.text, name
    m = metric_samples(active_a)
    key = ("imgsim_requests_total", (("endpoint", "/v1/search"), ("model", "a"), ("status", "200")))
    assert m[key] >= 1


def test_web_page_and_docs(active_a: TestClient) -> None:
    r = active_a.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'type="file"' in r.text and "/v1/search" in r.text
    for path in ("/docs", "/redoc"):
        r = active_a.get(path)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"], path
    paths = active_a.get("/openapi.json").json()["paths"]
    for p in (
        "/v1/search",
        "/v1/classify",
        "/v1/analyze",
        "/v1/models",
        "/v1/models/active",
        "/v1/images/{item_id}",
    ):
        assert p in paths, p
    assert {"413", "415", "422", "503"} <= set(paths["/v1/search"]["post"]["responses"])


# --------------------------------------------------------------------------- image formats

SOLID_RED = Image.new("RGB", (48, 48), RED)


def _gif_two_frames() -> bytes:
    blue = Image.new("RGB", (48, 48), (30, 60, 220))
    return encode(SOLID_RED, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)


def _rgba() -> bytes:
    arr = np.asarray(noisy()).copy()
    alpha = np.full(arr.shape[:2], 255, np.uint8)
    alpha[:, :20] = 0
    return encode(Image.fromarray(np.dstack([arr, alpha]), "RGBA"), "PNG")


FORMATS = {
    "jpeg": (lambda: encode(noisy(), "JPEG", quality=90), "q.jpg", "image/jpeg"),
    "png": (lambda: png(), "q.png", "image/png"),
    "webp": (lambda: encode(noisy(), "WEBP"), "q.webp", "image/webp"),
    "bmp": (lambda: encode(noisy(), "BMP"), "q.bmp", "image/bmp"),
    "gif-animated": (_gif_two_frames, "q.gif", "image/gif"),
    "png-grey": (lambda: encode(noisy().convert("L"), "PNG"), "q.png", "image/png"),
    "png-rgba": (_rgba, "q.png", "image/png"),
    "png-palette": (lambda: encode(noisy().convert("P"), "PNG"), "q.png", "image/png"),
    "png-16bit-grey": (lambda: encode(Image.fromarray(np.full((20, 30), 40000, np.uint16)), "PNG"), "q.png", ""),
    "jpeg-cmyk": (lambda: encode(noisy().convert("CMYK"), "JPEG"), "q.jpg", "image/jpeg"),
    "jpeg-as-octet-stream": (lambda: encode(noisy(), "JPEG"), "blob", "application/octet-stream"),
    "tiny-1x1": (lambda: png(Image.new("RGB", (1, 1), RED)), "q.png", "image/png"),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_image_formats_accepted(active_a: TestClient, fmt: str) -> None:
    make, name, ctype = FORMATS[fmt]
    r = active_a.post("/v1/search", files=upload(make(), name, ctype))
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 5


def test_animated_gif_uses_first_frame(active_a: TestClient) -> None:
    gif = active_a.post("/v1/search", files=upload(_gif_two_frames(), "q.gif", "image/gif")).json()["results"]
    first = active_a.post("/v1/search", files=upload(png(SOLID_RED))).json()["results"]
    assert [x["id"] for x in gif] == [x["id"] for x in first]
    assert [x["score"] for x in gif] == pytest.approx([x["score"] for x in first], abs=1e-4)


# --------------------------------------------------------------------------- error paths


def test_upload_errors(active_a: TestClient) -> None:
    c = active_a
    assert_error(c.post("/v1/search", files=upload(b"just some notes\n", "notes.txt", "")), 415, "not an image")
    assert_error(c.post("/v1/search", files=upload(png(), "q.png", "text/plain")), 415, "text/plain")
    jpeg = encode(noisy(size=64), "JPEG", quality=95)
    assert_error(c.post("/v1/search", files=upload(jpeg[: len(jpeg) // 2], "q.jpg", "image/jpeg")), 422, "truncated")
    assert_error(c.post("/v1/search", files=upload(jpeg[:40], "q.jpg", "image/jpeg")), 422)
    assert_error(c.post("/v1/search", files=upload(png()[:60])), 422)
    assert_error(c.post("/v1/search", files=upload(b"", "empty.png")), 422, "empty")
    assert_error(c.post("/v1/search", files=upload(encode(noisy(), "TIFF"), "q.tif", "")), 415, "TIFF")
    assert_error(c.post("/v1/classify", files=upload(b"%PDF-1.4\n", "x.pdf", "application/pdf")), 415)


def test_decompression_bombs_refused_from_header(active_a: TestClient) -> None:
    huge = bomb_png(30_000, 30_000)  # 900 Mpx: past Pillow's own bomb limit too
    assert len(huge) < 200_000
    start = time.perf_counter()
    detail = assert_error(active_a.post("/v1/search", files=upload(huge)), 413, "too many pixels")
    assert "40000000" in detail
    big = bomb_png(8_000, 8_000)  # 64 Mpx: only our IMGSIM_MAX_IMAGE_PIXELS (40 M) stops it
    assert_error(active_a.post("/v1/analyze", files=upload(big)), 413, "too many pixels")
    # Decoding 964 Mpx would take far longer (and ~1 GB): the refusal comes from the header alone.
    assert time.perf_counter() - start < 10


def test_webp_has_its_own_pixel_limit(make_service_app: Callable[..., Any]) -> None:
    """Pillow's WebP decoder holds the GIL while it copies a frame: WebP gets a smaller limit."""
    webp = encode(noisy(size=48), "WEBP")  # 2,304 pixels
    with TestClient(make_service_app(names=("a",), max_webp_pixels=2_000)) as c:
        assert_error(c.post("/v1/search", files=upload(webp, "q.webp", "image/webp")), 413, "WebP limit is 2000")
        assert c.post("/v1/search", files=upload(png(noisy(size=48)))).status_code == 200  # other formats: 40 M
    with TestClient(make_service_app(names=("a",), max_webp_pixels=3_000)) as c:
        assert c.post("/v1/search", files=upload(webp, "q.webp", "image/webp")).status_code == 200


def test_parameter_errors(active_a: TestClient) -> None:
    c = active_a
    for path in ("/v1/search", "/v1/analyze"):
        for k in ("0", "101", "-3"):
            assert_error(c.post(path, files=upload(png()), data={"k": k}), 422, "k")
        assert_error(c.post(path, files=upload(png()), data={"k": "five"}), 422, "k")
    for path in ("/v1/search", "/v1/classify", "/v1/analyze"):
        detail = assert_error(c.post(path, files=upload(png()), data={"model": "resnet9000"}), 404, "resnet9000")
        assert "loaded: a, b" in detail
        # A form without the image, or a body that is no image, says how to send one.
        assert_error(c.post(path, data={"k": "5"}), 415, "x-www-form-urlencoded", "-F file=@")
        assert_error(c.post(path, files={"k": (None, "5")}), 422, "missing the image", "'file'")
        assert_error(c.post(path, json={"file": "cat.jpg"}), 415, "application/json", "-F file=@")
    assert c.get("/v1/search").status_code == 405
    assert c.get("/v1/nothing-here").status_code == 404
    assert_error(c.put("/v1/models/active", json={}), 422, "name")
    assert_error(c.put("/v1/models/active", content=b"not json", headers={"content-type": "application/json"}), 422)


def test_no_request_gives_a_server_error(active_a: TestClient) -> None:
    """Odd but possible requests get a precise 4xx (TestClient would also raise on any crash)."""
    c = active_a
    odd = {
        "k in float notation": (c.post("/v1/search", files=upload(png()), data={"k": "1e3"}), 422),
        "k past int64": (c.post("/v1/search", files=upload(png()), data={"k": "9" * 30}), 422),
        "empty multipart": (
            c.post("/v1/search", content=b"--x--\r\n", headers={"content-type": "multipart/form-data; boundary=x"}),
            422,
        ),
        "broken multipart": (
            c.post("/v1/search", content=b"--x\r\n\r\n", headers={"content-type": "multipart/form-data; boundary=x"}),
            400,
        ),
        "raw body, empty": (c.post("/v1/search", content=b"", headers={"content-type": "image/png"}), 415),
        "raw body, no content type": (c.post("/v1/search", content=b"just text"), 415),
        "PNG signature only": (c.post("/v1/search", files=upload(b"\x89PNG\r\n\x1a\n")), 422),
        "GIF signature only": (c.post("/v1/search", files=upload(b"GIF89a", "q.gif", "image/gif")), 422),
        "WebP header only": (c.post("/v1/search", files=upload(b"RIFF\x00\x00\x00\x00WEBPVP8 ")), 422),
        "BMP of zeros": (c.post("/v1/search", files=upload(b"BM" + b"\x00" * 60, "q.bmp", "image/bmp")), 422),
        "negative item id": (c.get("/v1/images/-1"), 422),
        "item id past int64": (c.get("/v1/images/" + "9" * 30), 422),
        "thumbnail size not a number": (c.get("/v1/images/1/file", params={"size": "huge"}), 422),
        "thumbnail size too big": (c.get("/v1/images/1/file", params={"size": 100000}), 422),
        "model name not a string": (c.put("/v1/models/active", json={"name": 5}), 422),
        "DELETE on active": (c.delete("/v1/models/active"), 405),
    }
    for what, (r, status) in odd.items():
        assert r.status_code == status, (what, r.status_code, r.text)
        assert r.json()["detail"], (what, r.text)
    # Odd but fine: path-like file names and content-type parameters are ignored.
    r = c.post("/v1/search", files=upload(png(), "../../etc/passwd", "image/png; charset=binary"))
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- limits, admin


@pytest.fixture(scope="module")
def strict(make_service_app: Callable[..., Any]) -> Iterator[TestClient]:
    """An app with a 2000-byte upload limit, a 10 kpx image limit and an API key."""
    app = make_service_app(max_upload_bytes=2000, max_image_pixels=10_000, api_key="s3cret")
    with TestClient(app) as c:
        yield c


def test_upload_size_limit(strict: TestClient) -> None:
    small = png(Image.new("RGB", (16, 16), RED))
    assert len(small) < 2000
    assert strict.post("/v1/search", files=upload(small)).status_code == 200
    noise = png(noisy(size=40))
    assert 2000 < len(noise) < 64 * 1024
    assert_error(strict.post("/v1/search", files=upload(noise)), 413, "2000-byte limit")
    # Far over the limit: refused from Content-Length, before the body is read.
    big = png(noisy(size=200))
    assert len(big) > 2000 + 64 * 1024
    assert_error(strict.post("/v1/classify", files=upload(big)), 413, "2000-byte limit")
    # Few bytes, too many pixels for this app's IMGSIM_MAX_IMAGE_PIXELS.
    wide = png(Image.new("RGB", (200, 200), RED))
    assert len(wide) < 2000
    assert_error(strict.post("/v1/search", files=upload(wide)), 413, "too many pixels", "10000")


def test_admin_api_key(strict: TestClient) -> None:
    path = "/v1/models/active"
    r = strict.put(path, json={"name": "b"})
    assert_error(r, 401, "X-API-Key")
    assert r.headers.get("www-authenticate") == "ApiKey"
    assert_error(strict.put(path, json={"name": "b"}, headers={"X-API-Key": "wrong"}), 403, "invalid")
    assert strict.get("/v1/models").json()["active"] == "a"
    r = strict.put(path, json={"name": "b"}, headers={"X-API-Key": "s3cret"})
    assert r.status_code == 200 and r.json() == {"active": "b", "previous": "a"}
    assert_error(strict.put(path, json={"name": "c"}, headers={"X-API-Key": "s3cret"}), 404, "'c'", "a, b")
    assert strict.get("/v1/models").json()["active"] == "b"
    # Reading endpoints stay open.
    assert strict.get("/v1/models").status_code == 200
    assert strict.get("/readyz").status_code == 200


# --------------------------------------------------------------------------- batching and load


def test_concurrent_requests_are_batched(active_a: TestClient) -> None:
    n = 24
    images = [png(noisy(seed=100 + i)) for i in range(n)]
    calls0, images0 = batch_stats(active_a, "a")

    async def fire(ac: httpx.AsyncClient) -> list[httpx.Response]:
        return await asyncio.gather(*(ac.post("/v1/search", files=upload(img)) for img in images))

    responses = run_async(active_a, fire)
    assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses if r.status_code != 200]
    assert all(r.json()["model"] == "a" and len(r.json()["results"]) == 5 for r in responses)
    calls, imgs = batch_stats(active_a, "a")
    assert imgs - images0 == n
    assert calls - calls0 < n, f"{n} concurrent requests took {calls - calls0} model calls: nothing was batched"


def test_full_queue_answers_503_with_retry_after(
    make_service_app: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.registry import LoadedModel

    original = LoadedModel.run_batch

    def slow(self: LoadedModel, images: np.ndarray, k: int) -> Any:
        time.sleep(0.2)
        return original(self, images, k)

    monkeypatch.setattr(LoadedModel, "run_batch", slow)
    with TestClient(make_service_app(names=("a",), max_queue=1, api_key=None)) as c:

        async def fire(ac: httpx.AsyncClient) -> list[httpx.Response]:
            return await asyncio.gather(*(ac.post("/v1/search", files=upload(png())) for _ in range(10)))

        responses = run_async(c, fire)
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 503}, statuses
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                assert "busy" in r.json()["detail"] and "queue full" in r.json()["detail"]
        m = metric_samples(c)
        assert m[("imgsim_rejected_total", (("model", "a"),))] == statuses.count(503)
        # Once the burst is over the service answers normally again.
        assert c.post("/v1/search", files=upload(png())).status_code == 200


def test_faiss_threads_setting_reaches_the_inference_thread(make_service_app: Callable[..., Any]) -> None:
    """OpenMP settings are per thread: the one that searches must get IMGSIM_FAISS_THREADS."""
    import faiss

    with TestClient(make_service_app(names=("a",), api_key=None, faiss_threads=3)) as c:
        loaded = c.app.state.registry.get("a")
        assert loaded.batcher._executor.submit(faiss.omp_get_max_threads).result() == 3
        assert c.post("/v1/search", files=upload(png())).status_code == 200


def test_switching_models_under_load_fails_nothing(active_a: TestClient) -> None:
    """40 searches (no explicit model) start over ~0.2 s while the active model flips a<->b throughout."""
    images = [png(noisy(seed=200 + i)) for i in range(40)]

    async def scenario(ac: httpx.AsyncClient) -> tuple[list[httpx.Response], list[httpx.Response]]:
        pending = len(images)

        async def search(i: int) -> httpx.Response:
            nonlocal pending
            await asyncio.sleep(i * 0.005)  # staggered: requests resolve their model at different moments
            try:
                return await ac.post("/v1/search", files=upload(images[i]))
            finally:
                pending -= 1

        async def switcher() -> list[httpx.Response]:
            out: list[httpx.Response] = []
            while pending or len(out) < 4:  # several switches, at least one while searches are pending
                out.append(await ac.put("/v1/models/active", json={"name": "b" if len(out) % 2 == 0 else "a"}))
                await asyncio.sleep(0.01)
            return out

        *results, switches = await asyncio.gather(*(search(i) for i in range(len(images))), switcher())
        return results, switches

    results, switches = run_async(active_a, scenario)
    assert len(switches) >= 4
    assert [r.status_code for r in switches] == [200] * len(switches)
    assert [r.json()["active"] for r in switches] == ["b", "a"] * (len(switches) // 2) + ["b"] * (len(switches) % 2)
    assert [r.status_code for r in results] == [200] * len(images), [r.text for r in results if r.status_code != 200]
    served = [r.json()["model"] for r in results]
    assert set(served) == {"a", "b"}, served
    for r in results:
        model = r.json()["model"]
        assert len(r.json()["results"]) == 5
        assert all(x["url"].endswith(f"?model={model}") for x in r.json()["results"])
    # After the last switch, new requests go to the new active model.
    last = switches[-1].json()["active"]
    assert active_a.post("/v1/search", files=upload(png())).json()["model"] == last
    assert active_a.get("/v1/models").json()["active"] == last
    final = active_a.put("/v1/models/active", json={"name": "b" if last == "a" else "a"}).json()["active"]
    assert active_a.post("/v1/search", files=upload(png())).json()["model"] == final


def test_flip_tta_index_makes_the_service_embed_queries_the_same_way(service_pairs: list[Any], tmp_path: Any) -> None:
    """An indexed image uploaded as a query finds itself with cosine 1 only if the query got the index's TTA."""
    from app.config import ModelPair, ServiceSettings
    from app.main import create_app
    from indexer.build import build_index
    from indexer.update import add_images
    from models.settings import get_settings

    a = next(p for p in service_pairs if p.name == "a")
    data = a.model.parent / "colours"
    settings = get_settings().model_copy(update={"cache_dir": a.model.parent / "cache"})
    build_index(a.model, str(data), tmp_path / "tta", tta="flip", settings=settings, progress=False)
    # Left half red, right half blue: its mirror image differs, so a query without TTA scores < 1.
    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[:, :20, 0] = 230
    pixels[:, 20:, 2] = 230
    query = tmp_path / "halves.png"
    query.write_bytes(png(Image.fromarray(pixels)))
    assert add_images(tmp_path / "tta", [query], progress=False).added == 1
    app = create_app(ServiceSettings(models=[ModelPair(model=a.model, index=tmp_path / "tta", name="a")], api_key=None))
    with TestClient(app) as c:
        assert [m["tta"] for m in c.get("/v1/models").json()["models"]] == ["flip"]
        r = c.post("/v1/search", files=upload(query.read_bytes()), data={"k": "1"})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def _chunks(total: int, size: int = 4096) -> Iterator[bytes]:
    """A body without Content-Length: httpx sends it with chunked transfer encoding."""
    for _ in range(total // size):
        yield b"x" * size


def test_chunked_bodies_are_capped_while_they_stream(strict: TestClient) -> None:
    # To the admin endpoint, without a key: the size check comes first, nothing is parsed.
    r = strict.put("/v1/models/active", content=_chunks(200_000), headers={"content-type": "application/json"})
    assert_error(r, 413, "2000-byte limit")
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n\r\n'.encode()

    def upload_body() -> Iterator[bytes]:
        yield head
        yield from _chunks(300_000)

    r = strict.post(
        "/v1/search", content=upload_body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert_error(r, 413, "2000-byte limit")
    assert strict.post("/v1/search", files=upload(png(Image.new("RGB", (16, 16), RED)))).status_code == 200


def test_decodes_are_capped(make_service_app: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import app.uploads

    running, peak = [0], [0]
    real = app.uploads.decode_upload

    def slow(*args: Any) -> Any:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        running[0] -= 1
        return real(*args)

    monkeypatch.setattr(app.uploads, "decode_upload", slow)
    with TestClient(make_service_app(names=("a",), max_decodes=1, api_key=None)) as c:

        async def fire(ac: httpx.AsyncClient) -> list[httpx.Response]:
            return await asyncio.gather(*(ac.post("/v1/search", files=upload(png())) for _ in range(6)))

        assert {r.status_code for r in run_async(c, fire)} == {200}
    assert peak[0] == 1
