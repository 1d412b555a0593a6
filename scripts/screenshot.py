"""The README's picture of the web page: a running service, Debian's chromium, one search.

python scripts/screenshot.py http://127.0.0.1:8000 QUERY_IMAGE docs/webpage.png
"""

import shutil
import sys

from playwright.sync_api import sync_playwright

url, query, out = sys.argv[1:4]
args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=args)
    page = browser.new_page(viewport={"width": 1000, "height": 760})
    page.goto(url)
    page.wait_for_selector("#model option", state="attached")
    page.fill("#k", "8")
    page.set_input_files("#file", [query])
    page.wait_for_selector(".card img")
    page.wait_for_timeout(1500)  # thumbnails
    page.screenshot(path=out)
    browser.close()
