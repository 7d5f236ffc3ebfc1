"""Rich rendering shared by the CLI and the training loop (human output only; --json bypasses it)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.markup import escape
from rich.table import Table


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


def print_training_header(console: Console, cfg: Any, ds: Any, model: Any, device: Any, amp_dtype: Any,
                          weights: Any, run_dir: Any, resumed: bool, start_epoch: int) -> None:
    console.print(summary_table(model.summary()))
    precision = {None: "fp32"}.get(amp_dtype, str(amp_dtype).removeprefix("torch."))
    console.print(f"Device: [bold]{device}[/bold] ({precision})   Run: [bold]{escape(str(run_dir))}[/bold]"
                  + (f"   [yellow]resuming after epoch {start_epoch}[/yellow]" if resumed else ""))
    table = Table(title=f"Data: {cfg.data.dataset}", title_justify="left")
    table.add_column("Label")
    table.add_column("Train", justify="right")
    table.add_column("Val", justify="right")
    if weights is not None:
        table.add_column("Class weight", justify="right")
    for i, name in enumerate(ds.info.class_names):
        row = [escape(name), f"{ds.info.train_counts[i]:,}", f"{ds.info.val_counts[i]:,}"]
        if weights is not None:
            row.append(f"{float(weights[i]):.3f}")
        table.add_row(*row)
    table.add_section()
    table.add_row("[bold]Total[/bold]", f"{sum(ds.info.train_counts):,}", f"{sum(ds.info.val_counts):,}", *([""] if weights is not None else []))
    console.print(table)


class EpochProgress:
    """A per-epoch Rich progress bar with the running loss and accuracy; silent without a console."""

    def __init__(self, console: Console | None, epoch: int, epochs: int, batches: int) -> None:
        self.progress = None
        if console is not None and console.is_terminal:  # a live bar only where someone watches it
            self.progress = Progress(
                TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
            )
            self.task = self.progress.add_task("train", total=batches, loss=float("nan"), acc=0.0)

    def __enter__(self) -> "EpochProgress":
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def update(self, batch: int, loss: float, acc: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=batch, loss=loss, acc=acc)


def print_epoch(console: Console, row: dict[str, float], epochs: int, is_best: bool) -> None:
    console.print(
        f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  "
        f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2%}  "
        f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.2%}  "
        f"lr {row['lr']:.2e}  {row['seconds']:.1f}s" + ("  [green]* best[/green]" if is_best else "")
    )


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
    table = Table(title_justify="left")
    table.add_column("Image", overflow="fold")
    for i in range(top_k):
        table.add_column(f"Top {i + 1}" if top_k > 1 else "Label")
    for p in preds:
        if p.error is not None:
            table.add_row(escape(p.path), f"[red]error: {escape(p.error)}[/red]", *[""] * (top_k - 1))
        else:
            cells = [escape(f"{t['label']} ({t['probability']:.1%})") for t in p.top_k]
            table.add_row(escape(p.path), *cells, *[""] * (top_k - len(cells)))
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
        return f"{loop['images_per_s']:,.0f} img/s\n{60_000 / loop['images_per_s']:.1f} s/epoch"

    for r in results:  # one run times Keras for every model or for none
        row = [r["model"], cell(r["reference"]), *([cell(r["keras"])] if keras else []), cell(r["fcclass"]), f"{r['speedup']:.2f}x"]
        if keras:
            row.append(f"{r['speedup_vs_keras']:.2f}x")
        row += [f"{r['achieved_gflops']:.1f}", f"{r['matmul_peak_gflops']:.0f}", f"{r['fraction_of_peak']:.0%}"]
        table.add_row(*row)
    where = f"Device: {results[0]['device']}; matmul peak in {results[0]['matmul_peak_dtype']}." if results else ""
    if keras:
        k = next(r["keras"] for r in results if "keras" in r)
        table.caption = f"{where} Keras {k['version']} on its {k['backend']} backend. An epoch = 60,000 images."
    else:
        table.caption = f"{where} An epoch = 60,000 images. No Keras column: not installed (pip install -e '.\\[bench]') or skipped."
    return table


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
        table.add_row(r["model"], r["device"], *cells, f"{r['final_test_accuracy']:.2%}", f"{r['train_seconds_total']:.1f} s")
    return table
