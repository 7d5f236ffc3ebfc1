"""`fcclass report`: the page's numbers are `fcclass eval --json`'s; ECE and average precision agree with
scikit-learn; the page is one file with every section, no outside reference, and stays small. (In a real browser:
tests/test_report_browser.py.)"""

from __future__ import annotations

import json
import re
import shutil
from html import unescape
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_fashion
from typer.testing import CliRunner

from fcclass.cli import app
from fcclass.inference.evaluate import compute_report

runner = CliRunner(env={"COLUMNS": "200"})
SECTIONS = ["Metrics", "Per-label table", "Confusion matrix", "Misclassified images", "Reliability", "Precision–recall",
            "Training curves", "Config"]


def _random_logits(seed: int = 0, k: int = 7, n: int = 800) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) * 1.5 + 2.0 * np.eye(k)[labels] * (rng.random(n) < 0.7)[:, None]
    return torch.tensor(logits, dtype=torch.float32), torch.tensor(labels)


def test_ece_and_average_precision_agree_with_scikit_learn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the reference (pip install -e '.[dev]')")
    from sklearn.calibration import calibration_curve

    logits, labels = _random_logits()
    report = compute_report(logits, labels, [f"c{i}" for i in range(7)])
    probs = torch.softmax(logits.double(), 1).numpy()
    y = labels.numpy()
    for i in range(7):
        want = sklearn_metrics.average_precision_score(y == i, probs[:, i])
        assert report.per_class[f"c{i}"]["average_precision"] == pytest.approx(want, abs=2e-6)
    assert report.macro["average_precision"] == pytest.approx(np.mean([sklearn_metrics.average_precision_score(y == i, probs[:, i])
                                                                       for i in range(7)]), abs=2e-6)
    confidence, correct = probs.max(1), probs.argmax(1) == y
    accuracy_per_bin, confidence_per_bin = calibration_curve(correct, confidence, n_bins=15, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 16)[1:-1], confidence), minlength=15)  # scikit-learn's binning
    ece = np.sum(counts[counts > 0] / len(y) * np.abs(accuracy_per_bin - confidence_per_bin))
    assert report.calibration_error == pytest.approx(ece, abs=2e-6)
    assert 0.02 < report.calibration_error < 0.5


def _page_numbers(html: str) -> dict[str, str]:
    return {k: unescape(v) for k, v in re.findall(r'data-key="([^"]+)">([^<]*)<', html)}


def _per_label_rows(html: str) -> dict[str, list[str]]:
    table = html.split('id="per-label-table"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r'<tr data-label="([^"]+)">(.*?)</tr>', table)
    return {unescape(name): re.findall(r"<td[^>]*>([^<]*)</td>", cells)[1:] for name, cells in rows}


@needs_fashion
def test_the_report_shows_eval_json_numbers_in_one_small_self_contained_file(trained_run: Path, tmp_path: Path) -> None:
    evaluated = runner.invoke(app, ["eval", str(trained_run), "--json", "-", "--no-save", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    want = json.loads(evaluated.stdout)
    out = tmp_path / "page" / "report.html"
    result = runner.invoke(app, ["report", str(trained_run), "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Wrote the report" in result.output and "MB" in result.output
    html = out.read_text(encoding="utf-8")
    shown = _page_numbers(html)
    assert shown["accuracy"] == f"{want['accuracy']:.2%}"
    for avg in ("macro_avg", "weighted_avg"):
        for m in ("precision", "recall", "f1"):
            assert shown[f"{avg}.{m}"] == f"{want[avg][m]:.2%}"
    assert shown["top5_accuracy"] == f"{want['top5_accuracy']:.2%}"
    assert shown["log_loss"] == f"{want['log_loss']:.4f}" == f"{want['loss']:.4f}"
    assert shown["expected_calibration_error"] == f"{want['expected_calibration_error']:.2%}"
    assert shown["macro_avg.average_precision"] == f"{want['macro_avg']['average_precision']:.2%}"
    rows = _per_label_rows(html)
    assert list(rows) == want["labels"]
    for name, m in want["per_class"].items():
        assert rows[name] == [f"{m['precision']:.2%}", f"{m['accuracy']:.2%}", f"{m['f1']:.2%}", f"{m['average_precision']:.2%}",
                              f"{m['support']:,}"]
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in html
    pair = want["most_confused"][0]
    assert f"<b>{pair['true']}</b> taken for <b>{pair['predicted']}</b>: {pair['count']:,}" in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing from elsewhere: images are data: URLs
    wrong = sum(want["confusion_matrix"][i][j] for i in range(10) for j in range(10) if i != j)
    assert html.count('<img src="data:image/png;base64,') == min(wrong, 120)
    assert out.stat().st_size < 1_000_000


def test_report_refuses_an_unknown_split_and_an_untrained_run(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path), "--split", "train"])
    assert result.exit_code == 1 and "--split must be test or val" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "Traceback" not in result.output


@needs_fashion
def test_eval_html_writes_the_report_beside_the_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(trained_run, tmp_path / trained_run.name))  # the shared run stays without a report
    result = runner.invoke(app, ["eval", str(run), "--html", "--no-save", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    page = run / "report.html"
    assert "Wrote report:" in result.output and page.is_file()
    assert "<h2>Misclassified images</h2>" in page.read_text(encoding="utf-8")


def test_a_10000_image_100_label_page_stays_under_5_mb() -> None:
    """The worst case the size promise covers: 100 labels (the matrices become images) and 32x32 RGB thumbnails."""
    from fcclass.report.build import GALLERY_CAP, RunData
    from fcclass.report.page import page
    from fcclass.report.sections import run_sections

    logits, labels = _random_logits(1, k=100, n=10_000)
    report = compute_report(logits, labels, [f"label {i}" for i in range(100)])
    generator = torch.Generator().manual_seed(0)
    data = RunData(Path("runs/cifar100-20261207-000000"), report, lambda idx: torch.randint(0, 256, (len(idx), 3, 32, 32), dtype=torch.uint8,
                                                                                           generator=generator))
    html = page("worst case", run_sections(data))
    assert len(html.encode()) < 5_000_000
    assert html.count("<img ") == GALLERY_CAP + 1  # the gallery, capped, and the row-normalised matrix as one image
    assert f"The {GALLERY_CAP} of" in html and "misclassified images with the highest loss" in html


def test_compare_refuses_runs_evaluated_on_other_images_or_labels() -> None:
    from fcclass.errors import FcclassError
    from fcclass.report.build import RunData
    from fcclass.report.compare import check_comparable

    def data(name: str, seed: int, n: int = 200, names: tuple[str, ...] = ("a", "b", "c")) -> RunData:
        logits, labels = _random_logits(seed, k=len(names), n=n)
        return RunData(Path("runs") / name, compute_report(logits, labels, list(names)), lambda idx: None)

    check_comparable(data("one", 0), data("two", 0))  # the same images and labels: fine
    with pytest.raises(FcclassError, match="different test splits"):
        check_comparable(data("one", 0), data("two", 1))
    with pytest.raises(FcclassError, match="different labels"):
        check_comparable(data("one", 0), data("two", 0, names=("a", "b", "d")))
