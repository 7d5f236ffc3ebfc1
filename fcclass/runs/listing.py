"""The runs of a folder, as `fcclass runs` lists and compares them: read from each run's summary.json (a few KB), never
from checkpoints, so a folder of a thousand runs lists in a moment. Runs from before summary.json existed are
described from their config.yaml and metrics.csv."""

from __future__ import annotations

import datetime as _dt
import fnmatch
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

from fcclass.config.sections import CheckpointConfig, Monitor
from fcclass.config.yaml_load import parse_yaml
from fcclass.errors import ConfigError, FcclassError
from fcclass.runs.layout import CONFIG, is_run_dir
from fcclass.runs.metrics import best_row, metrics_rows
from fcclass.runs.summary import Best, Epochs, TestFigures, live_state, read_summary

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
    state: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sort_value(self, key: str) -> Any:
        value = self.epochs_done if key == "epochs" else getattr(self, key)
        return (value is None, value if value is not None else 0)  # missing values last


def run_row(run_dir: Path) -> RunRow:
    summary = read_summary(run_dir)
    if summary is None:
        return _row_without_summary(run_dir)
    best, test, epochs = summary.best or Best(), summary.test or TestFigures(), summary.epochs or Epochs()
    return RunRow(run_dir.name, str(run_dir), summary.started, summary.dataset, summary.params, epochs.done, epochs.planned,
                  best.epoch, best.val_accuracy, best.val_loss, test.accuracy, test.loss, summary.wall_seconds,
                  live_state(run_dir, summary))


def _row_without_summary(run_dir: Path) -> RunRow:
    """A run trained before summary.json was written (or whose summary.json is damaged): what its config and metrics say."""
    try:
        cfg = parse_yaml((run_dir / CONFIG).read_text(encoding="utf-8"), str(run_dir / CONFIG)) or {}
    except (OSError, ConfigError, UnicodeDecodeError):
        cfg = {}
    cfg = cfg if isinstance(cfg, dict) else {}
    rows = metrics_rows(run_dir)
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    planned = train.get("epochs")
    monitor = (train.get("checkpoint") or {}).get("monitor") if isinstance(train.get("checkpoint"), dict) else None
    best = best_row(rows, monitor if monitor in get_args(Monitor) else CheckpointConfig().monitor) or {}  # best.pt's epoch
    started = _dt.datetime.fromtimestamp(run_dir.stat().st_mtime).astimezone().isoformat(timespec="seconds")
    state = "finished" if planned and len(rows) >= planned else "interrupted"
    return RunRow(run_dir.name, str(run_dir), started, (cfg.get("data") or {}).get("dataset") if isinstance(cfg.get("data"), dict) else None,
                  None, len(rows), planned, int(best["epoch"]) if "epoch" in best else None, best.get("val_accuracy"),
                  best.get("val_loss"), None, None, None, state)  # wall time unknown: metrics hold training seconds only


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
    """config.yaml as dotted keys: {'optimizer.lr': 0.001, 'model.layers.0.filters': 32, ...}."""
    try:
        raw = parse_yaml((run_dir / CONFIG).read_text(encoding="utf-8"), str(run_dir / CONFIG))
    except (OSError, ConfigError, UnicodeDecodeError) as e:
        raise FcclassError(f"Cannot read {run_dir / CONFIG}: {e}") from None
    from fcclass.config.load import flatten

    return flatten(raw)


def config_differences(runs: list[Path]) -> list[tuple[str, list[Any]]]:
    """The config keys whose values differ between the runs, each with every run's value (None: not set)."""
    configs = [flat_config(r) for r in runs]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [(k, [c.get(k) for c in configs]) for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
