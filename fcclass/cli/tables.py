"""Rich rendering shared by the CLI and the training loop (human output only; --json bypasses it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from fcclass.training.console import precision_reason


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


def predict_summary_line(summary: Any, split: str | None = None) -> str:
    """The closing line of `fcclass predict`: inputs, failures, predictions per label and, where the true labels are
    known, the top-1 accuracy (PredictSummary's, scored as eval scores)."""
    if split is not None:
        wrong = summary.score.images - summary.score.correct
        return (f"{split} split: {summary.images:,} images, {wrong:,} predicted wrong (top-1 accuracy {summary.accuracy or 0:.2%}; "
                f"`fcclass eval --split {split}` gives every figure).")
    failed = f", {summary.failed:,} could not be read" if summary.failed else ""
    counts = ", ".join(f"{label} {n:,}" for label, n in summary.counts.items() if n) or "nothing"
    line = f"Summary: {summary.images:,} image(s){failed}. Predicted: {counts}."
    if summary.accuracy is not None:
        line += (f" Top-1 accuracy {summary.accuracy:.2%} on the {summary.score.images:,} image(s) whose folder names their "
                 "label.")
    return line


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
             f"(train.precision auto: {precision_reason(results[0]['device'])}), the others in fp32; matmul peak in "
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
        table.caption = f"Precision: as trained (Device column); train.precision auto here: {precision_reason(results[0]['device'])}."
    return table


# ----------------------------------------------------------------------------- fcclass runs
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean(value: Any) -> str:
    """Text that came from a file (a run's record, config or folder name), as printed: control characters (escape
    sequences, carriage returns, bidirectional overrides) removed, so a tampered file cannot drive the terminal, and a
    name that is not UTF-8 shown with U+FFFD for its bad bytes; then escaped for Rich markup."""
    return escape(_SURROGATE.sub("\ufffd", _CONTROL.sub("", str(value))))


STATE_STYLE = {"finished": "green", "running": "cyan", "interrupted": "yellow", "failed": "red", "pruned": "magenta", "damaged": "red"}


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
    table = Table(title=f"Runs in {clean(runs_dir)}: {shown}", title_justify="left")
    transfer = any(r.init_from for r in rows)  # the column only where some run started from another's weights
    for name, justify in (("Run", "left"), ("Started", "left"), ("Dataset", "left"), ("Params", "right"), ("Epochs", "right"),
                          ("Best val acc", "right"), ("Test acc", "right"), ("Wall", "right"), ("State", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    if transfer:
        table.add_column("Init from")
    for r in rows:
        epochs = f"{r.epochs_done}/{r.epochs_planned}" if r.epochs_planned else str(r.epochs_done)
        started = (r.started or "-")[:16].replace("T", " ")
        style = STATE_STYLE.get(r.state, "")
        dataset = f"{r.dataset} {r.data_version}" if getattr(r, "data_version", None) else (r.dataset or "-")
        table.add_row(clean(r.name), clean(started), clean(dataset), f"{r.params:,}" if r.params else "-", epochs,
                      _pct(r.val_accuracy), _pct(r.test_accuracy), _duration(r.wall_seconds), f"[{style}]{r.state}[/{style}]",
                      *([clean(_source_name(r.init_from))] if transfer else []))
    return table


def _source_name(path: str | None) -> str:
    """A source run by its folder's name (a checkpoint file by its run's and its own), as the Run column names runs."""
    if not path:
        return "-"
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.suffix == ".pt" else p.name


def compare_tables(rows: list[Any], diffs: list[tuple[str, list[Any]]]) -> list[Table]:
    """The config keys that differ, then the metrics, one column per run."""
    config = Table(title="Config differences" if diffs else "Config differences: none", title_justify="left")
    metrics = Table(title="Metrics", title_justify="left")
    for table, first in ((config, "Key"), (metrics, "Metric")):
        table.add_column(first)
        for r in rows:
            table.add_column(clean(r.name), justify="right")
    for key, values in diffs:
        config.add_row(clean(_value(key)), *(clean(_value(v)) for v in values))
    lines = (("Best epoch", lambda r: str(r.best_epoch or "-")), ("Best val accuracy", lambda r: _pct(r.val_accuracy)),
             ("Best val loss", lambda r: f"{r.val_loss:.4f}" if r.val_loss is not None else "-"),
             ("Test accuracy", lambda r: _pct(r.test_accuracy)),
             ("Test loss", lambda r: f"{r.test_loss:.4f}" if r.test_loss is not None else "-"),
             ("Epochs", lambda r: f"{r.epochs_done}/{r.epochs_planned or '?'}"),
             ("Params", lambda r: f"{r.params:,}" if r.params else "-"), ("Wall", lambda r: _duration(r.wall_seconds)),
             ("State", lambda r: clean(r.state)))
    for label, fmt in lines:
        metrics.add_row(label, *(fmt(r) for r in rows))
    return [config, metrics] if diffs else [metrics, config]


def damaged_lines(rows: list[Any]) -> list[str]:
    """A line per damaged run in a listing or comparison: its name and why (Rich markup)."""
    return [f"[red]Damaged[/red] {clean(r.name)}: {clean(r.damaged)}" for r in rows if r.damaged]


def _value(v: Any) -> str:
    text = "-" if v is None else _CONTROL.sub("", str(v))
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
