"""The trainer: setup, one epoch, validation, checkpoints. Training state is a typed dataclass; side effects other
than the run directory (console output, curves, trackers) are callbacks. No Rich and no plotting here."""

from __future__ import annotations

import csv
import gc
import io
import json
import math
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from fcclass.callbacks import BatchEnd, Callback, ConsoleProgress, Curves, decode_progress, monitored
from fcclass.config import Config, load_config
from fcclass.data import (BatchPreprocess, Dataset, SplitRecord, class_weights, dataset_from_record, epoch_seed,
                          describe, load_dataset, make_loader, normalization)
from fcclass.data import data_root as data_location
from fcclass.device import autocast, precision_name, select_device, select_precision
from fcclass.distributed import (SYNC_BATCHNORM_NEEDS_CUDA, PeerFailed, all_sum, broadcast_buffers, check_same_config, from_env,
                                 barrier, init, is_peer_error, loss_scale, main_first, peer_failed, shard, shutdown)
from fcclass.errors import CheckpointError, FcclassError
from fcclass.files import RunWriteError, atomic_write_text, os_error_reason
from fcclass.inference import run_model
from fcclass.memory import check_training
from fcclass.model import Network, build_model
from fcclass.record import RunRecord
from fcclass.registries import DATASETS, OPTIMIZERS, TorchvisionSet
from fcclass.resume import (RESUMABLE_KEYS, RunFinished, check_more_to_train, config_for_resume, resumable_checkpoint,
                            with_absolute_paths)
from fcclass.runs import BEST, LAST, Checkpoint, create_run_dir, lock_run
from fcclass.schedule import LRSchedule
from fcclass.tracking import mlflow_tracker

__all__ = ["RESUMABLE_KEYS", "RunFinished", "TrainResult", "TrainState", "Trainer", "TrainingDiverged", "fit", "resume_config"]

METRIC_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


class TrainingDiverged(FcclassError):
    """The loss became NaN or infinite."""


@dataclass
class TrainState:
    """Everything about the progress of a run that resume needs, beyond the weights and optimizer."""

    epoch: int = 0  # completed epochs
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per completed epoch
    best_epoch: int | None = None
    best: dict[str, Any] | None = None  # the best epoch's row (train.checkpoint.monitor)
    es_best: float | None = None  # early stopping: best value of its monitor so far
    es_wait: int = 0  # early stopping: epochs since it improved
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainState":
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, Any]]
    best_epoch: int | None
    best: dict[str, Any] | None
    stopped_early: bool = False
    interrupted: str | None = None  # the signal that stopped training (SIGINT, SIGTERM), if one did
    removed: bool = False  # interrupted before any epoch completed: the run directory was removed
    device: str = "cpu"
    precision: str = "fp32"
    warnings: list[str] = field(default_factory=list)
    test: dict[str, Any] | None = None  # the best checkpoint on the test split (train.test_at_end): accuracy, loss...
    stopped_by: str | None = None  # what ended training early besides early stopping (a sweep's pruner: "pruned")


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


def _check_fits_early(cfg: Config) -> None:
    """For the in-memory datasets, whose shape is known without reading them: refuse a model that cannot be trained
    here before spending minutes loading the data (Trainer checks again, for every dataset, before building)."""
    if not isinstance(DATASETS[cfg.data.dataset], TorchvisionSet):
        return
    shape, num_classes = describe(cfg.data)
    if cfg.model.input_shape in (None, list(shape)):
        plan = build_model(cfg.model, list(shape), num_classes, device="meta")
        check_training(plan, min(cfg.data.batch_size, cfg.data.limit_train or cfg.data.batch_size), select_device(cfg.train.device))


@contextmanager
def stop_on_signals() -> Iterator[dict[str, Any]]:
    """SIGINT/SIGTERM set a flag: the loop stops at the next batch with the last completed epoch saved."""
    flag: dict[str, Any] = {"signal": None, "at": 0.0}

    def handler(signum: int, frame: Any) -> None:
        # A second Ctrl-C stops at once; but signals within a second of the first are the same stop: a terminal's
        # Ctrl-C reaches torchrun's processes directly and again from torchrun's agent (SIGINT, then SIGTERM) within
        # milliseconds, and the job must still stop at a batch boundary with its last epoch saved.
        if flag["signal"] is not None:
            if time.monotonic() - flag["at"] < 1.0:
                return
            raise KeyboardInterrupt
        flag["signal"], flag["at"] = signal.Signals(signum).name, time.monotonic()

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def metrics_csv(history: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def _improved(value: float, best: float | None, monitor: str, min_delta: float = 0.0) -> bool:
    if best is None:
        return True
    return value < best - min_delta if monitor.endswith("loss") else value > best + min_delta


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """One run's training. Build it with ``Trainer.start(cfg)`` (a new run directory) or ``Trainer.resume(run_dir)``,
    then ``fit()``. Callbacks observe every step; the trainer itself writes only the run directory."""

    def __init__(self, cfg: Config, run_dir: Path | None, data: Dataset, mean: list[float], std: list[float],
                 state: TrainState, callbacks: Sequence[Callback] = (), resumed: bool = False) -> None:
        assert data.train is not None and data.val is not None
        self.cfg, self.run_dir, self.data, self.mean, self.std, self.state = cfg, run_dir, data, mean, std, state
        self.job, device = init(cfg.train.device)  # torchrun: this rank, its device, the process group
        self.callbacks = list(callbacks) if self.job.is_main else []  # side effects (console, files, trackers): rank 0's
        self.resumed = resumed
        self.replanned = False  # resumed with another train.epochs: the LR schedule was re-planned
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = select_device(device)
        self.amp_dtype = select_precision(cfg.train.precision, self.device)
        torch.manual_seed(cfg.seed)  # the initial weights
        self.input_shape = model_input_shape(cfg, data)
        plan = build_model(cfg.model, self.input_shape, data.info.num_classes, device="meta")
        check_training(plan, min(cfg.data.batch_size, len(data.train)), self.device)  # before a single weight is allocated
        self.model: Network = build_model(cfg.model, self.input_shape, data.info.num_classes).to(self.device)
        self.net = self._wrap_ddp()  # what training steps call: the model itself, or its DDP wrapper under torchrun
        self.class_weights = class_weights(cfg.train.class_weight, data.info)
        d = cfg.data
        self.train_loader = make_loader(data.train, d.batch_size, True, cfg.seed, data.channels, data.size,
                                        balanced=d.sampler == "balanced", device=self.device, num_workers=d.num_workers, job=self.job)
        val = data.val.subset(shard(torch.arange(len(data.val)), self.job)) if self.job.enabled else data.val
        self.val_loader = (make_loader(val, 256, False, cfg.seed, data.channels, data.size, device=self.device,
                                       num_workers=d.num_workers) if len(data.val) else None)
        self.train_prep = BatchPreprocess(mean, std, d.augment, cfg.seed)
        self.eval_prep = BatchPreprocess(mean, std)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise FcclassError("Every layer is frozen (trainable: false), so there is nothing to train; unfreeze at least one layer.")
        self.params = params
        self.optimizer = OPTIMIZERS[cfg.optimizer.name](params, cfg.optimizer)
        self.schedule = LRSchedule(self.optimizer, cfg.scheduler, cfg.train.epochs, len(self.train_loader))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        weight = self.class_weights.to(self.device) if self.class_weights is not None else None
        self.loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)
        self.sync_every = 1 if self.device.type == "cpu" else 25  # reading the loss waits for the GPU
        self._stop: dict[str, Any] = {"signal": None}
        self.lock: Any = None  # held while this process trains the run (runs.lock_run)
        self.stopped_by: str | None = None  # a callback ended training after an epoch (e.g. "pruned" by a sweep)

    def _wrap_ddp(self) -> nn.Module:
        """Under torchrun, DistributedDataParallel around the model (its gradients averaged over the ranks in backward);
        with train.sync_batchnorm, BatchNormalization first becomes SyncBatchNorm (batch statistics over every rank)."""
        if not self.job.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        if self.cfg.train.sync_batchnorm:
            if self.device.type != "cuda":
                raise FcclassError(SYNC_BATCHNORM_NEEDS_CUDA)
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        try:
            return DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        except RuntimeError as e:
            raise peer_failed(self.job, e) from None

    # ------------------------------------------------------------------------- building
    @classmethod
    def start(cls, cfg: Config, callbacks: Sequence[Callback] = ()) -> "Trainer":
        """A new run: draw and record the splits, build everything, then create the run directory."""
        cfg = with_absolute_paths(cfg)
        job, _ = init(cfg.train.device)
        check_same_config(job, cfg.to_dict())
        _check_fits_early(cfg)
        with main_first(job):  # each machine's first process downloads, unpacks or caches the data for the others
            data = load_dataset(cfg.data, cfg.seed, splits=("train", "val"),  # the test split is recorded, not loaded
                                progress=decode_progress(callbacks))
        mean, std = normalization(cfg.data, data)
        trainer = cls(cfg, None, data, mean, std, TrainState(), callbacks)
        if not job.is_main:
            return trainer  # only rank 0 writes the run directory
        record = data.record()
        run_dir = trainer.run_dir = create_run_dir(cfg.train.runs_dir, cfg.name)
        trainer.lock = lock_run(run_dir)
        try:
            for name, text in (("config.yaml", cfg.to_yaml()), ("classes.json", json.dumps(data.info.class_names, indent=2) + "\n"),
                               ("splits.json", record.to_json())):
                atomic_write_text(run_dir / name, text)
            trainer.checkpoint(None, training=True).save(run_dir / LAST)  # epoch 0: a run killed in epoch 1 can resume
        except OSError as e:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise RunWriteError(f"Cannot write the new run directory '{run_dir}': {os_error_reason(e)}. "
                                "Set train.runs_dir to a writable folder with free space.") from None
        return trainer

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: Sequence[str] = (), callbacks: Sequence[Callback] = (),
               data_root: str | Path | None = None) -> "Trainer":
        """Continue a run from its last completed epoch, with the config it was trained with (and the ``--set``
        changes RESUMABLE_KEYS allows); the recorded splits, so the data is the same (``data_root``: where it is now,
        if it moved)."""
        run_dir = Path(run_dir)
        ckpt = resumable_checkpoint(run_dir)
        cfg = config_for_resume(run_dir, ckpt, overrides, data_root)
        job, _ = init(cfg.train.device)
        check_same_config(job, cfg.to_dict())
        lock = lock_run(run_dir) if job.is_main else None
        state = TrainState.from_dict(ckpt.train_state or {})
        es = cfg.train.early_stopping
        state.stopped_early = es.patience is not None and state.es_wait >= es.patience
        if job.is_main:
            _repair_best(run_dir, ckpt, state)
        check_more_to_train(run_dir, cfg, state)
        record = SplitRecord.read(run_dir)
        if record is None:
            raise CheckpointError(f"Cannot resume '{run_dir}': its splits.json is missing, so the data it trained on is unknown.")
        with main_first(job):
            data = dataset_from_record(cfg.data, record, ("train", "val"), root=data_location(cfg.data), fetch=data_root is None,
                                       progress=decode_progress(callbacks))
        trainer = cls(cfg, run_dir, data, list(ckpt.mean), list(ckpt.std), state, callbacks, resumed=True)
        trainer.lock = lock
        trainer.restore(ckpt)
        if not job.is_main:
            return trainer
        try:
            if cfg.to_dict() != ckpt.config:
                atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
            if data_location(cfg.data) != record.root:  # the data moved: eval and later resumes find it there
                record.root = data_location(cfg.data)
                record.write(run_dir)
        except OSError as e:
            raise RunWriteError(f"Cannot write to '{run_dir}': {os_error_reason(e)}. Free some space or make it writable, then resume again.") from None
        return trainer

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

    def monitor_name(self, name: str) -> str:
        """The metric actually monitored: without a validation split, train_* stands in for val_*."""
        return monitored(name, self.val_loader is not None)

    # ------------------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        assert self.run_dir is not None or not self.job.is_main
        self._emit("on_fit_start")
        if self.cfg.train.keep_pruned:
            keep_zeros(self.model)
        result = TrainResult(self.run_dir, self.state.history, None, None, device=str(self.device),
                             precision=precision_name(self.amp_dtype))
        try:
            with stop_on_signals() as stop:
                self._stop = stop
                for epoch in range(self.state.epoch + 1, self.cfg.train.epochs + 1):
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
        if (self.cfg.train.test_at_end and self.job.is_main and not result.interrupted and not self.stopped_by
                and self.state.best_epoch is not None):
            result.test = self._test_best(result)
        self._emit("on_fit_end", result)
        return result

    def _test_best(self, result: TrainResult) -> dict[str, Any] | None:
        """One pass of the best checkpoint over the test split (writing eval.json and confusion_matrix.png, as
        `fcclass eval` does); a failure is a warning, since the model is trained and saved either way."""
        from fcclass.evaluation import evaluate

        try:
            report = evaluate(self.run_dir, device=str(self.device), save=True)
        except (FcclassError, OSError) as e:
            result.warnings.append(f"the test split was not evaluated: {e}")
            return None
        return {"epoch": self.state.best_epoch, "accuracy": report.accuracy, "loss": report.loss,
                "images": report.num_samples, "top5_accuracy": report.top5_accuracy}

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
            lr_sum += self.schedule.lr
            whole = self.train_loader.global_size(batch - 1)  # the job's batch, of which this rank has its part
            loss, logits, y = self.step(x, y, loss_scale(y.numel(), whole, self.job))
            loss_sum += loss * y.numel()
            correct += (logits.argmax(1) == y).sum()
            seen, images = seen + y.numel(), images + whole
            if batch % self.sync_every == 0 or batch == batches:
                loss_mean, accuracy, stop = self._running_means(loss_sum, correct, seen)
                if not math.isfinite(loss_mean):
                    raise self._diverged(epoch, batch, loss_mean)
            self._emit("on_batch_end", BatchEnd(epoch, batch, batches, images, loss_mean, accuracy, time.perf_counter() - started))
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

    def step(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimisation step on a uint8 batch; returns the (detached) loss, logits and labels on the device.
        ``scale``: this rank's share of the job's batch (distributed.loss_scale), applied to the gradient only."""
        x = self.train_prep(x.to(self.device, non_blocking=True), train=True)
        y = y.to(self.device, non_blocking=True)
        with autocast(self.device, self.amp_dtype):
            try:
                logits = self.net(x)
            except ValueError as e:  # BatchNorm with one value per channel: a last batch of one image, a 1x1 map
                raise FcclassError(f"{e}. BatchNormalization needs more than one value per channel while training: set "
                                   "data.batch_size so that the training split does not leave a last batch of one image, or "
                                   "move BatchNormalization before the layer that shrinks the feature map to 1x1.") from None
            loss = self.loss_fn(logits.float(), y)
        reg = self.model.regularization_loss()
        total = loss * scale if scale != 1.0 else loss
        total = total + reg if reg is not None else total
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.cfg.train.grad_clip
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
        """Keras's val_loss: the training loss function (label smoothing included, class weights not) on val data."""
        if self.val_loader is None:
            return {"val_loss": None, "val_accuracy": None}
        broadcast_buffers(self.model, self.job)  # every rank validates with rank 0's BatchNorm statistics
        logits, labels = run_model(self.model, self.val_loader, self.eval_prep, self.device, self.amp_dtype)
        if not self.job.enabled:
            loss = nn.functional.cross_entropy(logits, labels, label_smoothing=self.cfg.train.label_smoothing)
            return {"val_loss": float(loss), "val_accuracy": float((logits.argmax(1) == labels).float().mean())}
        sums = torch.zeros(3)  # this rank's shard of the val split: loss sum, correct, images
        if labels.numel():
            sums += torch.tensor([float(nn.functional.cross_entropy(logits, labels, reduction="sum",
                                                                    label_smoothing=self.cfg.train.label_smoothing)),
                                  float((logits.argmax(1) == labels).sum()), float(labels.numel())])
        loss_sum, correct, n = all_sum(sums.to(self.device), self.job).tolist()
        return {"val_loss": loss_sum / n, "val_accuracy": correct / n}

    def end_epoch(self, row: dict[str, Any]) -> bool:
        """Record the epoch: schedule, best checkpoint, early stopping, then the files. Returns whether it is the best."""
        st = self.state
        st.history.append(row)
        st.epoch = row["epoch"]
        self.schedule.after_epoch(row[self.monitor_name(self.cfg.scheduler.monitor)])
        monitor = self.monitor_name(self.cfg.train.checkpoint.monitor)
        is_best = _improved(row[monitor], st.best[monitor] if st.best else None, monitor)
        if is_best:
            st.best, st.best_epoch = dict(row), st.epoch
        es = self.cfg.train.early_stopping
        es_monitor = self.monitor_name(es.monitor)
        if _improved(row[es_monitor], st.es_best, es_monitor, es.min_delta):
            st.es_best, st.es_wait = row[es_monitor], 0
        else:
            st.es_wait += 1
        st.stopped_early = es.patience is not None and st.es_wait >= es.patience
        if self.job.is_main:
            self.save(row, is_best)
        return is_best

    def save(self, row: dict[str, Any], is_best: bool) -> None:
        """last.pt, then best.pt, then metrics.csv, each written atomically. On a full disk or a read-only folder,
        stop with the last good checkpoint intact and say how to go on."""
        assert self.run_dir is not None
        what = LAST
        try:
            self.checkpoint(row, training=True).save(self.run_dir / LAST)
            what = BEST
            if is_best:
                self.checkpoint(row, training=False).save(self.run_dir / BEST)
            what = "metrics.csv"
            atomic_write_text(self.run_dir / "metrics.csv", metrics_csv(self.state.history))
        except OSError as e:
            kept = self.state.epoch - (1 if what == LAST else 0)
            raise RunWriteError(
                f"Cannot write {what} in '{self.run_dir}': {os_error_reason(e)}. Training stopped in epoch {self.state.epoch}; "
                f"the last good checkpoint (epoch {kept}) is kept in {self.run_dir / LAST}. Free some space (or make the folder "
                f"writable), then continue with: fcclass train --resume {self.run_dir}") from None

    def _diverged(self, epoch: int, batch: int, value: float) -> TrainingDiverged:
        if self.state.epoch:
            kept = f" The best checkpoint so far (epoch {self.state.best_epoch}) is kept in {self.run_dir}."
        else:
            kept = (" No epoch had completed, so the run directory was removed." if not self.resumed
                    else f" Nothing of the run in {self.run_dir} was changed.")
        return TrainingDiverged(f"The training loss became {value} in epoch {epoch}, batch {batch}. {self._divergence_cause()}{kept}")

    def _divergence_cause(self) -> str:
        """What most likely made the loss non-finite, judged from the weights and the settings, with the fix."""
        opt, train = self.cfg.optimizer, self.cfg.train
        if all(bool(torch.isfinite(p).all()) for p in self.params):
            return ("The weights are still finite, so the forward pass overflowed: check the data normalisation "
                    "(data.normalize), train.class_weight and the layer sizes.")
        suspects = [f"optimizer.lr is {opt.lr:.3g} (learning rate now {self.schedule.lr:.3g})"]
        if opt.weight_decay > 0.1:
            suspects.insert(0, f"optimizer.weight_decay is {opt.weight_decay:.3g} (usually 1e-4 to 1e-2)")
        if opt.name in ("sgd", "rmsprop") and opt.momentum >= 1:
            suspects.insert(0, f"optimizer.momentum is {opt.momentum:.3g} (it must stay below 1, usually 0.9)")
        fix = "lower it" if len(suspects) == 1 else "lower them"
        clip = "" if train.grad_clip else ", or set train.grad_clip (e.g. 1.0)"
        return f"The weights became non-finite, so the optimizer's updates blew up: {'; '.join(suspects)}. {fix.capitalize()}{clip}."

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

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def keep_zeros(model: nn.Module) -> None:
    """train.keep_pruned: the kernel weights that are exactly zero now get zero gradients, so they stay zero (SGD's
    momentum and weight decay, Adam's moments and AdamW's decay all leave a zero weight with zero gradients at zero):
    fine-tuning keeps a pruned model's sparsity, resumed runs too, since the zeros are in the saved weights."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.requires_grad:
            mask = module.weight.detach() != 0
            if not bool(mask.all()):
                module.weight.register_hook(lambda grad, mask=mask: grad * mask)


def fit(cfg: Config | None = None, *, resume: str | Path | None = None, overrides: Sequence[str] | None = None,
        console: Any = None, callbacks: Sequence[Callback] = (), log_interval: float = 10.0,
        data_root: str | Path | None = None) -> TrainResult:
    """Train ``cfg`` (or resume the run directory ``resume``) and return the run's result.

    ``console`` (a Rich Console) receives the header, progress and per-epoch lines; None trains silently.
    ``callbacks`` observe the loop (see fcclass.callbacks). ``overrides``: ``--set`` items (for resume: RESUMABLE_KEYS).
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
        trainer = Trainer.resume(resume, overrides or (), observers, data_root) if resume is not None else Trainer.start(cfg, observers)
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


def _repair_best(run_dir: Path, last: Checkpoint, state: TrainState) -> None:
    """best.pt may have failed to save (a full disk) in the epoch last.pt holds, when that epoch was the best: write it
    from last.pt's weights, before anything else, so that even a finished run gets its best model back."""
    if state.best is None or state.best_epoch != state.epoch or last.epoch != state.epoch:
        return
    try:
        if Checkpoint.load(run_dir / BEST).epoch == state.epoch:
            return
    except (CheckpointError, OSError):
        pass  # missing or unreadable: write it
    best = Checkpoint(last.model_state, last.config, last.class_names, last.input_shape, last.mean, last.std, last.epoch,
                      dict(state.best))
    try:
        best.save(run_dir / BEST)
    except OSError as e:
        raise RunWriteError(f"Cannot write {run_dir / BEST}: {os_error_reason(e)}. Free some space or make it writable, then "
                            "resume again.") from None


def resume_config(run_dir: str | Path, overrides: Sequence[str] = (), data_root: str | Path | None = None) -> Config:
    """The config ``fcclass train --resume RUN_DIR --set ... [--data-root DIR]`` would continue with."""
    return config_for_resume(Path(run_dir), resumable_checkpoint(Path(run_dir)), overrides, data_root)
