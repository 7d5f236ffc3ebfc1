"""`fcclass report`: one self-contained HTML page per run (``write_report``) or per comparison of two runs, from the
same evaluation pass and numbers as `fcclass eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def default_output(run_dir: Path, split: str, compare_with: Path | None = None) -> Path:
    """Where the report goes without -o: report.html in the run (report-val.html for the validation split,
    compare-OTHER.html for a comparison)."""
    from fcclass.runs.layout import REPORT

    suffix = "" if split == "test" else f"-{split}"
    if compare_with is not None:
        return run_dir / f"compare-{compare_with.name}{suffix}.html"
    return run_dir / REPORT.replace(".html", f"{suffix}.html")


def write_report(run: str | Path | None = None, out: str | Path | None = None, *, split: str = "test", compare: str | Path | None = None,
                 runs_dir: str | Path = "runs", data_root: str | Path | None = None, device: str = "auto",
                 allow_changed_data: bool = False, progress: Any = None, evaluated: Any = None) -> tuple[Path, Any]:
    """Write the page of ``run`` (default: the newest trained run) on ``split``, or of it beside ``compare``; returns
    the file and the evaluation of ``run`` (an EvalReport). ``evaluated``: ``run``'s evaluation when already made
    (what fcclass.inference.evaluate.evaluate_split returned)."""
    from fcclass.report.build import gather
    from fcclass.report.page import NAV, page, write_page
    from fcclass.report.sections import run_sections

    options = {"split": split, "runs_dir": runs_dir, "data_root": data_root, "device": device, "allow_changed_data": allow_changed_data,
               "progress": progress}
    data = gather(run, **options, evaluated=evaluated)
    if compare is None:
        text = page(f"{data.name}: fcclass report", run_sections(data), NAV)
        target = Path(out) if out is not None else default_output(data.run_dir, split)
    else:
        from fcclass.report.compare import COMPARE_NAV, compare_sections

        other = gather(compare, **{**options, "data_root": None})
        text = page(f"{data.name} vs {other.name}: fcclass report", compare_sections(data, other), COMPARE_NAV)
        target = Path(out) if out is not None else default_output(data.run_dir, split, other.run_dir)
    return write_page(text, target), data.report
