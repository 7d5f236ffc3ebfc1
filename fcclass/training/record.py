"""RunRecord: the callback that keeps a run's summary.json (fcclass.runs.summary) up to date as the trainer goes: at
the start, after every epoch, and when it stops (finished, interrupted, failed, pruned)."""

from __future__ import annotations

import platform
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcclass.runs.layout import SUMMARY
from fcclass.runs.summary import (
    FORMAT,
    Best,
    Epochs,
    InitFromRecord,
    SkippedFile,
    Summary,
    command_line,
    git_state,
    now,
    read_summary,
    write_summary,
)
from fcclass.training.callbacks import Callback

if TYPE_CHECKING:  # pragma: no cover
    from fcclass.training.trainer import Trainer, TrainResult


def environment(trainer: "Trainer") -> dict[str, Any]:
    import torch
    import torchvision

    from fcclass.version import __version__

    return {
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "fcclass": __version__},
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": str(trainer.device),
        "precision": _precision(trainer),
        "threads": torch.get_num_threads(),
        "batch_size": trainer.batch.batch_size,
        "distributed": _distributed(trainer),
        "command": command_line(),
    }


def _distributed(trainer: "Trainer") -> dict[str, Any] | None:
    """torchrun's job (processes, machines, backend), or None for one process."""
    job = getattr(trainer, "job", None)
    if job is None or not job.enabled:
        return None
    from fcclass.training.distributed import backend

    return {"processes": job.world, "nodes": job.nodes, "backend": backend(trainer.device.type)}


def _precision(trainer: "Trainer") -> str:
    from fcclass.device import precision_name

    return precision_name(trainer.amp_dtype)


def _round(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if not row:
        return None
    from fcclass.runs.metrics import rounded_row

    return rounded_row(row)


class RunRecord(Callback):
    """Keeps RUN_DIR/summary.json up to date while a run trains. A failed write is a warning, never a failed run."""

    def __init__(self) -> None:
        self.summary = Summary()
        self.session_start = 0.0
        self.previous_wall = 0.0
        self.warned = False
        self.skipped_before: list[SkippedFile] = []  # what earlier sessions of the run found

    # ------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: "Trainer") -> None:
        old = read_summary(trainer.run_dir) or Summary()
        self.skipped_before = list(old.skipped or [])
        self.session_start = time.monotonic()
        self.previous_wall = old.wall_seconds or 0.0
        counts = trainer.model.summary()  # Keras's counts, as fcclass summary shows them (BatchNorm statistics included)
        cfg = trainer.cfg
        self.summary = Summary(
            format=FORMAT,
            name=cfg.name,
            run_dir=str(Path(trainer.run_dir).absolute()),
            state="running",
            started=old.started or now(),
            ended=None,
            wall_seconds=self.previous_wall,
            sessions=(old.sessions or 0) + 1,
            git=git_state(),
            **environment(trainer),
            dataset=cfg.data.dataset,
            data=getattr(cfg.data, cfg.data.location_key),
            data_version=cfg.data.version,
            init_from=InitFromRecord(**trainer.init_from.record()) if trainer.init_from is not None else old.init_from,
            pretrained=trainer.weight_notes or old.pretrained,
            params=counts.total_params,
            trainable_params=counts.trainable_params,
            epochs=Epochs(planned=cfg.train.epochs, done=trainer.state.epoch),
            best=self._best(trainer),
            last=_round(trainer.state.history[-1]) if trainer.state.history else None,
            test=old.test,
            stopped_early=trainer.state.stopped_early,
            error=None,
        )
        skipped = self._skipped(trainer)
        if skipped:  # the key only in records of runs that left files out
            self.summary.skipped = skipped
        self._write(trainer)

    def on_epoch_end(self, trainer: "Trainer", row: dict[str, Any], is_best: bool) -> None:
        s = self.summary
        assert s.epochs is not None  # set by on_fit_start
        s.epochs.done, s.best, s.last = trainer.state.epoch, self._best(trainer), _round(row)
        skipped = self._skipped(trainer)
        if skipped:
            s.skipped = skipped
        s.stopped_early = trainer.state.stopped_early
        s.test = None if is_best else s.test  # a new best checkpoint: its test is not measured yet
        self._write(trainer)

    def on_interrupt(self, trainer: "Trainer", signal_name: str, epoch: int) -> None:
        self.summary.state, self.summary.error = "interrupted", f"{signal_name} in epoch {epoch}"

    def on_fit_error(self, trainer: "Trainer", error: BaseException) -> None:
        self.summary.state, self.summary.error = "failed", str(error)[:1000] or type(error).__name__
        self._finish(trainer)

    def on_fit_end(self, trainer: "Trainer", result: "TrainResult") -> None:
        if result.removed:
            return
        if self.summary.state == "running":
            self.summary.state = result.stopped_by or "finished"
        if result.test is not None:
            self.summary.test = result.test
        self._finish(trainer, result)

    # ------------------------------------------------------------------------- writing
    def _skipped(self, trainer: "Trainer") -> list[SkippedFile] | None:
        """Every file the run left out as unreadable, in all its sessions; None (no key) when there is none."""
        found = {f.path: f for f in self.skipped_before}
        for path, why in trainer.skipped_files():
            found.setdefault(str(path), SkippedFile(path=str(path), reason=why))
        return list(found.values()) or None

    def _best(self, trainer: "Trainer") -> Best | None:
        best = _round(trainer.state.best)
        return Best.model_validate({"epoch": trainer.state.best_epoch, **best}) if best else None

    def _finish(self, trainer: "Trainer", result: "TrainResult | None" = None) -> None:
        self.summary.ended = now()
        self._write(trainer, result)

    def _write(self, trainer: "Trainer", result: "TrainResult | None" = None) -> None:
        self.summary.wall_seconds = round(self.previous_wall + time.monotonic() - self.session_start, 1)
        try:
            write_summary(trainer.run_dir, self.summary)
        except (OSError, ValueError) as e:
            if not self.warned and result is not None:
                result.warnings.append(f"{SUMMARY} was not written: {e}")
            self.warned = True
