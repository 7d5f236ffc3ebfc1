"""Rich rendering shared by the CLI and the training loop (human output only; --json bypasses it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fcclass.runs import shown


def summary_table(summary: Any, title: str = "Model") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("Layer (type)")
    table.add_column("Output Shape")
    table.add_column("Param #", justify="right")
    table.add_row("input", "(None, " + ", ".join(str(s) for s in summary.input_shape) + ")", "0")
    for li in summary.layers:
        table.add_row(escape(f"{li.name} ({li.type})"), "(None, " + ", ".join(str(s) for s in li.output_shape) + ")", f"{li.params:,}")
    table.add_section()
    table.add_row("[bold]Total params[/bold]", "", f"[bold]{summary.total_params:,}[/bold]")
    table.add_row("Trainable params", "", f"{summary.trainable_params:,}")
    table.add_row("Non-trainable params", "", f"{summary.non_trainable_params:,}")
    return table


def print_training_header(console: Console, trainer: Any) -> None:
    """The model table, device and run, and the data table (counts per label, class weights) before training."""
    from fcclass.device import precision_name

    console.print(summary_table(trainer.model.summary()))
    resumed = ""
    if trainer.resumed:
        resumed = f"   [yellow]resuming after epoch {trainer.state.epoch}[/yellow]"
        if trainer.replanned:
            resumed += f" [yellow](train.epochs is now {trainer.cfg.train.epochs}: the LR schedule is re-planned)[/yellow]"
    chosen = f"auto: {_precision_reason(trainer.device.type)}" if trainer.cfg.train.precision == "auto" else "train.precision"
    job = getattr(trainer, "job", None)
    if job is not None and job.enabled:  # torchrun: the job, and what one batch is split into
        from fcclass.distributed import backend

        resumed = (f"   DDP: {job.world} processes on {job.nodes} machine(s), {backend(trainer.device.type)}, "
                   f"global batch {trainer.cfg.data.batch_size}" + resumed)
    console.print(f"Device: [bold]{trainer.device}[/bold] ({precision_name(trainer.amp_dtype)}, {chosen})   "
                  f"Run: [bold]{escape(shown(trainer.run_dir))}[/bold]{resumed}", highlight=False)
    info, weights = trainer.data.info, trainer.class_weights
    table = Table(title=f"Data: {escape(trainer.cfg.data.dataset)}", title_justify="left")
    table.add_column("Label")
    table.add_column("Train", justify="right")
    table.add_column("Val", justify="right")
    test = bool(info.test_counts)
    if test:
        table.add_column("Test (held out)", justify="right")
    if weights is not None:
        table.add_column("Class weight", justify="right")
    for i, name in enumerate(info.class_names):
        row = [escape(name), f"{info.train_counts[i]:,}", f"{info.val_counts[i]:,}", *([f"{info.test_counts[i]:,}"] if test else [])]
        if weights is not None:
            row.append(f"{float(weights[i]):.3f}")
        table.add_row(*row)
    table.add_section()
    table.add_row("[bold]Total[/bold]", f"{sum(info.train_counts):,}", f"{sum(info.val_counts):,}",
                  *([f"{sum(info.test_counts):,}"] if test else []), *([""] if weights is not None else []))
    console.print(table)
    if trainer.val_loader is None:
        t = trainer.cfg.train
        console.print(f"[yellow]No validation split (data.val_split is 0): best.pt keeps the epoch with the best "
                      f"{trainer.monitor_name(t.checkpoint.monitor)} and early stopping follows "
                      f"{trainer.monitor_name(t.early_stopping.monitor)} instead.[/yellow]")
    for note in trainer.data.notes:
        console.print(f"[yellow]{escape(note)}[/yellow]")


def print_epoch(console: Console, row: dict[str, Any], epochs: int, is_best: bool) -> None:
    val = (f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.2%}  " if row.get("val_loss") is not None else "")
    console.print(
        f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  "
        f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2%}  {val}"
        f"lr {row['lr']:.2e}  {row['seconds']:.1f}s" + ("  [green]* best[/green]" if is_best else ""),
        highlight=False,
    )


def best_line(result: Any) -> str:
    """The closing line of `fcclass train`: the best epoch, where the run is, what to do next."""
    best = result.best
    val = (f"val accuracy {best['val_accuracy']:.2%}, val loss {best['val_loss']:.4f}" if best.get("val_loss") is not None
           else f"train accuracy {best['train_accuracy']:.2%}, train loss {best['train_loss']:.4f} (no validation split)")
    return (f"[bold]Best epoch {result.best_epoch}[/bold]: {val}. Run saved in [bold]{escape(shown(result.run_dir))}[/bold]\n"
            f"Next: fcclass eval {escape(shown(result.run_dir))}")


def rounded_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row for JSON, rounded as the human output shows it: losses and accuracies to 4 decimals
    (accuracy 0.9293 = 92.93%), the learning rate to 3 significant digits, seconds to 0.1."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if not isinstance(value, float):
            out[key] = value
        elif key == "lr":
            out[key] = float(f"{value:.3g}")
        else:
            out[key] = round(value, 1 if key == "seconds" else 4)
    return out


def eval_table(report: Any, highlight: int = 3) -> Table:
    """Per-label recall (accuracy), precision, F1 and support; the ``highlight`` weakest labels by F1 in red."""
    table = Table(title=f"{report.split} split: {report.num_samples:,} images", title_justify="left")
    table.add_column("Label")
    for name in ("Accuracy", "Precision", "F1", "Support"):
        table.add_column(name, justify="right")
    ranked = sorted((m["f1"], name) for name, m in report.per_class.items() if m["support"])
    worst = {name for _, name in ranked[: min(highlight, max(len(ranked) - 1, 0))]}
    for name, m in report.per_class.items():
        table.add_row(escape(name), f"{m['accuracy']:.2%}", f"{m['precision']:.2%}", f"{m['f1']:.2%}", f"{m['support']:,}",
                      style="red" if name in worst else None)
    table.add_section()
    for label, avg in (("Macro avg", report.macro), ("Weighted avg", report.weighted)):
        table.add_row(label, f"{avg['recall']:.2%}", f"{avg['precision']:.2%}", f"{avg['f1']:.2%}", f"{report.num_samples:,}")
    table.add_section()
    table.add_row("[bold]Overall accuracy[/bold]", f"[bold]{report.accuracy:.2%}[/bold]", "", "", f"{report.num_samples:,}")
    top5 = f"top-5 accuracy {report.top5_accuracy:.2%} | " if report.top5_accuracy is not None else ""
    table.caption = f"{top5}loss {report.loss:.4f} | red: weakest F1"
    return table


def confusion_table(report: Any, normalize: bool = False) -> Table:
    """Rows: true label; columns: predicted label (counts, or fractions of the row with ``normalize``)."""
    names = report.class_names
    table = Table(title="Confusion matrix (rows: true label, columns: predicted)" + (", row-normalised" if normalize else ""),
                  title_justify="left")
    table.add_column("true \\ pred")
    for name in names:
        table.add_column(escape(name), justify="right")
    for t, name in enumerate(names):
        row = report.confusion[t]
        total = max(int(row.sum()), 1)
        cells = []
        for p, count in enumerate(row.tolist()):
            text = f"{count / total:.1%}" if normalize else f"{count:,}"
            cells.append(f"[bold green]{text}[/bold green]" if p == t else (text if count else "[dim]·[/dim]"))
        table.add_row(escape(name), *cells)
    return table


def confused_pairs_table(report: Any, n: int = 5) -> Table:
    table = Table(title="Most confused", title_justify="left")
    table.add_column("True label")
    table.add_column("Predicted as")
    table.add_column("Count", justify="right")
    table.add_column("Of the true label", justify="right")
    for pair in report.confused_pairs(n):
        table.add_row(escape(pair["true"]), escape(pair["predicted"]), f"{pair['count']:,}", f"{pair['fraction_of_true']:.1%}")
    return table


def predict_table(preds: list[Any], top_k: int) -> Table:
    """One row per image: its top-k labels (and, on a recorded split, the true label; wrong top-1 in red)."""
    truth = any(p.true_label is not None for p in preds)
    table = Table(title_justify="left")
    table.add_column("Image", overflow="fold")
    if truth:
        table.add_column("True label")
    for i in range(top_k):
        table.add_column(f"Top {i + 1}" if top_k > 1 else "Label")
    for p in preds:
        lead = [escape(p.path), *([escape(p.true_label or "")] if truth else [])]
        if p.error is not None:
            table.add_row(*lead, f"[red]error: {escape(p.error)}[/red]", *[""] * (top_k - 1))
        else:
            cells = [escape(f"{t['label']} ({t['probability']:.1%})") for t in p.top_k]
            if truth and p.label != p.true_label:
                cells[0] = f"[red]{cells[0]}[/red]"
            table.add_row(*lead, *cells, *[""] * (top_k - len(cells)))
    return table


def throughput_table(results: list[dict[str, Any]]) -> Table:
    """images/s and seconds per 60,000-image epoch for each loop, the speed-ups, and fcclass against the matmul peak."""
    keras = any("keras" in r for r in results)
    table = Table(title="Training throughput (same model, same Fashion-MNIST images, one process)", title_justify="left")
    cols = ["Model", "PyTorch examples loop", *(["Keras model.fit"] if keras else []), "fcclass", "vs PyTorch",
            *(["vs Keras"] if keras else []), "fcclass GFLOP/s", "Matmul peak", "Of peak"]
    for col in cols:
        table.add_column(col, justify="left" if col == "Model" else "right")

    def cell(loop: dict[str, Any]) -> str:
        precision = f"\n{loop['precision']}" if "precision" in loop else ""  # fcclass's train.precision: auto, as chosen
        return f"{loop['images_per_s']:,.0f} img/s\n{60_000 / loop['images_per_s']:.1f} s/epoch{precision}"

    for r in results:  # one run times Keras for every model or for none
        row = [r["model"], cell(r["reference"]), *([cell(r["keras"])] if keras else []), cell(r["fcclass"]), f"{r['speedup']:.2f}x"]
        if keras:
            row.append(f"{r['speedup_vs_keras']:.2f}x")
        row += [f"{r['achieved_gflops']:,.1f}", _flops(r["matmul_peak_gflops"]), f"{r['fraction_of_peak']:.1%}"]
        table.add_row(*row)
    where = (f"Device: {results[0]['device']}; fcclass trains in {results[0]['fcclass'].get('precision', 'fp32')} "
             f"(train.precision auto: {_precision_reason(results[0]['device'])}), the others in fp32; matmul peak in "
             f"{results[0]['matmul_peak_dtype']}." if results else "")
    if keras:
        k = next(r["keras"] for r in results if "keras" in r)
        table.caption = f"{where} Keras {k['version']} on its {k['backend']} backend. An epoch = 60,000 images."
    else:
        table.caption = f"{where} An epoch = 60,000 images. No Keras column: not installed (pip install -e '.\\[bench]') or skipped."
    return table


def _flops(gflops: float) -> str:
    return f"{gflops / 1000:,.0f} TFLOP/s" if gflops >= 10_000 else f"{gflops:,.0f} GFLOP/s"


def tta_table(results: list[dict[str, Any]]) -> Table:
    targets = list(results[0]["seconds_to_target"]) if results else []
    table = Table(title="Time to test accuracy (training seconds, test measured after each epoch)", title_justify="left")
    table.add_column("Model")
    table.add_column("Device")
    for t in targets:
        table.add_column(f"to {float(t):.1%}", justify="right")
    table.add_column("Final accuracy", justify="right")
    table.add_column("Total", justify="right")
    for r in results:
        cells = [("not reached" if r["seconds_to_target"][t] is None else f"{r['seconds_to_target'][t]:.1f} s") for t in targets]
        table.add_row(r["model"], f"{r['device']} ({r.get('precision', 'fp32')})", *cells, f"{r['final_test_accuracy']:.2%}",
                      f"{r['train_seconds_total']:.1f} s")
    if results:
        table.caption = f"Precision: as trained (Device column); train.precision auto here: {_precision_reason(results[0]['device'])}."
    return table


def _precision_reason(device: str) -> str:
    """Why train.precision: auto chose what it did on ``device``, for captions and headers."""
    if device.startswith("cuda"):
        return "bf16 where the GPU supports it"
    if not device.startswith("cpu"):
        return "fp32"
    import os

    from fcclass.device import cpu_bf16_native

    if os.environ.get("FCCLASS_CPU_BF16", "").strip():
        return f"FCCLASS_CPU_BF16={os.environ['FCCLASS_CPU_BF16'].strip()}"
    return "this CPU has native bf16, AVX512-BF16/AMX" if cpu_bf16_native() else "this CPU has no native bf16"


# ----------------------------------------------------------------------------- fcclass runs
STATE_STYLE = {"finished": "green", "running": "cyan", "interrupted": "yellow", "failed": "red", "pruned": "magenta"}


def _pct(x: Any) -> str:
    return f"{x:.2%}" if isinstance(x, (int, float)) else "-"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def runs_table(rows: list[Any], runs_dir: Any, total: int | None = None) -> Table:
    shown = f"{len(rows)} of {total} (filtered)" if total is not None else str(len(rows))
    table = Table(title=f"Runs in {escape(str(runs_dir))}: {shown}", title_justify="left")
    for name, justify in (("Run", "left"), ("Started", "left"), ("Dataset", "left"), ("Params", "right"), ("Epochs", "right"),
                          ("Best val acc", "right"), ("Test acc", "right"), ("Wall", "right"), ("State", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        epochs = f"{r.epochs_done}/{r.epochs_planned}" if r.epochs_planned else str(r.epochs_done)
        started = (r.started or "-")[:16].replace("T", " ")
        style = STATE_STYLE.get(r.state, "")
        table.add_row(escape(r.name), started, escape(r.dataset or "-"), f"{r.params:,}" if r.params else "-", epochs,
                      _pct(r.val_accuracy), _pct(r.test_accuracy), _duration(r.wall_seconds), f"[{style}]{r.state}[/{style}]")
    return table


def compare_tables(rows: list[Any], diffs: list[tuple[str, list[Any]]]) -> list[Table]:
    """The config keys that differ, then the metrics, one column per run."""
    config = Table(title="Config differences" if diffs else "Config differences: none", title_justify="left")
    metrics = Table(title="Metrics", title_justify="left")
    for table, first in ((config, "Key"), (metrics, "Metric")):
        table.add_column(first)
        for r in rows:
            table.add_column(escape(r.name), justify="right")
    for key, values in diffs:
        config.add_row(escape(key), *(escape(_value(v)) for v in values))
    lines = (("Best epoch", lambda r: str(r.best_epoch or "-")), ("Best val accuracy", lambda r: _pct(r.val_accuracy)),
             ("Best val loss", lambda r: f"{r.val_loss:.4f}" if r.val_loss is not None else "-"),
             ("Test accuracy", lambda r: _pct(r.test_accuracy)),
             ("Test loss", lambda r: f"{r.test_loss:.4f}" if r.test_loss is not None else "-"),
             ("Epochs", lambda r: f"{r.epochs_done}/{r.epochs_planned or '?'}"),
             ("Params", lambda r: f"{r.params:,}" if r.params else "-"), ("Wall", lambda r: _duration(r.wall_seconds)),
             ("State", lambda r: r.state))
    for label, fmt in lines:
        metrics.add_row(label, *(fmt(r) for r in rows))
    return [config, metrics] if diffs else [metrics, config]


def _value(v: Any) -> str:
    text = "-" if v is None else str(v)
    return text if len(text) <= 40 else text[:37] + "..."


def leaderboard_table(board: list[Any], sweep: Any, metric: str | None = None) -> Table:
    """A sweep's trials, the best first; ``metric``: what their values are (default: the sweep's metric). A Note
    column gives a failed trial's reason and what a retry runs again."""
    metric = metric or sweep.opts.metric
    table = Table(title=f"Sweep '{escape(sweep.name)}': {len(board)} of {sweep.opts.trials} trials, by {escape(metric)}",
                  title_justify="left")
    keys = [p.key for p in sweep.params]
    notes = [e.fail_reason or (f"retry of trial {e.retry_of}" if e.retry_of is not None else "") for e in board]
    for name, justify in [("#", "right"), *((k, "right") for k in keys), (metric.split(" ")[0], "right"), ("State", "left"),
                          ("Epochs", "right"), ("Time", "right"), ("Run", "left"), *([("Note", "left")] if any(notes) else [])]:
        table.add_column(escape(name), justify=justify)  # type: ignore[arg-type]
    for e, note in zip(board, notes, strict=True):
        params = [escape(f"{e.params[k]:.4g}" if isinstance(e.params.get(k), float) else str(e.params.get(k, "-"))) for k in keys]
        style = {"complete": "green", "pruned": "magenta", "fail": "red"}.get(e.state, "cyan")
        table.add_row(str(e.number), *params, f"{e.value:.4f}" if e.value is not None else "-", f"[{style}]{e.state}[/{style}]",
                      str(e.epochs or "-"), _duration(e.seconds), escape(Path(e.run_dir).name if e.run_dir else "-"),
                      *([escape(note)] if any(notes) else []))
    return table
