"""The `fcclass` command line: parse, call the library, render with Rich. No torch import at module level."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from fcclass.errors import FcclassError

app = typer.Typer(
    help="Train, evaluate and serve conv-pool-flatten-dense image classifiers from Keras-style YAML configs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    # Click's plain help: Typer's boxed help shows every flag with a '<bool>' value it does not take, and cuts lines at
    # 80 columns in a pipe; usage errors then read 'Error: ...' like fcclass's own.
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
)


def _console(stderr: bool = False) -> Console:
    """A Rich console. Writing to a file or pipe there is no terminal width to follow, and Rich would wrap at 80
    columns (epoch lines broken in two, labels cut short in tables): lay such output out 160 wide instead, unless
    COLUMNS says otherwise."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 160
    # soft_wrap: a message is never broken by inserted newlines (a resume command must stay one line to copy);
    # tables are still laid out to the width.
    return Console(stderr=stderr, width=width, soft_wrap=True)


err_console = _console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from fcclass import __version__

        print(f"fcclass {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print fcclass's version and exit.")) -> None:
    """Train, evaluate and serve conv-pool-flatten-dense image classifiers from Keras-style YAML configs."""

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (default: configs/fashion_mnist.yaml).")
SetOpt = typer.Option(None, "--set", help="Override a config key: dotted.key=value (value parsed as YAML). Repeatable.")
JsonOpt = typer.Option(None, "--json", help="Write the result as JSON to FILE, or '-' for stdout (then nothing else goes to stdout).")
RunsDirOpt = typer.Option(Path("runs"), "--runs-dir", help="Where runs are looked up.")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N | mps")
DataRootOpt = typer.Option(None, "--data-root", help="Where the run's data is now, if it moved: the dataset root (data.root) for "
                           "torchvision sets, the image folder (data.path) for imagefolder runs.")
AllowChangedOpt = typer.Option(False, "--allow-changed-data", help="Use the run's recorded files as they are now even if some "
                               "changed or vanished since training (vanished ones are skipped), instead of refusing.")


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FcclassError as e:
            err_console.print(f"[bold red]Error:[/bold red] [red]{escape(str(e))}[/red]", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]Interrupted.[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


def _human_console(json_target: str | None) -> Console:
    """Human output goes to stdout unless JSON does."""
    return err_console if json_target == "-" else _console()


def _check_json_target(target: str | None) -> None:
    """Fail before the work, not after it, when --json FILE cannot be written."""
    if target not in (None, "-"):
        parent = Path(target).parent
        if not parent.is_dir() or Path(target).is_dir():
            raise FcclassError(f"Cannot write JSON to '{target}': {'it is a folder' if Path(target).is_dir() else f'the folder {parent} does not exist'}.")


def _emit_json(target: str | None, data: Any) -> None:
    if target is None:
        return
    text = json.dumps(data, indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        _write_file(Path(target), text, "JSON")


def _write_file(path: Path, text: str, what: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise FcclassError(f"Cannot write {what} to '{path}': {e.strerror}. Check that the folder exists and is writable.") from None


@app.command()
@_handle_errors
def train(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a run directory from its last completed epoch, with its own config "
                                          "(--set may change only train.epochs, early stopping, device, precision, threads and data locations)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="With --resume: where the run's data is now, if it moved (the image "
                                             "folder for imagefolder runs, the dataset root otherwise)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the fully resolved config (YAML) and exit without training."),
    log_interval: float = typer.Option(10.0, "--log-interval", min=0, help="Written to a file or pipe: a progress line every N seconds during an epoch (0: none)."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Train a model from a YAML config (default: the Fashion-MNIST CNN) into runs/<name>-<timestamp>/."""
    _check_json_target(json_out)
    if resume is not None and config is not None:
        raise FcclassError(f"--resume continues '{resume}' with the config it was trained with ({resume / 'config.yaml'}), so -c/--config "
                           f"cannot be combined with it. To train {config}, leave out --resume; to change a setting of the run on "
                           "resume, use --set (see `fcclass train --help`).")
    if data_root is not None and resume is None:
        raise FcclassError("--data-root goes with --resume; for a new run set the data's place in the config "
                           "(--set data.root=DIR, or --set data.path=DIR for imagefolder).")
    if print_config:
        _print_config(_resolved_config(config, set_, resume, data_root), json_out)
        return
    from fcclass.config import load_config

    cfg = None if resume is not None else load_config(config, set_)
    from fcclass.train import RunFinished, fit

    console = _human_console(json_out)
    try:
        result = fit(cfg, resume=resume, overrides=set_ if resume is not None else None, console=console,
                     log_interval=log_interval, data_root=data_root)
    except RunFinished as e:
        console.print(f"[yellow]{escape(str(e))}[/yellow]", highlight=False)
        _emit_json(json_out, {"run_dir": str(resume), "finished": True, "message": str(e)})
        return
    for warning in result.warnings:
        err_console.print(f"[yellow]Warning: {escape(warning)}[/yellow]", highlight=False)
    if result.removed:
        raise typer.Exit(130)
    best = result.best or {}
    if best:
        from fcclass.report import best_line

        console.print(best_line(result), highlight=False)
    from fcclass.report import rounded_row

    _emit_json(json_out, {"run_dir": str(result.run_dir), "epochs": len(result.history), "best_epoch": result.best_epoch,
                          "best": rounded_row(best) if best else {}, "stopped_early": result.stopped_early,
                          "interrupted": result.interrupted is not None, "device": result.device, "precision": result.precision,
                          "history": [rounded_row(r) for r in result.history]})
    if result.interrupted:
        raise typer.Exit(130)


def _resolved_config(config: Optional[Path], set_: Optional[list[str]], run: Optional[Path], data_root: Optional[Path] = None) -> Any:
    """The config a command would use: a run's (with resume's --set), or -c/--set (default: the shipped default)."""
    if run is not None:
        from fcclass.train import resume_config

        return resume_config(run, set_ or [], data_root)
    from fcclass.config import load_config

    return load_config(config, set_)


def _print_config(cfg: Any, json_out: Optional[str]) -> None:
    if json_out is not None:
        _emit_json(json_out, cfg.to_dict())
    if json_out != "-":
        sys.stdout.write(cfg.to_yaml())


@app.command("config")
@_handle_errors
def config_(
    run_dir: Optional[Path] = typer.Argument(None, help="A run directory: print the config it was trained with."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Print a fully resolved config (every key, defaults filled in): of -c/--set, or of a run directory."""
    _check_json_target(json_out)
    if run_dir is not None and config is not None:
        raise FcclassError("Give either a run directory or -c/--config, not both.")
    if run_dir is not None and set_:
        raise FcclassError("--set does not apply to a run's config; to see what a resume would use: fcclass train --resume RUN --set ... --print-config.")
    if run_dir is not None:
        from fcclass.runs import run_config

        _print_config(run_config(run_dir), json_out)
    else:
        _print_config(_resolved_config(config, set_, None), json_out)


@app.command()
@_handle_errors
def init(
    directory: Path = typer.Argument(Path("."), help="Folder to write the config into (created if needed)."),
    template: str = typer.Option("fashion_mnist", "--template", "-t", help="Which shipped config to start from (see the list in the error for an unknown name)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write an editable starter config (a commented copy of a shipped config) and say how to train it."""
    from fcclass.config import shipped_configs

    configs = shipped_configs()
    if template not in configs:
        raise FcclassError(f"Unknown --template '{template}': the shipped configs are {', '.join(sorted(configs))}.")
    target = directory / f"{template}.yaml"
    if target.exists() and not force:
        raise FcclassError(f"'{target}' already exists; pass --force to overwrite it, or choose another folder.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FcclassError(f"Cannot create '{directory}': {e.strerror}.") from None
    _write_file(target, configs[template].read_text(encoding="utf-8"), "the config")
    console = _console()
    console.print(f"Wrote [bold]{escape(str(target))}[/bold]. Edit it, then:", highlight=False)
    console.print(f"  fcclass summary -c {escape(str(target))}\n  fcclass train -c {escape(str(target))}", highlight=False)


@app.command("eval")
@_handle_errors
def eval_(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory (default: the newest trained run in --runs-dir)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Evaluate this checkpoint file instead of a run."),
    split: str = typer.Option("test", "--split", help="test | val (the split recorded when the run was trained)"),
    normalize: bool = typer.Option(False, "--normalize", help="Show the confusion matrix as fractions of each true label."),
    misclassified: int = typer.Option(0, "--misclassified", min=0, help="Save a PNG grid of N misclassified images."),
    save: bool = typer.Option(True, "--save/--no-save", help="Write eval.json and confusion_matrix.png beside the checkpoint."),
    json_out: Optional[str] = JsonOpt,
    runs_dir: Path = RunsDirOpt,
    data_root: Optional[Path] = DataRootOpt,
    allow_changed_data: bool = AllowChangedOpt,
    device: str = DeviceOpt,
) -> None:
    """Evaluate the best checkpoint: per-label accuracy, precision, F1, confusion matrix, most confused pairs."""
    _check_json_target(json_out)
    from fcclass.evaluation import evaluate

    report = evaluate(run_dir, checkpoint, split=split, runs_dir=runs_dir, data_root=data_root, device=device,
                      save=save, misclassified=misclassified, allow_changed_data=allow_changed_data)
    console = _human_console(json_out)
    _print_notes(console, report.notes)
    if json_out != "-":
        from fcclass.report import confused_pairs_table, confusion_table, eval_table

        console.print(f"Checkpoint: [bold]{escape(report.checkpoint)}[/bold]", highlight=False)
        console.print(eval_table(report))
        if len(report.class_names) <= 20:
            console.print(confusion_table(report, normalize))
        console.print(confused_pairs_table(report))
        for what, path in report.files.items():
            console.print(f"Wrote {what.replace('_', ' ')}: [bold]{escape(path)}[/bold]", highlight=False)
    _emit_json(json_out, report.to_dict())


def _print_notes(console: Console, notes: list[str]) -> None:
    for note in notes:
        console.print(f"[yellow]{escape(note)}[/yellow]" if not note.startswith("Run: ") else escape(note), highlight=False)


@app.command()
@_handle_errors
def predict(
    images: Optional[list[str]] = typer.Argument(None, metavar="[IMAGES]...", help="Image files, folders (searched recursively) or glob patterns."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run directory (default: the newest trained run)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Use this checkpoint file."),
    split: Optional[str] = typer.Option(None, "--split", help="Instead of IMAGES: every image of the run's recorded train, val or test split, with its true label."),
    top_k: int = typer.Option(3, "--top-k", "-k", help="How many labels to show per image."),
    json_out: Optional[str] = JsonOpt,
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Also write the predictions as CSV to FILE."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per forward pass."),
    runs_dir: Path = RunsDirOpt,
    data_root: Optional[Path] = DataRootOpt,
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
    from fcclass.inference import load_for_inference
    from fcclass.prediction import predict as run_predict
    from fcclass.prediction import predict_split, predictions_csv

    model = load_for_inference(run, checkpoint, runs_dir=runs_dir, device=device)
    console = _human_console(json_out)
    _print_notes(console, [model.note] if model.note else [])
    if split is not None:
        preds = predict_split(split, top_k=top_k, batch_size=batch_size, data_root=data_root, allow_changed_data=allow_changed_data, model=model)
    else:
        preds = run_predict(images or [], top_k=top_k, batch_size=batch_size, model=model)
    shown = max((len(p.top_k) for p in preds), default=1) or 1
    if json_out != "-":
        from fcclass.report import predict_table

        console.print(predict_table(preds, shown))
    if csv_out is not None:
        _write_file(csv_out, predictions_csv(preds, shown), "CSV")
    _emit_json(json_out, [p.to_dict() for p in preds])
    if split is not None and json_out != "-":
        wrong = sum(p.label != p.true_label for p in preds)
        console.print(f"{split} split: {len(preds):,} images, {wrong:,} predicted wrong (top-1 accuracy "
                      f"{1 - wrong / max(len(preds), 1):.2%}; `fcclass eval --split {split}` gives every figure).", highlight=False)
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
    from fcclass.config import load_config

    cfg = load_config(config, set_)
    from fcclass.data import describe
    from fcclass.model import build_model

    if cfg.model.input_shape is not None:
        input_shape = list(cfg.model.input_shape)
        num_classes = _num_classes_without_data(cfg) or _num_classes_from_data(cfg)
    else:
        shape, num_classes = describe(cfg.data)
        input_shape = list(shape)

    result = build_model(cfg.model, input_shape, num_classes).summary()
    if json_out != "-":
        from fcclass.report import summary_table

        _console().print(summary_table(result, title=f"Model: {cfg.name}"))
    _emit_json(json_out, result.to_dict())


@app.command()
@_handle_errors
def plot(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory (default: the newest trained run in --runs-dir)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output PNG (default: RUN_DIR/curves.png)."),
    runs_dir: Path = RunsDirOpt,
) -> None:
    """Redraw a run's training curves: loss and accuracy (train vs val) and the learning rate per epoch."""
    from fcclass.plots import plot_curves
    from fcclass.runs import newest_trained_run

    path = plot_curves(run_dir if run_dir is not None else newest_trained_run(runs_dir)[0], out)
    _console().print(f"Wrote [bold]{escape(str(path))}[/bold]", highlight=False)


@app.command()
@_handle_errors
def export(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory (default: the newest trained run in --runs-dir)."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx | torchscript"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Export this checkpoint file instead of a run's best."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: RUN_DIR/model.onnx or model.torchscript.pt)."),
    runs_dir: Path = RunsDirOpt,
) -> None:
    """Export the best checkpoint as a deployable model (pixels in [0, 1] in, probabilities out) plus a JSON description."""
    from fcclass.export import export_model

    model_path, sidecar, note = export_model(run_dir, checkpoint, fmt=fmt, out=out, runs_dir=runs_dir)
    _print_notes(_console(), [note] if note else [])
    _console().print(f"Wrote [bold]{escape(str(model_path))}[/bold] and [bold]{escape(str(sidecar))}[/bold] (class names, input shape, preprocessing)", highlight=False)


@app.command()
@_handle_errors
def bench(
    mode: str = typer.Option("throughput", "--mode", help="throughput | tta (time to accuracy)"),
    model: list[str] = typer.Option(["examples", "default"], "--model", help="examples (PyTorch-examples net) and/or default (configs/fashion_mnist.yaml)."),
    images: int = typer.Option(12_800, "--images", min=64, help="Training images timed per loop (throughput mode)."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Alternate the loops this often and keep each one's best (throughput mode)."),
    keras: bool = typer.Option(True, "--keras/--no-keras", help="Also time Keras's model.fit on the same model, when Keras is installed (throughput mode)."),
    target: list[float] = typer.Option([0.91, 0.92], "--target", help="Test accuracies to time (tta mode)."),
    set_: Optional[list[str]] = SetOpt,
    data_root: str = typer.Option("data", "--data-root", help="Where Fashion-MNIST is (or gets unpacked)."),
    device: str = DeviceOpt,
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Benchmark: fcclass vs a plain PyTorch loop vs the matmul peak (throughput), or seconds to a test accuracy (tta)."""
    _check_json_target(json_out)
    import torch

    from fcclass import bench as B
    from fcclass.report import throughput_table, tta_table

    unknown = [m for m in model if m not in B.MODELS]
    if unknown:
        raise FcclassError(f"Unknown --model {', '.join(unknown)}: the benchmark models are {' and '.join(B.MODELS)} "
                           f"(configs/fashion_mnist.yaml's model and the PyTorch-examples net).")
    if mode not in ("throughput", "tta"):
        raise FcclassError(f"Unknown --mode {mode}: use throughput (images/s against PyTorch and Keras) or tta (time to accuracy).")
    from fcclass.device import select_device

    dev = select_device(device)
    console = _human_console(json_out)
    results: list[dict[str, Any]] = []
    if mode == "throughput":
        peak = B.training_peak(dev)
        with_keras = keras and B.keras_runs_on(dev)
        if keras and B.keras_available() and not with_keras:
            console.print(f"[yellow]Keras skipped: its torch backend trains on {B.keras_device()}, not {dev.type}.[/yellow]")
        for name in model:
            loops = "the PyTorch-examples loop, Keras and fcclass" if with_keras else "the PyTorch-examples loop and fcclass"
            console.print(f"[bold]{name}[/bold]: timing {loops} on {images:,} images ({dev})...")
            results.append(B.throughput(name, data_root, images, peak=peak, repeats=repeats, keras=with_keras, device=device).to_dict())
        if json_out != "-":
            console.print(throughput_table(results))
    else:
        for name in model:
            console.print(f"[bold]{name}[/bold]: training until the end of its config, testing after each epoch...")
            results.append(B.time_to_accuracy(name, target, data_root, set_, device))
        if json_out != "-":
            console.print(tta_table(results))
    import platform

    _emit_json(json_out, {"mode": mode, "machine": {"processor": platform.processor() or platform.machine(),
                                                     "cpu_threads": torch.get_num_threads(), "torch": torch.__version__},
                          "results": results})


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
    from fcclass.config import Dense

    dense = [layer for layer in cfg.model.layers if isinstance(layer, Dense)]
    return dense[-1].units if dense and dense[-1].units else None


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
