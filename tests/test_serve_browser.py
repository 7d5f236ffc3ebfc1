"""The page of `fcclass serve` in a real browser: Debian's chromium, driven by Playwright (``playwright install``
cannot download here, so Playwright launches the system's browser). An image picked in the file input, and images
dropped on the page, show the label `fcclass predict` gives. The screenshot goes to $FCCLASS_SERVE_SCREENSHOT when
set (the README's docs/serve.png is made so), else to the test's temporary folder."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
from conftest import needs_fashion
from serve_support import SAMPLES, ServeProcess

from fcclass.inference.predict import predict

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI (.ci/run) sets FCCLASS_REQUIRE_BROWSER=1: there a missing chromium fails the test instead of skipping it.
REQUIRED = os.environ.get("FCCLASS_REQUIRE_BROWSER") == "1"
pytestmark = [
    needs_fashion,
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None and not REQUIRED, reason="Debian's chromium is not installed (apt-get install chromium; setup.sh installs it)"),
]

DROP = """([names, datas]) => {
    const transfer = new DataTransfer();
    names.forEach((name, i) => {
        const bytes = Uint8Array.from(atob(datas[i]), (c) => c.charCodeAt(0));
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
    });
    document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
}"""


def test_the_page_shows_the_label_of_picked_and_dropped_images(trained_run: Path, clothes_folder: Path, tmp_path: Path) -> None:
    assert CHROMIUM is not None, "FCCLASS_REQUIRE_BROWSER=1 but chromium is not installed (apt-get install chromium)"
    if REQUIRED:
        from playwright.sync_api import sync_playwright
    else:
        sync_playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')").sync_playwright
    dropped = SAMPLES + sorted(clothes_folder.rglob("*.png"))[::60]  # 3 gray and 3 RGB Fashion-MNIST PNGs
    run = Path(os.environ.get("FCCLASS_SERVE_RUN") or trained_run)  # the README's screenshot shows a fully trained run
    want = {Path(p.path).name: p.label for p in predict(dropped, run, device="cpu")}
    server = ServeProcess.start(str(run.absolute()))
    screenshot = Path(os.environ.get("FCCLASS_SERVE_SCREENSHOT") or tmp_path / "serve.png")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1000, "height": 720})
            page.goto(server.url + "/")
            page.wait_for_selector("#model:has-text('10 labels')")
            page.set_input_files("#files", str(SAMPLES[0]))  # picked with the file input
            page.wait_for_selector(".result .label")
            assert page.inner_text(".result .label") == want[SAMPLES[0].name]
            page.evaluate(DROP, [[f.name for f in dropped], [base64.b64encode(f.read_bytes()).decode() for f in dropped]])
            page.wait_for_function(f"document.querySelectorAll('.result .label').length === {len(dropped)}")
            names = page.locator(".result .name").all_inner_texts()
            labels = page.locator(".result .label").all_inner_texts()
            assert dict(zip(names, labels)) == want
            assert page.locator(".result").first.locator(".bar").count() == 5  # the top 5 as bars
            assert f"{len(dropped)} image(s) in" in page.inner_text("#status")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            browser.close()
    finally:
        status, out = server.stop()
    assert status == 0, out
    assert screenshot.stat().st_size > 10_000


def test_with_an_api_key_the_page_opens_with_the_key_in_its_url_and_sends_it(trained_run: Path) -> None:
    """--api-key: the page without the key is a 401; opened as /?api_key=KEY it loads the model's info and labels an
    image (its calls carry the key as the X-API-Key header)."""
    assert CHROMIUM is not None, "FCCLASS_REQUIRE_BROWSER=1 but chromium is not installed (apt-get install chromium)"
    if REQUIRED:
        from playwright.sync_api import sync_playwright
    else:
        sync_playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')").sync_playwright
    want = predict([SAMPLES[0]], trained_run, device="cpu")[0].label
    server = ServeProcess.start(str(trained_run.absolute()), "--api-key", "k-42")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page()
            assert page.goto(server.url + "/").status == 401
            assert page.goto(server.url + "/?api_key=k-42").status == 200
            page.wait_for_selector("#model:has-text('10 labels')")
            page.set_input_files("#files", str(SAMPLES[0]))
            page.wait_for_selector(".result .label")
            assert page.inner_text(".result .label") == want
            browser.close()
    finally:
        status, out = server.stop()
    assert status == 0, out
