"""`fcclass runs` (list the runs of a folder), `fcclass runs compare` (their config differences, metrics and
validation curves side by side) and `fcclass runs relocate` (record where a run's data is now)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from fcclass.cli.common import JsonOpt, RunsDirOpt, _check_json_target, _emit_json, _handle_errors, _human_console, app, err_console

runs_app = typer.Typer(help="List the runs of a folder (name, data, size, epochs, accuracy, time, state); "
                            "`fcclass runs compare RUN RUN...` compares runs; `fcclass runs relocate RUN --data-root DIR` "
                            "records where a run's data is now.", invoke_without_command=True,
                       no_args_is_help=False, rich_markup_mode=None)
app.add_typer(runs_app, name="runs")


@runs_app.callback()
@_handle_errors
def runs(
    ctx: typer.Context,
    runs_dir: Path = RunsDirOpt,
    sort: str = typer.Option("started", "--sort", help="started | name | dataset | params | epochs | val_accuracy | "
                             "test_accuracy | wall_seconds | state"),
    descending: bool = typer.Option(False, "--desc", help="Sort from the largest (newest) down."),
    filters: Optional[list[str]] = typer.Option(None, "--filter", metavar="KEY=PATTERN", help="KEY=PATTERN with KEY name, dataset or state; "
                                                "shell-style patterns ('name=cnn-*'). Repeatable: all must match."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """List the runs of a folder (name, data, size, epochs, accuracy, time, state) from their summary.json files."""
    if ctx.invoked_subcommand is not None:
        return
    _check_json_target(json_out)
    from fcclass.runs.listing import count_runs, list_runs

    rows = list_runs(runs_dir, filters, sort, descending)
    if json_out != "-":
        from fcclass.cli.tables import clean, damaged_lines, runs_table

        console = _human_console(json_out)
        console.print(runs_table(rows, runs_dir, total=None if not filters else count_runs(runs_dir)))
        for line in damaged_lines(rows):
            console.print(line, highlight=False)
        if not rows:
            console.print(f"No runs in '{clean(runs_dir)}'{' match the filters' if filters else ''}.", highlight=False)
    _emit_json(json_out, [r.to_dict() for r in rows])


@runs_app.command()
@_handle_errors
def compare(
    runs: list[str] = typer.Argument(..., metavar="RUN...", help="Run directories, or run names in --runs-dir."),
    out: Path = typer.Option(Path("compare.png"), "--out", "-o", help="The PNG of their validation curves, overlaid."),
    runs_dir: Path = RunsDirOpt,
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Compare runs: the config keys that differ, the metrics side by side, their validation curves in one PNG."""
    _check_json_target(json_out)
    from fcclass.runs.listing import config_differences, resolve_runs, run_row
    from fcclass.runs.plots import plot_comparison

    paths = resolve_runs(runs, runs_dir)
    diffs, bad_configs = config_differences(paths)
    rows = [run_row(p) for p in paths]
    for row, path in zip(rows, paths, strict=True):
        row.damaged = row.damaged or bad_configs.get(path)
    figure = plot_comparison(paths, out)
    if json_out != "-":
        from fcclass.cli.tables import compare_tables, damaged_lines

        console = _human_console(json_out)
        for table in compare_tables(rows, diffs):
            console.print(table)
        for line in damaged_lines(rows):
            console.print(line, highlight=False)
        console.print(f"Wrote [bold]{escape(str(figure))}[/bold] (validation accuracy and loss per epoch, overlaid)", highlight=False)
    else:
        err_console.print(f"Wrote {escape(str(figure))}", highlight=False)
    _emit_json(json_out, {"runs": [r.to_dict() for r in rows], "config_differences": {k: v for k, v in diffs},
                          "figure": str(figure)})


@runs_app.command()
@_handle_errors
def relocate(
    run: str = typer.Argument(..., metavar="RUN", help="A run directory, or a run name in --runs-dir."),
    data_root: str = typer.Option(..., "--data-root", help="Where the run's data is now: the image folder (data.path) for "
                                  "imagefolder runs, the dataset root (data.root) for torchvision sets, the folder or "
                                  "s3://bucket/prefix for packed datasets (shards)."),
    runs_dir: Path = RunsDirOpt,
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Record where a run's data is now, after it moved: checks that the new place holds the run's recorded splits
    unchanged, then rewrites the run's records, so eval, predict and train --resume find it without --data-root."""
    _check_json_target(json_out)
    from fcclass.runs.listing import resolve_run
    from fcclass.runs.relocate import relocate as record_place

    moved = record_place(resolve_run(run, runs_dir), data_root)
    if json_out != "-":
        console = _human_console(json_out)
        checked = f"the {moved.checked:,} images of its recorded splits are there, unchanged"
        if moved.rewritten:
            console.print(f"Relocated [bold]{escape(moved.run_dir)}[/bold]: {moved.key} {escape(moved.old)} → {escape(moved.new)} "
                          f"({checked}). Rewrote {', '.join(moved.rewritten)}; eval, predict and train --resume now find the "
                          "data there without --data-root.", highlight=False)
        else:
            console.print(f"[bold]{escape(moved.run_dir)}[/bold] already records {moved.key} {escape(moved.new)} ({checked}); "
                          "nothing to change.", highlight=False)
    _emit_json(json_out, moved.to_dict())
