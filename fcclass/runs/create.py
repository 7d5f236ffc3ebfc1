"""Making a run directory: the folder (``create_run_dir``) and its first files (``start_run``), the same files whoever
makes the run (`fcclass train`, `fcclass compress`)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from fcclass.files import RunWriteError, atomic_write_text, os_error_reason
from fcclass.runs.layout import BEST, CLASSES, CONFIG, LAST

if TYPE_CHECKING:  # pragma: no cover
    from fcclass.config.sections import Config
    from fcclass.data.splits import SplitRecord
    from fcclass.runs.checkpoint import Checkpoint


def create_run_dir(runs_dir: str | Path, name: str) -> Path:
    """A fresh ``runs/<name>-<YYYYmmdd-HHMMSS>`` directory (suffixed if that second is taken)."""
    base = Path(runs_dir)
    blocker = next((p for p in (base, *base.absolute().parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise RunWriteError(f"Cannot create a run directory in train.runs_dir '{base}': '{blocker}' is a file, not a folder. "
                            "Set train.runs_dir to a folder (e.g. --set train.runs_dir=runs).")
    try:
        base.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for i in range(1000):
            path = base / (f"{name}-{stamp}" if i == 0 else f"{name}-{stamp}-{i}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise RunWriteError(f"Cannot create a run directory in train.runs_dir '{base}': {os_error_reason(e)}. "
                            "Set train.runs_dir to a writable folder (e.g. --set train.runs_dir=/tmp/runs).") from None
    raise RunWriteError(f"Cannot create a run directory under '{base}': too many runs named '{name}' this second.")


def start_run(run_dir: Path, cfg: "Config", class_names: Sequence[str], splits: "SplitRecord", *,
              last: "Checkpoint | None" = None, best: "Checkpoint | None" = None, fix: str = "") -> None:
    """Write a new run's first files into ``run_dir`` (a new, empty folder): config.yaml (the resolved config),
    classes.json, splits.json and its first checkpoint, ``last`` (epoch 0 of a run about to train: killed in its first
    epoch, it can still resume) or ``best`` (a model trained already). A failed write removes the folder and raises
    RunWriteError, ending with ``fix`` (what the user can do about it)."""
    from fcclass.runs.splits import write_splits

    try:
        write_config(run_dir, cfg)
        atomic_write_text(run_dir / CLASSES, json.dumps(list(class_names), indent=2) + "\n")
        write_splits(run_dir, splits)
        for name, checkpoint in ((LAST, last), (BEST, best)):
            if checkpoint is not None:
                checkpoint.save(run_dir / name)
    except OSError as e:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise RunWriteError(f"Cannot write the new run directory '{run_dir}': {os_error_reason(e)}.{' ' + fix if fix else ''}") from None


def write_config(run_dir: Path, cfg: "Config") -> None:
    """The run's config.yaml: the resolved config it trains with (resume rewrites it after an allowed --set); raises OSError."""
    atomic_write_text(Path(run_dir) / CONFIG, cfg.to_yaml())
