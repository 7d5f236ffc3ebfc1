"""`fcclass report`: one self-contained HTML page per run, or per comparison of two runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from fcclass.cli.common import AllowChangedOpt, DataRootOpt, DeviceOpt, RunsDirOpt, _console, _handle_errors, _print_notes, app


@app.command()
@_handle_errors
def report(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory (default: the newest trained run in --runs-dir)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The HTML file to write (default: report.html in the run; "
                                                                 "compare-OTHER.html with --compare)."),
    split: str = typer.Option("test", "--split", help="test | val (the split recorded when the run was trained)"),
    compare: Optional[Path] = typer.Option(None, "--compare", help="A second run, shown beside the first on the same split."),
    open_: bool = typer.Option(False, "--open", help="Open the page in the default web browser when written."),
    runs_dir: Path = RunsDirOpt,
    data_root: Optional[str] = DataRootOpt,
    allow_changed_data: bool = AllowChangedOpt,
    device: str = DeviceOpt,
) -> None:
    """Write one HTML page that shows how a model does (metrics, per-label table, confusion matrix, misclassified images,
    reliability, precision-recall, training curves, config), or how two compare (--compare); it works offline."""
    written(run_dir, out, split, compare, open_, runs_dir=runs_dir, data_root=data_root, allow_changed_data=allow_changed_data,
            device=device)


def written(run_dir: Optional[Path], out: Optional[Path], split: str, compare: Optional[Path], open_: bool, **options: Any) -> Any:
    """Write the report and say where (and its size); ``fcclass eval --html`` calls this too. Returns the evaluation."""
    from fcclass.report import write_report
    from fcclass.training.callbacks import DecodeProgress

    console = _console()
    path, evaluation = write_report(run_dir, out, split=split, compare=compare, progress=DecodeProgress(console), **options)
    _print_notes(console, evaluation.notes)
    console.print(f"Wrote the report: [bold]{escape(str(path))}[/bold] ({path.stat().st_size / 1e6:.2f} MB, self-contained: "
                  "open it in any browser, offline)", highlight=False)
    if open_:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return evaluation
