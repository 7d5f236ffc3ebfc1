"""The trainer: the loop over epochs and batches, one optimisation step, validation. Its state is a typed dataclass
(fcclass.training.state); what a run does besides the loop is a callback: the built-in ones (divergence, early stopping,
checkpoints, the test pass: fcclass.training.builtin) and the observers (console, curves, record, trackers). Building a
trainer for a new or resumed run is fcclass.training.setup's. No Rich and no plotting here."""

from __future__ import annotations

import gc
import math
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from fcclass.config.registries import OPTIMIZERS
from fcclass.config.sections import Config
from fcclass.data import (
    BatchPreprocess,
    Dataset,
    class_weights,
    epoch_seed,
    make_loader,
)
from fcclass.device import autocast, precision_name, select_device, select_precision
from fcclass.errors import FcclassError
from fcclass.inference.load import inference_dtype, run_model
from fcclass.inference.metrics import Score, count_correct, score
from fcclass.memory import check_training
from fcclass.model.network import Network, build_model
from fcclass.runs.checkpoint import Checkpoint
from fcclass.runs.metrics import monitored
from fcclass.training.builtin import builtin_callbacks
from fcclass.training.callbacks import BatchEnd, Callback
from fcclass.training.distributed import (
    SYNC_BATCHNORM_NEEDS_CUDA,
    PeerFailed,
    all_sum,
    barrier,
    batch_loss,
    broadcast_buffers,
    init,
    is_peer_error,
    peer_failed,
    shard,
)
from fcclass.training.schedule import LRSchedule, plan_batch
from fcclass.training.state import TrainResult, TrainState, keep_zeros, stop_on_signals
from fcclass.training.transfer import everything_frozen_message, scaled_lr, start_weights, thaw


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """One run's training. Build it with ``setup.start_trainer(cfg)`` (a new run directory) or
    ``setup.resume_trainer(run_dir)``, then ``fit()``. Callbacks observe every step; the trainer itself writes only the
    run directory, through its built-in callbacks."""

    def __init__(self, cfg: Config, run_dir: Path | None, data: Dataset, mean: list[float], std: list[float],
                 state: TrainState, callbacks: Sequence[Callback] = (), resumed: bool = False, new_weights: bool = False) -> None:
        assert data.train is not None and data.val is not None
        self.cfg, self.run_dir, self.data, self.mean, self.std, self.state = cfg, run_dir, data, mean, std, state
        self.job, device = init(cfg.train.device)  # torchrun: this rank, its device, the process group
        self.callbacks = list(callbacks) if self.job.is_main else []  # side effects (console, files, trackers): rank 0's
        self.builtins = builtin_callbacks()  # every rank's: divergence, early stopping, checkpoints, the test pass
        self.resumed = resumed
        self.replanned = False  # resumed with another train.epochs: the LR schedule was re-planned
        self.device = select_device(device)
        self.amp_dtype = select_precision(cfg.train.precision, self.device)
        torch.manual_seed(cfg.seed)  # the initial weights
        self.input_shape = model_input_shape(cfg, data)
        plan = build_model(cfg.model, self.input_shape, data.info.num_classes, device="meta")
        check_training(plan, min(cfg.data.batch_size, len(data.train)), self.device)  # before a single weight is allocated
        self.model: Network = build_model(cfg.model, self.input_shape, data.info.num_classes).to(self.device)
        self.lr_factor, self.thawed = 1.0, False  # train.unfreeze: its lr_scale once every layer trains
        self.weight_notes: list[str] = []  # pretrained backbones: which weights, from where
        self.init_from = start_weights(self, mean, std, new_weights)
        self.net = self._wrap_ddp()  # what training steps call: the model itself, or its DDP wrapper under torchrun
        self.class_weights = class_weights(cfg.train.class_weight, data.info)
        d = cfg.data
        skip = d.on_unreadable == "skip"
        self.batch = plan_batch(d.batch_size, cfg.train.short_run_steps, len(data.train), cfg.train.epochs, state.batch_size)
        state.batch_size = self.batch.batch_size
        self.train_loader = make_loader(data.train, self.batch.batch_size, True, cfg.seed, data.channels, data.size,
                                        balanced=d.sampler == "balanced", device=self.device, num_workers=d.num_workers, job=self.job,
                                        skip=skip)
        val = data.val.subset(shard(torch.arange(len(data.val)), self.job)) if self.job.enabled else data.val
        self.val_loader = (make_loader(val, 256, False, cfg.seed, data.channels, data.size, device=self.device,
                                       num_workers=d.num_workers, skip=skip) if len(data.val) else None)
        self.train_prep = BatchPreprocess(mean, std, d.augment, cfg.seed)
        self.eval_prep = BatchPreprocess(mean, std)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise FcclassError(everything_frozen_message(cfg, self.model, self.state.frozen))
        # frozen weights have no gradient, so the optimizer leaves them be; it holds them only when train.unfreeze will
        # thaw them (its state then keeps one layout across a resume)
        params = [p for p in self.model.parameters() if p.requires_grad or cfg.train.unfreeze is not None]
        self.params = params
        self.optimizer = OPTIMIZERS[cfg.optimizer.name](params, self.batch.scaled_optimizer(cfg.optimizer))
        self.schedule = LRSchedule(self.optimizer, self.batch.scaled_scheduler(cfg.scheduler), cfg.train.epochs, len(self.train_loader))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        weight = self.class_weights.to(self.device) if self.class_weights is not None else None
        self.loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)
        self.sync_every = 1 if self.device.type == "cpu" else 25  # reading the loss waits for the GPU
        self._stop: dict[str, Any] = {"signal": None}
        self.lock: Any = None  # held while this process trains the run (runs.lock_run)
        self.stopped_by: str | None = None  # a callback ended training after an epoch (e.g. "pruned" by a sweep)

    def _wrap_ddp(self, convert: bool = True) -> nn.Module:
        """Under torchrun, DistributedDataParallel around the model (its gradients averaged over the ranks in backward);
        with train.sync_batchnorm, BatchNormalization first becomes SyncBatchNorm (batch statistics over every rank)."""
        if not self.job.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        if self.cfg.train.sync_batchnorm and convert:
            if self.device.type != "cuda":
                raise FcclassError(SYNC_BATCHNORM_NEEDS_CUDA)
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.model.freeze(self.model.frozen_layers())  # the frozen layers' norms are new modules now
        try:
            return DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        except RuntimeError as e:
            raise peer_failed(self.job, e) from None

    def restore(self, ckpt: Checkpoint) -> None:
        """Weights, optimizer, schedule and grad scaler from ``ckpt``. A schedule planned for another number of
        epochs (``--set train.epochs=N`` on resume) is re-planned for the new one and stepped to where the run is."""
        self.model.load_state_dict(ckpt.model_state)
        planned = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        if self.schedule.same_plan(ckpt.schedule_state or {}):
            self.schedule.load_state_dict(ckpt.schedule_state or {})
        else:
            for group, values in zip(self.optimizer.param_groups, planned):
                group.update(values)
            self.replanned = True
            monitor = self.monitor_name(self.cfg.scheduler.monitor)
            self.schedule.fast_forward(self.state.epoch, lambda e: self.state.history[e - 1].get(monitor))
        if self.scaler is not None and ckpt.scaler_state:
            self.scaler.load_state_dict(ckpt.scaler_state)

    def checkpoint(self, row: dict[str, Any] | None, training: bool) -> Checkpoint:
        """The checkpoint of the current state: best.pt's (inference) or last.pt's (``training``: resumable)."""
        ckpt = Checkpoint(self.model.state_dict(), self.cfg.to_dict(), list(self.data.info.class_names), list(self.input_shape),
                          list(self.mean), list(self.std), self.state.epoch, row)
        if training:
            ckpt.optimizer_state, ckpt.schedule_state = self.optimizer.state_dict(), self.schedule.state_dict()
            ckpt.scaler_state = self.scaler.state_dict() if self.scaler is not None else None
            ckpt.train_state = self.state.to_dict()
        return ckpt

    def skipped_files(self) -> list[tuple[Path, str]]:
        """The files left out as unreadable (data.on_unreadable: skip): before training, and those a streamed split
        found in an epoch (each still in its split, left out of its batch every epoch)."""
        found = list(self.data.skipped)
        for loader in (self.train_loader, self.val_loader):
            split = getattr(loader, "split", None)
            found += [(split.files[i], why) for i, why in sorted(getattr(loader, "skipped", {}).items())] if split is not None else []
        return found

    def monitor_name(self, name: str) -> str:
        """The metric actually monitored: without a validation split, train_* stands in for val_*."""
        return monitored(name, self.val_loader is not None)

    # ------------------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        """Train until train.epochs, early stopping, a signal or a callback's stop. train.threads applies while it runs:
        the caller's torch thread count is restored afterwards."""
        threads = torch.get_num_threads()
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        try:
            return self._fit()
        finally:
            torch.set_num_threads(threads)

    def _fit(self) -> TrainResult:
        assert self.run_dir is not None or not self.job.is_main
        self._emit("on_fit_start")
        if self.cfg.train.keep_pruned:
            keep_zeros(self.model)
        result = TrainResult(self.run_dir, self.state.history, None, None, device=str(self.device),
                             precision=precision_name(self.amp_dtype), batch_size=self.batch.batch_size)
        try:
            with stop_on_signals() as stop:
                self._stop = stop
                for epoch in range(self.state.epoch + 1, self.cfg.train.epochs + 1):
                    thaw(self, epoch)
                    self._emit("on_epoch_start", epoch)
                    started = time.perf_counter()
                    row = self.train_epoch(epoch)
                    if row is None:
                        result.interrupted = stop["signal"] or "a signal to another process of the job"
                        self._emit("on_interrupt", result.interrupted, epoch)
                        break
                    row.update(self.validate())
                    row["seconds"] = time.perf_counter() - started
                    is_best = self.end_epoch(row)
                    self._emit("on_epoch_end", row, is_best)
                    if self.state.stopped_early or self.stopped_by:
                        break
        except BaseException as e:
            self._release()
            if self.run_dir is not None and self.state.epoch == 0 and not self.resumed:
                shutil.rmtree(self.run_dir, ignore_errors=True)  # nothing was learned: leave no half-made run behind
            else:
                self._emit("on_fit_error", e)
            if isinstance(e, PeerFailed) or (self.job.enabled and isinstance(e, RuntimeError) and is_peer_error(e)):
                raise peer_failed(self.job, getattr(e, "error", e), self.run_dir) from None
            raise
        self._release()
        if result.interrupted and self.state.epoch == 0 and not self.resumed and self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            result.removed = True
        result.history, result.best_epoch, result.best = self.state.history, self.state.best_epoch, self.state.best
        result.stopped_early = self.state.stopped_early
        result.stopped_by = self.stopped_by
        self._emit("on_fit_end", result, builtins=True)
        return result

    def _set_epoch(self, epoch: int) -> None:
        """Every random stream of an epoch (order, augmentation, dropout) is seeded from (seed, epoch): a resumed run
        repeats an uninterrupted one exactly, with no generator state to carry over."""
        self.train_loader.set_epoch(epoch)
        self.train_prep.set_epoch(epoch, self.job.rank)
        torch.manual_seed(epoch_seed(self.cfg.seed, epoch, "model" if not self.job.rank else f"model:{self.job.rank}"))

    def train_epoch(self, epoch: int) -> dict[str, Any] | None:
        """One pass over the training split; None if a signal stopped it."""
        self._set_epoch(epoch)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)  # float32: MPS has no float64
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        seen, images, lr_sum, batches = 0, 0, 0.0, len(self.train_loader)
        loss_mean = accuracy = float("nan")
        stop = False
        started = time.perf_counter()
        for batch, (x, y) in enumerate(self._batches(), 1):
            lr_sum += self.schedule.lr * self.lr_factor
            # the job's batch, of which this rank has its part; one process: the batch less its unreadable files (skip)
            whole = self.train_loader.global_size(batch - 1) if self.job.enabled else y.numel()
            if not whole or not y.numel():
                if self.job.enabled:
                    raise FcclassError(f"Every image of this process's part of batch {batch} is unreadable "
                                       "(data.on_unreadable: skip); with DDP every process needs images in every batch.")
                continue  # every image of the batch was unreadable
            loss, logits, y = self.step(x, y, whole)
            loss_sum += loss * whole  # summed over the ranks: the whole batch's mean loss times its images
            correct += count_correct(logits, y)
            seen, images = seen + y.numel(), images + whole
            synced = batch % self.sync_every == 0 or batch == batches
            if synced:
                loss_mean, accuracy, stop = self._running_means(loss_sum, correct, seen)
            info = BatchEnd(epoch, batch, batches, images, loss_mean, accuracy, time.perf_counter() - started, synced)
            self._emit("on_batch_end", info, builtins=True)
            if stop or (self._stop["signal"] and not self.job.enabled):
                return None
        if self._stop["signal"] and not self.job.enabled:  # the loader stopped early: its workers got the signal too
            return None
        return {"epoch": epoch, "train_loss": loss_mean, "train_accuracy": accuracy, "lr": lr_sum / max(batches, 1)}

    def _running_means(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, float, bool]:
        """The epoch's mean loss and accuracy so far, and whether to stop; under torchrun, summed over every rank, so
        that all ranks agree (a signal to any process stops every one at the same batch, with nothing left waiting)."""
        if not self.job.enabled:
            return float(loss_sum) / seen, float(correct) / seen, bool(self._stop["signal"])
        flag = 1.0 if self._stop["signal"] else 0.0
        totals = all_sum(torch.stack([loss_sum.float(), correct.float(), loss_sum.new_tensor(float(seen)),
                                      loss_sum.new_tensor(flag)]), self.job).tolist()
        return totals[0] / totals[2], totals[1] / totals[2], totals[3] > 0

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training loader's batches. A signal sent to the whole process group (timeout, Slurm, systemd) also
        kills the DataLoader's workers; the loader then raises, and the stop is the signal's, not an error."""
        try:
            yield from self.train_loader
        except RuntimeError as e:
            if "DataLoader worker" not in str(e):
                raise
            if self._stop["signal"] is None:
                time.sleep(0.5)  # the signal reaches this process's handler a moment later
            if self._stop["signal"] is None:
                raise FcclassError(f"{e} Out of memory? Lower data.num_workers or data.batch_size.") from None

    def step(self, x: torch.Tensor, y: torch.Tensor, whole: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimisation step on a uint8 batch; returns the (detached) loss, logits and labels on the device.
        ``whole``: the images of the job's batch, of which this rank has its part; its loss is this rank's part of the
        whole batch's loss (distributed.batch_loss)."""
        x = self.train_prep(x.to(self.device, non_blocking=True), train=True)
        y = y.to(self.device, non_blocking=True)
        with autocast(self.device, self.amp_dtype):
            try:
                logits = self.net(x)
            except ValueError as e:  # BatchNorm with one value per channel: a last batch of one image, a 1x1 map
                raise FcclassError(f"{e}. BatchNormalization needs more than one value per channel while training: set "
                                   "data.batch_size so that the training split does not leave a last batch of one image, or "
                                   "move BatchNormalization before the layer that shrinks the feature map to 1x1.") from None
            loss = batch_loss(self.loss_fn, logits.float(), y, whole, self.job)
        reg = self.model.regularization_loss()
        total = loss * self.job.world if self.job.enabled else loss  # DDP averages the ranks' gradients
        total = total + reg if reg is not None else total
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.cfg.train.grad_clip
        with scaled_lr(self.optimizer, self.lr_factor):
            if self.scaler is not None:
                self.scaler.scale(total).backward()
                if clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.params, clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                total.backward()
                if clip:
                    nn.utils.clip_grad_norm_(self.params, clip)
                self.optimizer.step()
        self.schedule.after_batch()
        return loss.detach(), logits.detach(), y

    def validate(self) -> dict[str, float | None]:
        """Keras's val_loss: the training loss function (label smoothing included, class weights not) on val data. In
        the precision of `fcclass eval` (fp32), whatever training's: the best epoch's val accuracy is eval's on best.pt."""
        if self.val_loader is None:
            return {"val_loss": None, "val_accuracy": None}
        broadcast_buffers(self.model, self.job)  # every rank validates with rank 0's BatchNorm statistics
        logits, labels = run_model(self.model, self.val_loader, self.eval_prep, self.device, inference_dtype(self.device))
        total = score(logits, labels, self.cfg.train.label_smoothing)  # under torchrun: this rank's shard of the val split
        if self.job.enabled:
            total = Score.from_tensor(all_sum(total.to_tensor(self.device), self.job))
        return {"val_loss": total.loss, "val_accuracy": total.accuracy}

    def end_epoch(self, row: dict[str, Any]) -> bool:
        """Record the epoch and step the schedule; then the built-in callbacks judge it (early stopping, the best
        checkpoint) and write its files. Returns whether it is the best epoch."""
        self.state.history.append(row)
        self.state.epoch = row["epoch"]
        self.schedule.after_epoch(row[self.monitor_name(self.cfg.scheduler.monitor)])
        for callback in self.builtins:
            callback.on_epoch_end(self, row, False)
        return self.state.best_epoch == self.state.epoch

    def finish_job(self) -> None:
        """Under torchrun, after a successful fit: wait until every rank is done (rank 0 tests the best model while the
        others would already exit), then drop the DDP wrapper, which holds the process group, so that fit()'s
        destroy_process_group really tears it down. Left to the interpreter's exit instead, gloo's threads were
        sometimes destroyed unjoined: the rank died with SIGABRT ("terminate called without an active exception")."""
        barrier(self.job)
        self.net = self.model
        gc.collect()

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def _emit(self, hook: str, *args: Any, builtins: bool = False) -> None:
        """Call ``hook`` on the run's observers; ``builtins``: on the built-in callbacks first (epochs end through
        end_epoch, which calls them before the observers learn whether the epoch was the best)."""
        for callback in (*self.builtins, *self.callbacks) if builtins else self.callbacks:
            getattr(callback, hook)(self, *args)


# ----------------------------------------------------------------------------- helpers
def model_input_shape(cfg: Config, ds: Dataset) -> list[int]:
    data_shape = list(ds.info.input_shape)
    want = cfg.model.input_shape
    if want is None or want == data_shape:
        return data_shape
    if len(want) == 1 and want[0] == math.prod(data_shape):
        return data_shape  # [features] for an MLP over images: the model flattens them
    raise FcclassError(
        f"model.input_shape is {want} but the data gives images of shape {data_shape} (channels, height, width). "
        f"Remove model.input_shape to use the data's shape, or set data.image_size / data.channels to match."
    )
