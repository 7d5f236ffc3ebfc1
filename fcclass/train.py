"""The training loop: device and precision, optimizer and LR schedule, checkpoints, resume, early stopping."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from fcclass.config import Config, SchedulerConfig, config_from_dict, load_config
from fcclass.device import autocast, select_device, select_precision
from fcclass.data import BatchPreprocess, Dataset, channel_stats, load_dataset, make_loader
from fcclass.errors import CheckpointError, FcclassError
from fcclass.model import Network, build_model
from fcclass.plots import plot_curves
from fcclass.registries import OPTIMIZERS, SCHEDULERS
from fcclass.runs import BEST, LAST, atomic_write_text, create_run_dir, load_checkpoint, save_checkpoint

METRIC_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


class TrainingDiverged(FcclassError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, float]]
    best_epoch: int | None
    best: dict[str, float] | None
    stopped_early: bool = False
    interrupted: bool = False
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- LR schedule with warm-up
class LRSchedule:
    """The configured scheduler, preceded by a linear warm-up over ``warmup_epochs``; steps per batch or epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, epochs: int, steps_per_epoch: int) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.warmup_steps = min(cfg.warmup_epochs, max(epochs - 1, 0)) * steps_per_epoch
        main_epochs = max(1, epochs - cfg.warmup_epochs)
        self.scheduler, self.interval = SCHEDULERS[cfg.name](optimizer, cfg, main_epochs, steps_per_epoch)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]  # the main schedule's starting LRs
        self.step_count = 0
        if self.warmup_steps:
            self._set_scale(1 / self.warmup_steps)

    def _set_scale(self, scale: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * scale

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def after_batch(self) -> None:
        self.step_count += 1
        if self.step_count < self.warmup_steps:
            self._set_scale((self.step_count + 1) / self.warmup_steps)
        elif self.step_count == self.warmup_steps:
            self._set_scale(1.0)
        elif self.interval == "batch" and self.scheduler is not None:
            if not (self.cfg.name == "onecycle" and self.scheduler.last_epoch + 1 >= self.scheduler.total_steps):
                self.scheduler.step()

    def after_epoch(self, metrics: dict[str, float]) -> None:
        if self.step_count <= self.warmup_steps or self.scheduler is None:
            return
        if self.interval == "epoch":
            self.scheduler.step()
        elif self.interval == "plateau":
            self.scheduler.step(metrics[self.cfg.monitor])

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "base_lrs": self.base_lrs,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = state["step_count"]
        self.base_lrs = state["base_lrs"]
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])


# ----------------------------------------------------------------------------- helpers
def class_weights(cfg: Config, ds: Dataset) -> torch.Tensor | None:
    spec = cfg.train.class_weight
    if spec is None:
        return None
    names = ds.info.class_names
    if spec == "balanced":
        counts = torch.tensor(ds.info.train_counts, dtype=torch.float64)
        weights = counts.sum() / (len(names) * counts.clamp_min(1))
        return weights.float()
    unknown = [k for k in spec if k not in names]
    if unknown:
        raise FcclassError(f"train.class_weight names unknown label(s) {unknown}; the labels are: {', '.join(names)}.")
    return torch.tensor([float(spec.get(n, 1.0)) for n in names])


def normalization(cfg: Config, ds: Dataset) -> tuple[list[float], list[float]]:
    norm = cfg.data.normalize
    channels = ds.info.input_shape[0]
    if norm == "none":
        return [], []
    if norm == "auto":
        return channel_stats(ds.train, channels, ds.size)
    if len(norm.mean) != channels:
        raise FcclassError(f"data.normalize has {len(norm.mean)} mean/std values but the images have {channels} channel(s); give one per channel.")
    return list(norm.mean), list(norm.std)


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


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, Any]]:
    """SIGINT/SIGTERM set a flag: the loop stops at the next batch with the last checkpoint saved."""
    flag: dict[str, Any] = {"signal": None}

    def handler(signum: int, frame: Any) -> None:
        if flag["signal"] is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name

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


def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _improved(value: float, best: float | None, monitor: str, min_delta: float = 0.0) -> bool:
    if best is None:
        return True
    return value < best - min_delta if monitor == "val_loss" else value > best + min_delta


# ----------------------------------------------------------------------------- the loop
def fit(
    cfg: Config | None = None,
    *,
    resume: str | Path | None = None,
    overrides: list[str] | None = None,
    console: Any = None,
    on_epoch: Callable[[Network, dict[str, float], BatchPreprocess], None] | None = None,
) -> TrainResult:
    """Train ``cfg`` (or resume the run directory ``resume``) and return the run's result.

    ``console`` (a rich Console) receives progress and per-epoch lines; None trains silently.
    ``on_epoch(model, row, preprocess)`` is called after each epoch (the benchmark measures test accuracy there).
    """
    from rich.markup import escape

    from fcclass.report import EpochProgress, print_epoch, print_training_header

    run_dir: Path | None = None
    resume_ckpt: dict[str, Any] | None = None
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / LAST).is_file():
            raise CheckpointError(f"Cannot resume '{run_dir}': it has no {LAST}. Give a run directory made by `fcclass train`.")
        resume_ckpt = load_checkpoint(run_dir / LAST)
        cfg = config_from_dict(resume_ckpt["config"], source=f"{run_dir}/config.yaml", stored=True, overrides=overrides)
    elif cfg is None:
        cfg = load_config(overrides=overrides)

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    device = select_device(cfg.train.device)
    amp_dtype = select_precision(cfg.train.precision, device)

    ds = load_dataset(cfg.data, cfg.seed)
    assert ds.train is not None and ds.val is not None
    mean, std = (resume_ckpt["mean"], resume_ckpt["std"]) if resume_ckpt else normalization(cfg, ds)
    input_shape = model_input_shape(cfg, ds)
    model = build_model(cfg.model, input_shape, ds.info.num_classes).to(device)
    weights = class_weights(cfg, ds)

    train_loader = make_loader(ds.train, cfg.data.batch_size, True, cfg.seed, ds.channels, ds.size,
                               balanced=cfg.data.sampler == "balanced", device=device, num_workers=cfg.data.num_workers)
    val_loader = make_loader(ds.val, 256, False, cfg.seed, ds.channels, ds.size,
                             device=device, num_workers=cfg.data.num_workers)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    prep = BatchPreprocess(mean, std, cfg.data.augment, aug_gen)
    val_prep = BatchPreprocess(mean, std)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise FcclassError("Every layer is frozen (trainable: false), so there is nothing to train; unfreeze at least one layer.")
    optimizer = OPTIMIZERS[cfg.optimizer.name](params, cfg.optimizer)
    schedule = LRSchedule(optimizer, cfg.scheduler, cfg.train.epochs, len(train_loader))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                  label_smoothing=cfg.train.label_smoothing)

    state: dict[str, Any] = {"epoch": 0, "best": None, "best_epoch": None, "es_best": None, "es_wait": 0, "history": []}
    created = False
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model_state"])
        optimizer.load_state_dict(resume_ckpt["optimizer_state"])
        schedule.load_state_dict(resume_ckpt["schedule_state"])
        if scaler is not None and resume_ckpt.get("scaler_state"):
            scaler.load_state_dict(resume_ckpt["scaler_state"])
        state = resume_ckpt["train_state"]
        rng = resume_ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        train_loader.generator.set_state(rng["loader"])
        aug_gen.set_state(rng["augment"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
    else:
        run_dir = create_run_dir(cfg.train.runs_dir, cfg.name)
        created = True
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        atomic_write_text(run_dir / "classes.json", json.dumps(ds.info.class_names, indent=2) + "\n")
    assert run_dir is not None

    meta = {"config": cfg.to_dict(), "class_names": ds.info.class_names, "input_shape": input_shape, "mean": mean, "std": std}

    def snapshot() -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "loader": train_loader.generator.get_state(), "augment": aug_gen.get_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        return {**meta, "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                "schedule_state": schedule.state_dict(), "scaler_state": scaler.state_dict() if scaler else None,
                "train_state": state, "rng": rng, "epoch": state["epoch"]}

    if console is not None:
        print_training_header(console, cfg, ds, model, device, amp_dtype, weights, run_dir, resumed=resume_ckpt is not None,
                              start_epoch=state["epoch"])
    if created:
        save_checkpoint(run_dir / LAST, snapshot())  # epoch 0: a run killed in its first epoch can resume

    result = TrainResult(run_dir, state["history"], state["best_epoch"], state["best"], device=str(device))
    sync_every = 1 if device.type == "cpu" else 25
    es = cfg.train.early_stopping
    monitor = cfg.train.checkpoint.monitor
    try:
        with _stop_on_signals() as stop:
            for epoch in range(state["epoch"] + 1, cfg.train.epochs + 1):
                started = time.perf_counter()
                model.train()
                loss_sum = torch.zeros((), device=device, dtype=torch.float64)
                correct = torch.zeros((), device=device, dtype=torch.long)
                seen = 0
                lr_sum = 0.0
                checked_loss = 0.0
                progress = EpochProgress(console, epoch, cfg.train.epochs, len(train_loader))
                with progress:
                    for batch, (x, y) in enumerate(train_loader, 1):
                        x = prep(x.to(device, non_blocking=True), train=True)
                        y = y.to(device, non_blocking=True)
                        lr_sum += schedule.lr
                        with autocast(device, amp_dtype):
                            logits = model(x)
                            loss = loss_fn(logits.float(), y)
                        reg = model.regularization_loss()
                        total = loss + reg if reg is not None else loss
                        optimizer.zero_grad(set_to_none=True)
                        if scaler is not None:
                            scaler.scale(total).backward()
                            if cfg.train.grad_clip:
                                scaler.unscale_(optimizer)
                                nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
                            scaler.step(optimizer)
                            scaler.update()
                        else:
                            total.backward()
                            if cfg.train.grad_clip:
                                nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
                            optimizer.step()
                        schedule.after_batch()
                        loss_sum += loss.detach().double() * y.numel()
                        correct += (logits.detach().argmax(1) == y).sum()
                        seen += y.numel()
                        if batch % sync_every == 0 or batch == len(train_loader):
                            checked_loss = float(loss_sum) / seen
                            if not math.isfinite(checked_loss):
                                raise TrainingDiverged(
                                    f"The training loss became {checked_loss} in epoch {epoch}, batch {batch} "
                                    f"(learning rate {schedule.lr:.3g}). Lower optimizer.lr, set train.grad_clip (e.g. 1.0), "
                                    f"or check the data normalisation. The best checkpoint so far is kept in {run_dir}."
                                )
                            progress.update(batch, checked_loss, float(correct) / seen)
                        if stop["signal"]:
                            break
                if stop["signal"]:
                    result.interrupted = True
                    if console is not None and state["epoch"] > 0:
                        console.print(f"[yellow]{stop['signal']}: stopped in epoch {epoch}; the last completed epoch ({state['epoch']}) is saved in {escape(str(run_dir / LAST))}. "
                                      f"Continue with: fcclass train --resume {escape(str(run_dir))}[/yellow]")
                    elif console is not None:
                        console.print(f"[yellow]{stop['signal']}: stopped in epoch 1 before any epoch completed; nothing was saved.[/yellow]")
                    break

                train_seconds = time.perf_counter() - started
                from fcclass.evaluation import predict_loader

                logits_v, labels_v = predict_loader(model, val_loader, val_prep, device, amp_dtype)
                # Keras: val_loss is the training loss function (label smoothing included, class weights not) on val data
                val_loss = (float(nn.functional.cross_entropy(logits_v, labels_v, label_smoothing=cfg.train.label_smoothing))
                            if labels_v.numel() else float("nan"))
                val_acc = float((logits_v.argmax(1) == labels_v).float().mean()) if labels_v.numel() else float("nan")
                row = {"epoch": epoch, "train_loss": float(loss_sum) / max(seen, 1), "train_accuracy": float(correct) / max(seen, 1),
                       "val_loss": val_loss, "val_accuracy": val_acc, "lr": lr_sum / max(len(train_loader), 1),
                       "seconds": time.perf_counter() - started, "train_seconds": train_seconds, "train_images": seen}
                schedule.after_epoch(row)
                state["history"].append(row)
                state["epoch"] = epoch
                # Without a validation split every epoch is the newest best (Keras: no val metric to monitor).
                is_best = not labels_v.numel() or _improved(row[monitor], state["best"][monitor] if state["best"] else None, monitor)
                if is_best:
                    state["best"], state["best_epoch"] = dict(row), epoch
                if not labels_v.numel() or _improved(row[es.monitor], state["es_best"], es.monitor, es.min_delta):
                    state["es_best"], state["es_wait"] = row[es.monitor], 0
                else:
                    state["es_wait"] += 1
                snap = snapshot()
                if is_best:
                    save_checkpoint(run_dir / BEST, {k: v for k, v in snap.items() if k in meta or k in ("model_state", "epoch")} | {"metrics": row})
                save_checkpoint(run_dir / LAST, snap)
                write_metrics_csv(run_dir / "metrics.csv", state["history"])
                if console is not None:
                    print_epoch(console, row, cfg.train.epochs, is_best)
                if on_epoch is not None:
                    on_epoch(model, row, val_prep)
                if es.patience is not None and state["es_wait"] >= es.patience:
                    result.stopped_early = True
                    if console is not None:
                        console.print(f"Early stopping: {es.monitor} has not improved for {es.patience} epoch(s).")
                    break
    except BaseException:
        if created and state["epoch"] == 0:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing was learned: leave no half-made run behind
        raise
    if created and state["epoch"] == 0 and result.interrupted:
        shutil.rmtree(run_dir, ignore_errors=True)
        result.extra["removed"] = True
    result.history, result.best_epoch, result.best = state["history"], state["best_epoch"], state["best"]
    if state["history"]:
        plot_curves(run_dir)
    return result

