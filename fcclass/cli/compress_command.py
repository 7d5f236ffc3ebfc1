"""`fcclass compress`: prune, fine-tune and quantize a trained run into a new run, with a before/after table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from fcclass.cli.common import (
    DataRootOpt,
    JsonOpt,
    RunsDirOpt,
    SetOpt,
    _check_json_target,
    _emit_json,
    _handle_errors,
    _human_console,
    _print_notes,
    app,
    err_console,
)


@app.command()
@_handle_errors
def compress(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory (default: the newest trained run in --runs-dir)."),
    prune: Optional[float] = typer.Option(None, "--prune", help="Remove this fraction (0-1) of the Dense weights by magnitude; with --structured, of the "
                                                                "units (and filters)."),
    structured: bool = typer.Option(False, "--structured", help="Remove whole Dense units (with --conv, Conv2D filters too) and rebuild a smaller model."),
    conv: bool = typer.Option(False, "--conv", help="Prune Conv2D layers as well as Dense ones."),
    finetune: int = typer.Option(0, "--finetune", min=0, metavar="EPOCHS", help="Train the pruned model this many epochs (the run's optimizer at a tenth of "
                                                                                "its learning rate; --set changes it)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: ONNX Runtime static quantization (QDQ, per-channel weights), calibrated on "
                                                                    "training images."),
    calibration: int = typer.Option(1000, "--calibration", min=1, help="Training images that calibrate the int8 ranges and rank units for --structured."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Latency: time each model this many rounds and keep the median."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The new run directory (default: RUNS/<name>-compressed-<time> beside the run)."),
    set_: Optional[list[str]] = SetOpt,
    json_out: Optional[str] = JsonOpt,
    runs_dir: Path = RunsDirOpt,
    data_root: Optional[str] = DataRootOpt,
) -> None:
    """Make a smaller, faster copy of a trained run: pruning, fine-tuning, int8; measured before and after."""
    _check_json_target(json_out)
    from fcclass.compress.run import CompressInterrupted, Options
    from fcclass.compress.run import compress as run_compress
    from fcclass.training.callbacks import DecodeProgress

    console = _human_console(json_out)
    options = Options(prune, structured, conv, finetune, quantize, calibration, rounds)
    try:
        result = run_compress(run_dir, options, out=out, runs_dir=runs_dir, data_root=data_root, overrides=set_ or [],
                              console=console, progress=DecodeProgress(console))
    except CompressInterrupted as e:
        err_console.print(f"[yellow]{escape(str(e))}[/yellow]", highlight=False)
        raise typer.Exit(130) from None
    _print_notes(console, result.notes)
    if json_out != "-":
        console.print(compress_table(result))
        for name, (before, after) in result.pruned_layers.items():
            what = "filters" if name in result.conv_layers else "units"
            console.print(f"  {escape(name)}: {before} -> {after} {what}", highlight=False)
        console.print(f"Wrote [bold]{escape(result.run_dir)}[/bold]. Next: fcclass eval {escape(result.run_dir)}", highlight=False)
    _emit_json(json_out, result.to_dict())


def compress_table(result: Any) -> Any:
    from rich.table import Table

    table = Table(title="Before and after", caption=_caption(result))
    for name, justify in (("Model", "left"), ("Runtime", "left"), ("File", "right"), ("Parameters (non-zero)", "right"),
                          ("Test accuracy", "right"), ("ms/image, batch 1", "right"), ("ms/image, batch 256", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in result.rows:
        nonzero = f"{row.nonzero_parameters:,}" + (f" of {row.parameters:,}" if row.nonzero_parameters != row.parameters else "")
        accuracy = f"{100 * row.test_accuracy:.2f}%" if row.test_accuracy is not None else "-"
        size = "-" if row.file.startswith("(") else _size(row.file_bytes)
        table.add_row(row.model, row.runtime, size, nonzero, accuracy, f"{row.latency_ms_batch1:.3f}", f"{row.latency_ms_batch256:.4f}")
    return table


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _caption(result: Any) -> str:
    c = result.change()
    return (f"Last row against the first: {c['smaller_on_disk']:.2f}x smaller on disk, {c['faster_batch1']:.2f}x faster at "
            f"batch 1, {c['faster_batch256']:.2f}x at batch 256, {c['accuracy_points']:+.2f} points of test accuracy "
            f"({result.threads} CPU thread(s); the run's test split, {result.test_images:,} images).")
