"""The learning-rate schedule: the configured torch scheduler after an optional linear warm-up, stepped per batch
or per epoch, and re-planned when a resumed run is given a different number of epochs."""

from __future__ import annotations

from typing import Any, Callable

import torch

from fcclass.config.registries import SCHEDULERS
from fcclass.config.sections import SchedulerConfig


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
