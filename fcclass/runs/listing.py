"""The runs of a folder, as `fcclass runs` lists and compares them: read from each run's summary.json (a few KB), never
from checkpoints, so a folder of a thousand runs lists in a moment. Runs from before summary.json existed are
described from their config.yaml and metrics.csv."""

from __future__ import annotations

import datetime as _dt
import fnmatch
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fcclass.config.sections import CheckpointConfig, Monitor
from fcclass.errors import FcclassError
from fcclass.runs.checkpoint import raw_config
from fcclass.runs.layout import CONFIG, SUMMARY, is_run_dir
from fcclass.runs.metrics import best_row, checked_rows
from fcclass.runs.records import DamagedRecord, Record, problem, read_record
from fcclass.runs.summary import LIMIT as SUMMARY_LIMIT
from fcclass.runs.summary import Best, Count, Epochs, Summary, TestFigures, live_state

SORT_KEYS = ("started", "name", "dataset", "params", "epochs", "val_accuracy", "test_accuracy", "wall_seconds", "state")
FILTER_KEYS = ("name", "dataset", "state")


@dataclass
class RunRow:
    name: str  # the run directory's name
    path: str
    started: str | None
    dataset: str | None
    params: int | None
    epochs_done: int
    epochs_planned: int | None
    best_epoch: int | None
    val_accuracy: float | None
    val_loss: float | None
    test_accuracy: float | None
    test_loss: float | None
    wall_seconds: float | None
    state: str  # one of summary.STATES, or "damaged"
    damaged: str | None = None  # why the run cannot be described: its file and the problem
    init_from: str | None = None  # model.init_from: the run (or checkpoint file) its weights started from
    data_version: str | None = None  # a packed dataset's version (data.dataset: shards)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sort_value(self, key: str) -> Any:
        value = self.epochs_done if key == "epochs" else getattr(self, key)
        return (value is None, value if value is not None else 0)  # missing values last


class _Checkpoint(Record):
    monitor: Monitor | None = None


class _Train(Record):
    epochs: Count | None = None
    checkpoint: _Checkpoint | None = None


class _Data(Record):
    dataset: str | None = None


class _Listed(Record):
    """What a listing reads from the config.yaml of a run without summary.json: checked as a record is."""

    data: _Data | None = None
    train: _Train | None = None


def run_row(run_dir: Path) -> RunRow:
    """A run's row: from its summary.json, else (runs from before it was written, or whose summary.json is damaged)
    from its config.yaml and metrics.csv. A damaged file is named with the problem (``damaged``), never an error: one
    bad run must not keep the others from being listed; when nothing describes it, its state is "damaged"."""
    try:
        summary = read_record(run_dir / SUMMARY, Summary, SUMMARY_LIMIT)
    except DamagedRecord as e:
        summary, why = None, f"{SUMMARY}: {e}"
    else:
        why = None
    if why is not None and not (run_dir / CONFIG).exists():
        return damaged_row(run_dir, why)  # nothing else describes it
    if summary is None:
        try:
            row = _row_without_summary(run_dir)
        except (FcclassError, ValueError) as e:
            return damaged_row(run_dir, why or str(e))
        row.damaged = why
        return row
    best, test, epochs = summary.best or Best(), summary.test or TestFigures(), summary.epochs or Epochs()
    return RunRow(run_dir.name, str(run_dir), summary.started, summary.dataset, summary.params, epochs.done, epochs.planned,
                  best.epoch, best.val_accuracy, best.val_loss, test.accuracy, test.loss, summary.wall_seconds,
                  live_state(run_dir, summary), init_from=summary.init_from.path if summary.init_from else None,
                  data_version=summary.data_version)


def damaged_row(run_dir: Path, why: str) -> RunRow:
    return RunRow(run_dir.name, str(run_dir), _modified(run_dir), None, None, 0, None, None, None, None, None, None, None,
                  "damaged", why[:300])


def _modified(run_dir: Path) -> str:
    return _dt.datetime.fromtimestamp(run_dir.stat().st_mtime).astimezone().isoformat(timespec="seconds")


def _row_without_summary(run_dir: Path) -> RunRow:
    """A run trained before summary.json was written: what its config and metrics say. Raises ValueError or
    FcclassError (the reason) when one of them is damaged."""
    from pydantic import ValidationError

    raw = raw_config(run_dir)
    try:
        cfg = _Listed.model_validate(raw if raw is not None else {})
    except ValidationError as e:
        raise ValueError(f"{CONFIG}: {problem(e)}") from None
    rows = checked_rows(run_dir)
    train = cfg.train or _Train()
    monitor = (train.checkpoint.monitor if train.checkpoint else None) or CheckpointConfig().monitor
    best = best_row(rows, monitor) or {}  # best.pt's epoch
    planned = train.epochs
    state = "finished" if planned and len(rows) >= planned else "interrupted"
    return RunRow(run_dir.name, str(run_dir), _modified(run_dir), cfg.data.dataset if cfg.data else None, None, len(rows),
                  planned, int(best["epoch"]) if "epoch" in best else None, best.get("val_accuracy"), best.get("val_loss"),
                  None, None, None, state)  # wall time unknown: metrics hold training seconds only


def list_runs(runs_dir: str | Path, filters: list[str] | None = None, sort: str = "started", descending: bool = False) -> list[RunRow]:
    base = Path(runs_dir)
    if not base.is_dir():
        raise FcclassError(f"'{base}' is not a folder of runs. Pass --runs-dir DIR (the train.runs_dir of your configs).")
    if sort not in SORT_KEYS:
        raise FcclassError(f"--sort must be one of {', '.join(SORT_KEYS)}, not '{sort}'.")
    wanted = [_parse_filter(f) for f in filters or []]
    rows = [run_row(p) for p in sorted(base.iterdir()) if is_run_dir(p)]
    rows = [r for r in rows if all(fnmatch.fnmatchcase(str(getattr(r, key) or ""), pattern) for key, pattern in wanted)]
    return sorted(rows, key=lambda r: r.sort_value(sort), reverse=descending)


def count_runs(runs_dir: str | Path) -> int:
    return sum(1 for p in Path(runs_dir).iterdir() if is_run_dir(p))


def _parse_filter(text: str) -> tuple[str, str]:
    key, sep, pattern = text.partition("=")
    if not sep or key not in FILTER_KEYS:
        raise FcclassError(f"--filter '{text}' must be KEY=PATTERN with KEY one of {', '.join(FILTER_KEYS)} (shell-style "
                           "patterns: --filter 'name=cnn-*' --filter state=finished).")
    return key, pattern


# ----------------------------------------------------------------------------- comparing runs
def resolve_run(run: str | Path, runs_dir: str | Path) -> Path:
    """RUN as given (a path), or by name inside ``runs_dir``; a folder that is not a run directory is refused."""
    path = Path(run) if Path(run).is_dir() else Path(runs_dir) / run
    if not is_run_dir(path):
        raise FcclassError(f"'{run}' is not a run directory (looked for it as given and in {runs_dir}). "
                           "`fcclass runs` lists the runs.")
    return path


def resolve_runs(runs: list[str], runs_dir: str | Path) -> list[Path]:
    """Each RUN as given (a path), or by name inside ``runs_dir``."""
    out = [resolve_run(run, runs_dir) for run in runs]
    if len(out) < 2:
        raise FcclassError("Give at least two runs to compare.")
    return out


def flat_config(run_dir: Path) -> dict[str, Any]:
    """config.yaml as dotted keys: {'optimizer.lr': 0.001, 'model.layers.0.filters': 32, ...}; raises FcclassError
    (the reason) for a damaged one."""
    from fcclass.config.load import flatten

    raw = raw_config(run_dir)
    if raw is not None and not isinstance(raw, dict):
        raise FcclassError(f"{run_dir / CONFIG} is damaged: it does not hold a config mapping.")
    return flatten(raw or {})


def config_differences(runs: list[Path]) -> tuple[list[tuple[str, list[Any]]], dict[Path, str]]:
    """The config keys whose values differ between the runs, each with every run's value (None: not set), and the
    runs whose config.yaml is damaged, with why (their values read as not set)."""
    configs: list[dict[str, Any]] = []
    damaged: dict[Path, str] = {}
    for run in runs:
        try:
            configs.append(flat_config(run))
        except FcclassError as e:
            configs.append({})
            damaged[run] = str(e)
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [(k, [c.get(k) for c in configs]) for k in keys if len({repr(c.get(k)) for c in configs}) > 1], damaged
