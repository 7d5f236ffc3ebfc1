"""``fit``: the one call that trains a config or resumes a run, with the standard observers (console, curves, run
record, MLflow tracking when configured) around the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from fcclass.config.load import load_config
from fcclass.config.sections import Config
from fcclass.errors import FcclassError
from fcclass.runs.resume import config_for_resume, resumable_checkpoint
from fcclass.training.callbacks import Callback, ConsoleProgress, Curves
from fcclass.training.distributed import (
    from_env,
    shutdown,
)
from fcclass.training.record import RunRecord
from fcclass.training.setup import resume_trainer, start_trainer
from fcclass.training.tracking import mlflow_tracker
from fcclass.training.trainer import TrainResult


def fit(cfg: Config | None = None, *, resume: str | Path | None = None, overrides: Sequence[str] | None = None,
        console: Any = None, callbacks: Sequence[Callback] = (), log_interval: float = 10.0,
        data_root: str | Path | None = None) -> TrainResult:
    """Train ``cfg`` (or resume the run directory ``resume``) and return the run's result.

    ``console`` (a Rich Console) receives the header, progress and per-epoch lines; None trains silently.
    ``callbacks`` observe the loop (see fcclass.training.callbacks). ``overrides``: ``--set`` items (for resume: RESUMABLE_KEYS).
    ``data_root``: on resume, where the run's data is now (the image folder, or the torchvision root), if it moved.
    """
    if resume is None and data_root is not None:
        raise FcclassError("--data-root goes with --resume; for a new run set data.root or data.path (--set data.path=DIR).")
    if resume is None and cfg is None:
        cfg = load_config(overrides=list(overrides or []))
    job = from_env()  # under torchrun: only rank 0 prints, records and tracks
    tracker = mlflow_tracker(cfg, resume, overrides, console) if job.is_main else None  # None unless tracking is on
    observers: list[Callback] = [ConsoleProgress(console, log_interval)] if console is not None and job.is_main else []
    observers += [Curves(), RunRecord(), *callbacks, *([tracker] if tracker is not None else [])]  # last: logs the files the others wrote
    try:
        trainer = resume_trainer(resume, overrides or (), observers, data_root) if resume is not None else start_trainer(cfg, observers)
        result = trainer.fit()
        if job.enabled:
            trainer.finish_job()
        return result
    except BaseException as e:
        if tracker is not None:
            tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if job.enabled:
            shutdown()


def resume_config(run_dir: str | Path, overrides: Sequence[str] = (), data_root: str | Path | None = None) -> Config:
    """The config ``fcclass train --resume RUN_DIR --set ... [--data-root DIR]`` would continue with."""
    return config_for_resume(Path(run_dir), resumable_checkpoint(Path(run_dir)), overrides, data_root)
