"""metrics.csv, the run's epoch rows: written after every epoch and parsed by one reader (curves, listings,
comparisons), a row rounded as the human output shows it, and the rules that judge rows: which metric a monitor
follows, when a metric improved, and which epoch is the best (best.pt, the run record, listings, a sweep's value)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

from fcclass.errors import CheckpointError
from fcclass.files import atomic_write_text, read_regular
from fcclass.runs.layout import METRICS

METRIC_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


def write_metrics(run_dir: Path, history: Sequence[dict[str, Any]]) -> None:
    """The run's metrics.csv, a row per epoch of ``history``, atomically; raises OSError."""
    atomic_write_text(Path(run_dir) / METRICS, metrics_csv(history))


def metrics_csv(history: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


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


def monitored(name: str, validated: bool) -> str:
    """The metric a monitor named ``name`` follows (best checkpoint, early stopping, scheduler, a sweep's ranking):
    itself, or, when there is no validation split (``validated`` False), the training metric in place of val_*."""
    return name if validated or not name.startswith("val_") else "train_" + name.removeprefix("val_")


def monitor_value(row: dict[str, Any], name: str) -> float | None:
    """The value of monitor ``name`` in an epoch row (on_epoch_end's): the training metric stands in for val_* when
    the epoch had no validation split (its val_* are None)."""
    return row.get(monitored(name, row.get(name) is not None))


def improved(value: float, best: float | None, monitor: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` of ``monitor`` beats ``best`` by more than ``min_delta``: lower for a loss, higher otherwise."""
    if best is None:
        return True
    return value < best - min_delta if monitor.endswith("loss") else value > best + min_delta


def tie_breaker(monitor: str) -> str:
    """The metric that decides between epochs equal on ``monitor``: the same split's loss for an accuracy, its accuracy
    for a loss (val_loss for val_accuracy; train_accuracy for train_loss)."""
    split, _, kind = monitor.rpartition("_")
    return f"{split}_{'accuracy' if kind == 'loss' else 'loss'}"


def better_epoch(row: dict[str, Any], best: dict[str, Any] | None, monitor: str) -> bool:
    """Whether the epoch ``row`` is better than ``best`` (the best so far; None: there is none) by ``monitor``; a tie
    on it (the same val accuracy, often at 100 %) goes to the epoch better on ``tie_breaker(monitor)``, and a tie on
    both to the earlier epoch. The one rule for the best epoch: best.pt, the run record and listings all follow it."""
    if best is None:
        return True
    if row[monitor] != best[monitor]:
        return improved(row[monitor], best[monitor], monitor)
    other = tie_breaker(monitor)
    return row.get(other) is not None and best.get(other) is not None and improved(row[other], best[other], other)


def best_row(rows: Sequence[dict[str, Any]], monitor: str) -> dict[str, Any] | None:
    """The best of ``rows`` (epochs in order, e.g. metrics.csv's) by ``monitor`` as training picks it (``better_epoch``;
    without a validation split, by the training metric ``monitored`` names); None when no row has that metric."""
    best = None
    for row in rows:
        metric = monitored(monitor, row.get(monitor) is not None)
        if row.get(metric) is not None and better_epoch(row, best, metric):
            best = row
    return best


LIMIT = 64 << 20  # bytes; a row is about 80, so a run of 800,000 epochs
FLOAT32_MAX = 3.4028234663852886e38


def _parse(path: Path) -> list[dict[str, float]]:
    """The one parser of metrics.csv: a row per epoch, its filled cells as numbers (empty: the value was None). Read
    through files.read_regular (a regular file of at most LIMIT bytes); raises OSError for a file that is not one, and
    ValueError for a value no epoch can have (``_check``)."""
    text = read_regular(path, LIMIT).decode("utf-8")
    rows = [{k: float(v) for k, v in row.items() if k and v not in (None, "")} for row in csv.DictReader(io.StringIO(text, newline=""))]
    for i, row in enumerate(rows):
        _check(row, i + 1)
    return rows


def _check(row: dict[str, float], line: int) -> None:
    """An epoch row as fcclass writes it: finite numbers, epoch a whole number from 1, accuracies from 0 to 1, the rest
    from 0 to FLOAT32_MAX (what a float32 loss can reach); else ValueError naming the row and the value."""
    for key, value in row.items():
        bad = not math.isfinite(value) or value < 0 or value > (1 if key.endswith("accuracy") else FLOAT32_MAX)
        if key == "epoch":
            bad = bad or value < 1 or value > 1e9 or value != int(value)
        if bad:
            raise ValueError(f"row {line}: {key} is {value:g}, which no epoch can have")


def metrics_rows(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv as numbers; an unreadable or damaged file reads as no epochs (plots of several runs)."""
    try:
        return checked_rows(run_dir)
    except ValueError:
        return []


def checked_rows(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv as numbers, no rows when there is none; a damaged file (not a regular file, too large, a value no
    epoch can have) is a ValueError whose message is the reason in a few words (listings show it)."""
    try:
        return _parse(Path(run_dir) / METRICS)
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError, csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"metrics.csv: {_reason(e)}") from None


def _reason(e: Exception) -> str:
    return (e.strerror if isinstance(e, OSError) and e.strerror else str(e))[:100]


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv as numbers, for curves: a missing, damaged or empty file is a CheckpointError saying how to fix it."""
    path = Path(run_dir) / METRICS
    try:
        rows = _parse(path)
    except FileNotFoundError:
        raise CheckpointError(f"'{run_dir}' has no metrics.csv; give a run directory made by `fcclass train` that finished an epoch.") from None
    except (OSError, ValueError, TypeError, csv.Error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({_reason(e)}); fcclass writes it at the end of every epoch, so resuming "
                              "the run (`fcclass train --resume RUN`) or training again rewrites it.") from None
    if not rows:
        raise CheckpointError(f"{path} has no epochs yet; train at least one epoch first.")
    missing = [k for k in ("epoch", "train_loss", "train_accuracy", "lr") if any(k not in r for r in rows)]
    if missing:
        raise CheckpointError(f"{path} is damaged: it lacks {', '.join(missing)}. Resuming the run or training again rewrites it.")
    return rows
