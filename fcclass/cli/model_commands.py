"""`fcclass eval`, `predict`, `summary`, `plot` and `export`: what a trained model (or a config) gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from fcclass.cli.common import (
    AllowChangedOpt,
    ConfigOpt,
    DataRootOpt,
    DeviceOpt,
    JsonOpt,
    RunsDirOpt,
    SetOpt,
    _check_json_target,
    _console,
    _emit_json,
    _handle_errors,
    _human_console,
    _print_notes,
    _write_file,
    app,
    err_console,
)
from fcclass.errors import FcclassError


@app.command("eval")
@_handle_errors
def eval_(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory (default: the newest trained run in --runs-dir)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Evaluate this checkpoint file instead of a run."),
    split: str = typer.Option("test", "--split", help="test | val (the split recorded when the run was trained)"),
    normalize: bool = typer.Option(False, "--normalize", help="Show the confusion matrix as fractions of each true label."),
    misclassified: int = typer.Option(0, "--misclassified", min=0, max=400, help="Save a PNG grid of N (at most 400) misclassified images."),
    save: bool = typer.Option(True, "--save/--no-save", help="Write eval.json and confusion_matrix.png beside the checkpoint."),
    html: bool = typer.Option(False, "--html", help="Also write the HTML report of this evaluation (report.html beside the checkpoint; "
                                                    "see `fcclass report`)."),
    json_out: Optional[str] = JsonOpt,
    runs_dir: Path = RunsDirOpt,
    data_root: Optional[str] = DataRootOpt,
    allow_changed_data: bool = AllowChangedOpt,
    device: str = DeviceOpt,
) -> None:
    """Evaluate the best checkpoint: per-label accuracy, precision, F1, confusion matrix, most confused pairs."""
    _check_json_target(json_out)
    from fcclass.inference.evaluate import evaluate_split
    from fcclass.training.callbacks import DecodeProgress

    console = _human_console(json_out)
    report, images = evaluate_split(run_dir, checkpoint, split=split, runs_dir=runs_dir, data_root=data_root, device=device,
                                    save=save, misclassified=misclassified, allow_changed_data=allow_changed_data,
                                    progress=DecodeProgress(console))
    if html:
        from fcclass.report import write_report

        page, _ = write_report(split=split, evaluated=(report, images))
        report.files["report"] = str(page)
    _print_notes(console, report.notes)
    if json_out != "-":
        from fcclass.cli.tables import confused_pairs_table, confusion_table, eval_table

        console.print(f"Checkpoint: [bold]{escape(report.checkpoint)}[/bold]", highlight=False)
        console.print(eval_table(report))
        if len(report.class_names) <= 20:
            console.print(confusion_table(report, normalize))
        console.print(confused_pairs_table(report))
        for what, path in report.files.items():
            console.print(f"Wrote {what.replace('_', ' ')}: [bold]{escape(path)}[/bold]", highlight=False)
    _emit_json(json_out, report.to_dict())


@app.command()
@_handle_errors
def predict(
    images: Optional[list[str]] = typer.Argument(None, metavar="[IMAGES]...", help="Image files, folders (searched recursively) or glob patterns."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run directory (default: the newest trained run)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Use this checkpoint file."),
    split: Optional[str] = typer.Option(None, "--split", help="Instead of IMAGES: every image of the run's recorded train, val or test split, with its true "
                                                              "label."),
    top_k: int = typer.Option(3, "--top-k", "-k", help="How many labels to show per image."),
    json_out: Optional[str] = JsonOpt,
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Also write the predictions as CSV to FILE."),
    json_summary: bool = typer.Option(False, "--json-summary", help='With --json: write {"predictions": [...], "summary": {...}} '
                                                                    "instead of the list of predictions alone."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per forward pass."),
    runs_dir: Path = RunsDirOpt,
    data_root: Optional[str] = DataRootOpt,
    allow_changed_data: bool = AllowChangedOpt,
    device: str = DeviceOpt,
) -> None:
    """Predict the label of images with the preprocessing used in training. Exit status 1 if any image failed."""
    _check_json_target(json_out)
    if top_k < 1:
        raise FcclassError("--top-k must be at least 1.")
    if bool(images) == (split is not None):
        raise FcclassError("Give image files, folders or patterns to predict, or --split train|val|test for a split the run "
                           "recorded (not both).")
    from fcclass.runs.layout import is_run_dir

    for item in images or []:
        if is_run_dir(Path(item)):  # eval and export take RUN this way
            raise FcclassError(f"'{item}' is a run directory, not a folder of images to predict; give it with --run: "
                               f"fcclass predict IMAGES --run {item}")
    from fcclass.cli.tables import predict_summary_line, predict_table
    from fcclass.inference.load import load_for_inference
    from fcclass.inference.predict import predict_split_with_summary, predict_with_summary, predictions_csv

    model = load_for_inference(run, checkpoint, runs_dir=runs_dir, device=device)
    console = _human_console(json_out, csv_out)
    _print_notes(console, [model.note] if model.note else [])
    if split is not None:
        preds, outcome = predict_split_with_summary(split, top_k=top_k, batch_size=batch_size, data_root=data_root,
                                                    allow_changed_data=allow_changed_data, model=model)
    else:
        preds, outcome = predict_with_summary(images or [], top_k=top_k, batch_size=batch_size, model=model)
    _print_notes(console, outcome.notes)
    shown = max((len(p.top_k) for p in preds), default=1) or 1
    if json_out != "-":
        console.print(predict_table(preds, shown))
    if csv_out is not None:
        _write_file(csv_out, predictions_csv(preds, shown), "CSV")
    listed = [p.to_dict() for p in preds]
    _emit_json(json_out, {"predictions": listed, "summary": outcome.to_dict()} if json_summary else listed)
    console.print(escape(predict_summary_line(outcome, split)), highlight=False)
    failed = [p for p in preds if p.error is not None]
    if failed:
        err_console.print(f"[red]{len(failed)} of {len(preds)} input(s) could not be predicted.[/red]")
        raise typer.Exit(1)


@app.command()
@_handle_errors
def summary(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Print the model's layers, output shapes and parameter counts (Keras-style)."""
    _check_json_target(json_out)
    from fcclass.config.load import load_config

    cfg = load_config(config, set_)
    from fcclass.data import describe
    from fcclass.model.network import build_model

    if cfg.model.input_shape is not None:
        input_shape = list(cfg.model.input_shape)
        num_classes = _num_classes_without_data(cfg) or _num_classes_from_data(cfg)
    else:
        shape, num_classes = describe(cfg.data)
        input_shape = list(shape)

    plan = build_model(cfg.model, input_shape, num_classes, device="meta")  # shapes and counts: no weights allocated
    result = plan.summary()
    if json_out != "-":
        from fcclass.errors import ModelError
        from fcclass.memory import check_training
        from fcclass.training.console import summary_table

        _console().print(summary_table(result, title=f"Model: {cfg.name}"))
        try:
            check_training(plan, cfg.data.batch_size)
        except ModelError as e:
            _console().print(f"[yellow]Note: {escape(str(e))}[/yellow]", highlight=False)
    _emit_json(json_out, result.to_dict())


@app.command()
@_handle_errors
def plot(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory (default: the newest trained run in --runs-dir)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output PNG (default: RUN_DIR/curves.png); '-' for stdout."),
    runs_dir: Path = RunsDirOpt,
) -> None:
    """Redraw a run's training curves: loss and accuracy (train vs val) and the learning rate per epoch."""
    from fcclass.files import is_stdout
    from fcclass.runs.checkpoint import newest_trained_run
    from fcclass.runs.plots import plot_curves

    to_stdout = out is not None and is_stdout(out)
    path = plot_curves(run_dir if run_dir is not None else newest_trained_run(runs_dir)[0], _stdout_path(out))
    (err_console if to_stdout else _console()).print(f"Wrote [bold]{escape(str(path))}[/bold]", highlight=False)


@app.command()
@_handle_errors
def export(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory (default: the newest trained run in --runs-dir)."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx | torchscript"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Export this checkpoint file instead of a run's best."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: RUN_DIR/model.onnx or model.torchscript.pt); '-' for stdout."),
    runs_dir: Path = RunsDirOpt,
) -> None:
    """Export the best checkpoint as a deployable model (pixels in [0, 1] in, probabilities out) plus a JSON description."""
    from fcclass.files import is_stdout
    from fcclass.inference.export import export_model

    console = err_console if out is not None and is_stdout(out) else _console()  # the model itself may be going to stdout
    done = export_model(run_dir, checkpoint, fmt=fmt, out=_stdout_path(out), runs_dir=runs_dir)
    _print_notes(console, [done.note] if done.note else [])
    model, sidecar = escape(str(done.model)), escape(str(done.description))
    if done.model in done.written:
        described = f" and [bold]{sidecar}[/bold] (class names, input shape, preprocessing)" if done.description else ""
        console.print(f"Wrote [bold]{model}[/bold]{described}", highlight=False)
        return
    said = "written again (it was missing)" if done.description in done.written else "beside it"
    console.print(f"Nothing rewritten: [bold]{model}[/bold] is this run's model, the int8 ONNX file `fcclass compress` made, "
                  f"deployable as it is; its description (class names, input shape, preprocessing) is [bold]{sidecar}[/bold], "
                  f"{said}. -o FILE copies both elsewhere.", highlight=False)


def _stdout_path(out: Path | None) -> Path | None:
    return Path("/dev/stdout") if out is not None and str(out) == "-" else out


def _num_classes_from_data(cfg: Any) -> int:
    from fcclass.data import describe
    from fcclass.errors import DataError

    try:
        return describe(cfg.data)[1]
    except DataError as e:
        raise FcclassError(f"The summary needs the number of labels, which the last Dense layer does not give (no units), so "
                           f"it looked at the data: {e} Give the last Dense layer its units (e.g. --set model.layers.-1.units=10), "
                           "or make the dataset reachable.") from None


def _num_classes_without_data(cfg: Any) -> int | None:
    """The class count when the last Dense states it, so `summary` needs no dataset."""
    from fcclass.config.layers import Dense

    dense = [layer for layer in cfg.model.layers if isinstance(layer, Dense)]
    return dense[-1].units if dense and dense[-1].units else None
