"""Observers of the trainer: the console (header, progress, epoch lines), the curves PNG, and whatever comes next
(trackers, sweep pruning). The training loop calls these hooks and does not know who is watching."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from fcclass.training.trainer import Trainer, TrainResult


@dataclass
class BatchEnd:
    """Where the epoch stands after a batch. ``loss``/``accuracy`` are the epoch's running means as of the last
    synchronised batch (every batch on the CPU; every few batches on a GPU, so the loop never waits for it)."""

    epoch: int
    batch: int
    batches: int
    images: int  # training images seen so far this epoch
    loss: float
    accuracy: float
    seconds: float  # since the epoch started
    synced: bool = True  # loss and accuracy were computed at this batch (not carried over from an earlier one)


class Callback:
    """Hooks the trainer calls, in this order; each does nothing unless overridden."""

    decode_progress: Any = None  # a data.cache.Progress: shows an image folder being decoded into its cache, before training

    def on_fit_start(self, trainer: "Trainer") -> None: ...

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None: ...

    def on_batch_end(self, trainer: "Trainer", info: BatchEnd) -> None: ...

    def on_epoch_end(self, trainer: "Trainer", row: dict[str, Any], is_best: bool) -> None:
        """After every epoch. Setting ``trainer.stopped_by`` (e.g. "pruned") ends training after this epoch."""

    def on_interrupt(self, trainer: "Trainer", signal_name: str, epoch: int) -> None: ...

    def on_fit_error(self, trainer: "Trainer", error: BaseException) -> None:
        """Training stopped with an exception (a full disk, a diverged loss...), after the run directory was kept."""

    def on_fit_end(self, trainer: "Trainer", result: "TrainResult") -> None: ...


class ConsoleProgress(Callback):
    """Human output through Rich: the model and data tables, a live bar in a terminal (a progress line every
    ``log_interval`` seconds in a pipe or log file, where a bar would be invisible), one line per epoch."""

    def __init__(self, console: Any, log_interval: float = 10.0) -> None:
        self.console, self.log_interval = console, log_interval
        self.bar: Any = None
        self.last_line = 0.0
        self.decode_progress = DecodeProgress(console, log_interval)
        self.skipped = 0  # unreadable files reported so far

    def on_fit_start(self, trainer: "Trainer") -> None:
        from fcclass.training.console import print_training_header

        print_training_header(self.console, trainer)
        self.skipped = len(trainer.skipped_files())

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        self.last_line = time.monotonic()
        u = trainer.cfg.train.unfreeze
        if u is not None and epoch == u.epoch and epoch > 1:
            self.console.print(f"Epoch {epoch}: every layer trains from now on (train.unfreeze), at the scheduled learning "
                               f"rate x {u.lr_scale:g}.", highlight=False)
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(f"epoch {epoch}/{trainer.cfg.train.epochs}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[running]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=True,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=len(trainer.train_loader), running="")

    def on_batch_end(self, trainer: "Trainer", info: BatchEnd) -> None:
        if self.bar is not None:
            running = f"loss {info.loss:.4f}  acc {info.accuracy:.2%}" if info.loss == info.loss else ""  # NaN until synced
            self.bar.update(self.task, completed=info.batch, running=running)
        elif self.log_interval > 0 and time.monotonic() - self.last_line >= self.log_interval and info.batch < info.batches:
            self.last_line = time.monotonic()
            self.console.print(f"epoch {info.epoch}/{trainer.cfg.train.epochs}  batch {info.batch}/{info.batches}  "
                               f"loss {info.loss:.4f} acc {info.accuracy:.2%}  {info.seconds:.0f}s", highlight=False)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def on_epoch_end(self, trainer: "Trainer", row: dict[str, Any], is_best: bool) -> None:
        from fcclass.training.console import print_epoch, print_skipped

        self._close_bar()
        skipped = trainer.skipped_files()
        print_skipped(self.console, skipped, already=self.skipped)  # files a streamed split found unreadable this epoch
        self.skipped = len(skipped)
        print_epoch(self.console, row, trainer.cfg.train.epochs, is_best)
        es = trainer.cfg.train.early_stopping
        if trainer.state.stopped_early:
            self.console.print(f"Early stopping: {trainer.monitor_name(es.monitor)} has not improved for {es.patience} epoch(s).")

    def on_interrupt(self, trainer: "Trainer", signal_name: str, epoch: int) -> None:
        from rich.markup import escape

        from fcclass.files import shown

        self._close_bar()
        done = trainer.state.epoch
        if done:
            self.console.print(f"[yellow]{signal_name}: stopped in epoch {epoch}; the last completed epoch ({done}) is saved in "
                               f"{escape(shown(trainer.run_dir / 'last.pt'))}. Continue with: fcclass train --resume "
                               f"{escape(shown(trainer.run_dir))}{_processes(trainer)}[/yellow]")
        else:
            self.console.print(f"[yellow]{signal_name}: stopped in epoch {epoch} before any epoch completed; nothing was "
                               "saved.[/yellow]")


class DecodeProgress:
    """An image folder being decoded into its cache (data.cache.Progress), on ``console``: a Rich bar in a terminal
    (gone when done: the data notes then say what was built), a line every ``log_interval`` seconds elsewhere."""

    def __init__(self, console: Any, log_interval: float = 10.0) -> None:
        self.console, self.log_interval = console, log_interval
        self.bar: Any = None
        self.total, self.what, self.last_line = 0, "", 0.0

    def start(self, total: int, what: str) -> None:
        self.total, self.what, self.last_line = total, what, time.monotonic()
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=self.console, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("decode", total=total)

    def advance(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
        elif self.log_interval > 0 and time.monotonic() - self.last_line >= self.log_interval and done < self.total:
            self.last_line = time.monotonic()
            self.console.print(f"{self.what}: {done:,}/{self.total:,} images", highlight=False)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def decode_progress(callbacks: Any) -> Any:
    """The first of ``callbacks`` that shows a cache being built (the console's), or None."""
    return next((c.decode_progress for c in callbacks if c.decode_progress is not None), None)


class Curves(Callback):
    """Draws ``curves.png`` in the run directory when training ends (``fcclass plot`` redraws it)."""

    def on_fit_end(self, trainer: "Trainer", result: "TrainResult") -> None:
        if not result.history or result.removed:
            return
        from fcclass.errors import FcclassError
        from fcclass.runs.plots import plot_curves

        try:
            plot_curves(result.run_dir)
        except (OSError, FcclassError) as e:  # a missing figure must not fail a finished training run
            result.warnings.append(f"curves.png was not written: {e}")


def _processes(trainer: "Trainer") -> str:
    """The launcher option of a distributed run's resume command (one process also resumes it: the batch is global)."""
    job = getattr(trainer, "job", None)
    return f" --nproc-per-node {job.local_world}" if job is not None and job.enabled and job.world == job.local_world else ""
