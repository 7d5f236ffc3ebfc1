"""`fcclass report`'s pages in a real browser (Debian's chromium driven by Playwright, as tests/test_serve_browser.py):
opened from disk they load with no failed request, no request off the file itself, no console error, every image
rendered, every section there; the table sorts and the gallery filters. The run's screenshot goes to
$FCCLASS_REPORT_SCREENSHOT when set (the README's docs/report.png is made so), else to the test's temporary folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_fashion, small_config
from test_report import SECTIONS

from fcclass.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("FCCLASS_REQUIRE_BROWSER") == "1"  # set by CI (.ci/run): a missing chromium fails instead of skipping
pytestmark = [
    needs_fashion,
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None and not REQUIRED, reason="Debian's chromium is not installed (apt-get install chromium; setup.sh installs it)"),
]


def _playwright() -> Any:
    assert CHROMIUM is not None, "FCCLASS_REQUIRE_BROWSER=1 but chromium is not installed (apt-get install chromium)"
    if REQUIRED:
        from playwright.sync_api import sync_playwright

        return sync_playwright
    return pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')").sync_playwright


def _open(pw: Any, path: Path, screenshot: Path | None = None) -> Any:
    """Open ``path`` from disk; returns the page after checking what every report must be."""
    browser = pw.chromium.launch(executable_path=CHROMIUM)
    page = browser.new_page(viewport={"width": 1280, "height": 1450})  # the screenshot: header, metrics, per-label table, matrices
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else problems.append(f"request: {r.url}"))
    page.goto(path.absolute().as_uri())
    page.wait_for_load_state("load")
    assert problems == []
    assert page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length") == 0
    assert page.evaluate("document.images.length") > 0
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=False)
    return browser, page


def test_the_report_loads_offline_with_every_section_image_and_control(trained_run: Path, tmp_path: Path) -> None:
    sync_playwright = _playwright()
    run = Path(os.environ.get("FCCLASS_REPORT_RUN") or trained_run)  # the README's screenshot shows a fully trained run
    out, evaluation = write_report(run, tmp_path / "report.html", device="cpu")
    screenshot = Path(os.environ.get("FCCLASS_REPORT_SCREENSHOT") or tmp_path / "report.png")
    with sync_playwright() as pw:
        browser, page = _open(pw, out, screenshot)
        assert page.locator("h2").all_inner_texts() == SECTIONS
        assert page.inner_text('[data-key="accuracy"]') == f"{evaluation.accuracy:.2%}"
        page.click('#per-label-table th:has-text("F1")')  # sorted by F1: lowest first, then highest first
        f1s = [float(v) for v in page.locator("#per-label-table tbody tr td:nth-child(4)").evaluate_all("tds => tds.map(t => t.dataset.v)")]
        assert f1s == sorted(f1s)
        page.click('#per-label-table th:has-text("F1")')
        f1s = [float(v) for v in page.locator("#per-label-table tbody tr td:nth-child(4)").evaluate_all("tds => tds.map(t => t.dataset.v)")]
        assert f1s == sorted(f1s, reverse=True)
        shirts = page.locator('#gallery figure[data-true="Shirt"]').count()
        page.select_option("#gallery-filter", "Shirt")
        assert page.locator("#gallery figure:visible").count() == shirts > 0
        assert not page.locator("details pre").is_visible()  # the config is collapsed until asked for
        page.click("details summary")
        assert "layers:" in page.inner_text("details pre")
        browser.close()
    assert screenshot.stat().st_size > 10_000


def test_the_comparison_page_loads_offline_with_both_runs(trained_run: Path, tmp_path: Path) -> None:
    sync_playwright = _playwright()
    from fcclass.training.fit import fit

    other = fit(small_config(tmp_path, **{"train.epochs": 1, "data.limit_train": 1000, "name": "other"})).run_dir
    out, _ = write_report(trained_run, tmp_path / "compare.html", compare=other, device="cpu")
    with sync_playwright() as pw:
        browser, page = _open(pw, out)
        assert page.locator("h2").all_inner_texts() == ["Metrics", "Per-label F1", "Confusion matrices", "Right in one, wrong in the other",
                                                        "Training curves", "Config differences"]
        assert page.locator("table.confusion").count() == 2
        diff = page.inner_text("#config-diff")
        assert "train.epochs" in diff and "data.limit_train" in diff
        assert "A right, B wrong" in page.inner_text("#disagreements")
        browser.close()


@pytest.mark.slow
def test_the_serve_page_links_the_report(trained_run: Path, tmp_path: Path) -> None:
    """`fcclass serve` on a run with a report: its page shows a link to it, and the link opens the report."""
    sync_playwright = _playwright()
    from serve_support import ServeProcess

    run = Path(shutil.copytree(trained_run, tmp_path / trained_run.name))
    write_report(run, device="cpu")
    server = ServeProcess.start(str(run))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page()
            page.goto(server.url + "/")
            page.click("#report-link")
            page.wait_for_selector("h2:has-text('Misclassified images')")
            assert page.url == server.url + "/report"
            browser.close()
    finally:
        status, out = server.stop()
    assert status == 0, out
