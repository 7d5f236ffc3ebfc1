"""The trainer's built-in callbacks: what every run does besides the loop, each in one place and in the order Lightning
runs its own: divergence diagnosis after each batch; early stopping, then the checkpoints, after each epoch (so that
last.pt holds early stopping's count); the test pass when training ends, before any observer reports the result.

They run on every process of a distributed job (their decisions come from reduced metrics, so every rank decides the
same); only rank 0 writes files.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from fcclass.errors import FcclassError
from fcclass.files import RunWriteError, os_error_reason
from fcclass.runs.checkpoint import BEST, LAST
from fcclass.runs.layout import METRICS
from fcclass.runs.metrics import better_epoch, improved, write_metrics
from fcclass.training.callbacks import BatchEnd, Callback
from fcclass.training.state import TrainingDiverged

if TYPE_CHECKING:  # pragma: no cover
    from fcclass.training.state import TrainResult
    from fcclass.training.trainer import Trainer


class DivergenceCheck(Callback):
    """Stops training when the running training loss is no longer finite, with the most likely cause and its fix."""

    def on_batch_end(self, trainer: "Trainer", info: BatchEnd) -> None:
        if info.synced and not math.isfinite(info.loss):
            raise TrainingDiverged(f"The training loss became {info.loss} in epoch {info.epoch}, batch {info.batch}. "
                                   f"{divergence_cause(trainer)}{_what_is_kept(trainer)}")


def _what_is_kept(trainer: "Trainer") -> str:
    if trainer.state.epoch:
        return f" The best checkpoint so far (epoch {trainer.state.best_epoch}) is kept in {trainer.run_dir}."
    if not trainer.resumed:
        return " No epoch had completed, so the run directory was removed."
    return f" Nothing of the run in {trainer.run_dir} was changed."


def divergence_cause(trainer: "Trainer") -> str:
    """What most likely made the loss non-finite, judged from the weights and the settings, with the fix."""
    opt, train = trainer.cfg.optimizer, trainer.cfg.train
    if all(bool(torch.isfinite(p).all()) for p in trainer.params):
        return ("The weights are still finite, so the forward pass overflowed: check the data normalisation "
                "(data.normalize), train.class_weight and the layer sizes.")
    suspects = [f"optimizer.lr is {opt.lr:.3g} (learning rate now {trainer.schedule.lr:.3g})"]
    if opt.weight_decay > 0.1:
        suspects.insert(0, f"optimizer.weight_decay is {opt.weight_decay:.3g} (usually 1e-4 to 1e-2)")
    if opt.name in ("sgd", "rmsprop") and opt.momentum >= 1:
        suspects.insert(0, f"optimizer.momentum is {opt.momentum:.3g} (it must stay below 1, usually 0.9)")
    fix = "lower it" if len(suspects) == 1 else "lower them"
    clip = "" if train.grad_clip else ", or set train.grad_clip (e.g. 1.0)"
    return f"The weights became non-finite, so the optimizer's updates blew up: {'; '.join(suspects)}. {fix.capitalize()}{clip}."


class EarlyStopping(Callback):
    """train.early_stopping: counts the epochs since its monitor last improved by min_delta; at ``patience`` training
    stops after this epoch. The count is part of the trainer's state, so a resumed run goes on counting."""

    def on_epoch_end(self, trainer: "Trainer", row: dict[str, Any], is_best: bool) -> None:
        st, es = trainer.state, trainer.cfg.train.early_stopping
        monitor = trainer.monitor_name(es.monitor)
        if improved(row[monitor], st.es_best, monitor, es.min_delta):
            st.es_best, st.es_wait = row[monitor], 0
        else:
            st.es_wait += 1
        st.stopped_early = st.out_of_patience(es.patience)


class ModelCheckpoint(Callback):
    """The best epoch by train.checkpoint.monitor (a tie goes to the epoch better on the other metric:
    runs.metrics.better_epoch), then the files of the epoch: last.pt (resumable), best.pt (when the epoch is the best),
    metrics.csv, each written atomically. On a full disk or a read-only folder, training stops with the last good
    checkpoint intact and the message says how to go on."""

    def on_epoch_end(self, trainer: "Trainer", row: dict[str, Any], is_best: bool) -> None:
        st = trainer.state
        monitor = trainer.monitor_name(trainer.cfg.train.checkpoint.monitor)
        if better_epoch(row, st.best, monitor):
            st.best, st.best_epoch = dict(row), st.epoch
        if trainer.job.is_main:
            self.save(trainer, row, st.best_epoch == st.epoch)

    @staticmethod
    def save(trainer: "Trainer", row: dict[str, Any], is_best: bool) -> None:
        run_dir = trainer.run_dir
        assert run_dir is not None
        what = LAST
        try:
            trainer.checkpoint(row, training=True).save(run_dir / LAST)
            what = BEST
            if is_best:
                trainer.checkpoint(row, training=False).save(run_dir / BEST)
            what = METRICS
            write_metrics(run_dir, trainer.state.history)
        except OSError as e:
            epoch = trainer.state.epoch
            kept = epoch - (1 if what == LAST else 0)
            raise RunWriteError(
                f"Cannot write {what} in '{run_dir}': {os_error_reason(e)}. Training stopped in epoch {epoch}; the last good "
                f"checkpoint (epoch {kept}) is kept in {run_dir / LAST}. Free some space (or make the folder writable), then "
                f"continue with: fcclass train --resume {run_dir}") from None


class TestAtEnd(Callback):
    """train.test_at_end: one pass of the best checkpoint over the test split when training ends (writing eval.json and
    confusion_matrix.png, as `fcclass eval` does). A failure is a warning: the model is trained and saved either way."""

    def on_fit_end(self, trainer: "Trainer", result: "TrainResult") -> None:
        if not (trainer.cfg.train.test_at_end and trainer.job.is_main and not result.interrupted and not result.stopped_by
                and result.best_epoch is not None):
            return
        from fcclass.inference.evaluate import evaluate  # torchmetrics is imported only when a run is tested

        try:
            report = evaluate(trainer.run_dir, device=str(trainer.device), save=True)
        except (FcclassError, OSError) as e:
            result.warnings.append(f"the test split was not evaluated: {e}")
            return
        result.test = {"epoch": result.best_epoch, "accuracy": report.accuracy, "loss": report.loss,
                       "images": report.num_samples, "top5_accuracy": report.top5_accuracy}


def builtin_callbacks() -> list[Callback]:
    """In the order they run, before the run's observers (console, record, curves, trackers, sweeps)."""
    return [DivergenceCheck(), EarlyStopping(), ModelCheckpoint(), TestAtEnd()]
