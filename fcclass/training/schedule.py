"""The learning-rate schedule: the configured torch scheduler after an optional linear warm-up, stepped per batch
or per epoch, and re-planned when a resumed run is given a different number of epochs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fcclass.config.registries import SCHEDULERS
from fcclass.config.sections import OptimizerConfig, SchedulerConfig


class LRSchedule:
    """The configured scheduler, preceded by a linear warm-up over ``warmup_epochs``; steps per batch or epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, epochs: int, steps_per_epoch: int) -> None:
        self.optimizer, self.cfg = optimizer, cfg
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
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

    def after_epoch(self, monitored: float | None) -> None:
        """``monitored``: the value of ``scheduler.monitor`` this epoch (the plateau schedule reads it)."""
        if self.step_count <= self.warmup_steps or self.scheduler is None:
            return
        if self.interval == "epoch":
            self.scheduler.step()
        elif self.interval == "plateau" and monitored is not None:
            self.scheduler.step(monitored)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "steps_per_epoch": self.steps_per_epoch, "step_count": self.step_count,
                "base_lrs": self.base_lrs, "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def same_plan(self, state: dict[str, Any]) -> bool:
        return state.get("epochs") == self.epochs and state.get("steps_per_epoch") == self.steps_per_epoch

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = state["step_count"]
        self.base_lrs = state["base_lrs"]
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def fast_forward(self, epochs_done: int, monitored: Callable[[int], float | None]) -> None:
        """Step a freshly built schedule through ``epochs_done`` epochs, as a run planned for ``self.epochs`` from the
        start would have been stepped (``monitored(e)``: the plateau metric of epoch e). Used when a resumed run gets
        a new number of epochs: one-cycle and cosine then follow the new plan instead of the old, finished one."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()": on purpose here
            for epoch in range(1, epochs_done + 1):
                for _ in range(self.steps_per_epoch):
                    self.after_batch()
                self.after_epoch(monitored(epoch))


SHORT_RUN_MIN_BATCH = 16  # the smallest a short run's batch is halved to (benchmarks/RESULTS.md: 16 beat 32 on 3,000 images)


@dataclass(frozen=True)
class BatchPlan:
    """The batch a run trains with and the factor its learning rate is scaled by (``train.short_run_steps``)."""

    batch_size: int  # the (global) batch training uses
    configured: int  # data.batch_size
    steps_configured: int  # the optimizer steps the run would take at data.batch_size
    threshold: int  # train.short_run_steps

    @property
    def adapted(self) -> bool:
        return self.batch_size != self.configured

    @property
    def lr_scale(self) -> float:
        """The linear scaling rule: the learning rate per image stays what the config tuned at data.batch_size."""
        return self.batch_size / self.configured

    def scaled_optimizer(self, cfg: OptimizerConfig) -> OptimizerConfig:
        return cfg if not self.adapted else cfg.model_copy(update={"lr": cfg.lr * self.lr_scale})

    def scaled_scheduler(self, cfg: SchedulerConfig) -> SchedulerConfig:
        """scheduler.max_lr and min_lr scale with optimizer.lr (the warm-up and one-cycle shapes stay)."""
        if not self.adapted:
            return cfg
        return cfg.model_copy(update={"max_lr": cfg.max_lr * self.lr_scale if cfg.max_lr is not None else None,
                                      "min_lr": cfg.min_lr * self.lr_scale})

    def describe(self, images: int, epochs: int, lr: float, resumed: bool) -> str:
        """The training header's line on an adapted batch (``lr``: the configured peak learning rate)."""
        scaled = f"the learning rate scaled to {lr * self.lr_scale:.3g} ({lr:.3g} x {self.batch_size}/{self.configured})"
        if resumed:
            return (f"Short run: training at batch {self.batch_size}, with {scaled}, as this run started (it was too "
                    f"short for data.batch_size {self.configured}; a resumed run keeps its batch).")
        return (f"Short run: {images:,} images x {epochs} epoch{'s' if epochs != 1 else ''} would be {self.steps_configured} optimizer steps at "
                f"data.batch_size {self.configured}, under train.short_run_steps {self.threshold}: training at batch "
                f"{self.batch_size} with {scaled}. Set train.short_run_steps=0 to train at batch {self.configured}.")


def plan_batch(configured: int, short_run_steps: int, images: int, epochs: int, recorded: int | None = None) -> BatchPlan:
    """A run that would take fewer than ``short_run_steps`` optimizer steps at ``configured`` (a quick try on a few
    thousand images: a dozen steps at 256, too few for a schedule tuned for thousands) halves its batch, down to
    SHORT_RUN_MIN_BATCH, until it takes at least that many; its learning rate is scaled by the same factor. Only
    ever smaller, so a resumed run keeps the batch it started with (``recorded``, from its checkpoint)."""
    steps = epochs * math.ceil(images / configured) if images else 0
    batch = configured
    if recorded is not None:
        batch = recorded
    elif short_run_steps:
        while batch > SHORT_RUN_MIN_BATCH and epochs * math.ceil(images / batch) < short_run_steps:
            batch = max(SHORT_RUN_MIN_BATCH, batch // 2)
    return BatchPlan(batch, configured, steps, short_run_steps)
