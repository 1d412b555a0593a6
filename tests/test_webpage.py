"""The web page in a real headless Chromium (Debian's package), driven by Playwright's Python client."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_service import noisy, png

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the Python client only)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(service_pairs: list[Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service on a free port of 127.0.0.1, in a thread of this process."""
    import uvicorn

    from app.config import ModelPair, ServiceSettings
    from app.main import create_app

    index = tmp_path_factory.mktemp("page") / "index"
    shutil.copytree(service_pairs[0].index, index)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServiceSettings(models=[ModelPair(model=service_pairs[0].model, index=index, name="a")])
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield url
    server.should_exit = True
    thread.join(10)


def test_search_more_like_this_filters_and_duplicates(server: str, tmp_path: Path) -> None:
    a, b = tmp_path / "red.png", tmp_path / "blue.png"
    a.write_bytes(png())
    b.write_bytes(png(noisy((30, 60, 220))))
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(server)
        page.wait_for_selector("#model option", state="attached")
        page.fill("#k", "4")
        page.set_input_files("#file", [str(a), str(b)])  # several images at once: one list each
        page.wait_for_selector("h2:has-text('blue.png')")
        assert page.locator(".results").count() == 2 and page.locator(".card").count() == 8
        assert page.locator(".prediction").count() == 0  # a classifier's answer only for a single image
        first_path = page.locator(".card .path").first.inner_text()
        assert first_path.startswith("train/") and first_path.endswith(".png")
        page.locator(".card").first.click()  # more like this
        page.wait_for_selector("h2:has-text('More like')")
        assert page.locator(".card").count() == 4
        page.fill("#label", "green")  # a label filter
        page.locator(".card").first.click()
        page.wait_for_function(
            "[...document.querySelectorAll('.card div:first-of-type')].every(d => d.textContent === 'green')"
        )
        page.fill("#label", "")
        page.fill("#minscore", "0.9999")  # a cut-off
        page.set_input_files("#file", [str(a)])
        page.wait_for_selector(".prediction")
        page.fill("#minscore", "0.99")
        page.click("#dupes")
        page.wait_for_selector("#duplicates")
        assert "groups of near-duplicates" in page.inner_text("#status")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000
