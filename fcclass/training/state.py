"""The trainer's state and result as typed dataclasses, and the small rules the loop shares with its callbacks:
signals as a graceful stop, keeping pruned weights at zero (when a metric improved, and which epoch is the best, are
fcclass.runs.metrics's: listings judge recorded epochs by the same rules)."""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from fcclass.errors import FcclassError


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
    batch_size: int | None = None  # the batch the run trains with (train.short_run_steps may have made it smaller)
    frozen: list[str] = field(default_factory=list)  # the layers init_from.freeze fixed when the run started

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def out_of_patience(self, patience: int | None) -> bool:
        """Early stopping's rule: its monitor has not improved for ``patience`` epochs (never, without a patience)."""
        return patience is not None and self.es_wait >= patience

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
    batch_size: int | None = None  # the batch trained with (train.short_run_steps may have made it smaller)
    warnings: list[str] = field(default_factory=list)
    test: dict[str, Any] | None = None  # the best checkpoint on the test split (train.test_at_end): accuracy, loss...
    stopped_by: str | None = None  # what ended training early besides early stopping (a sweep's pruner: "pruned")


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


def keep_zeros(model: nn.Module) -> None:
    """train.keep_pruned: the kernel weights that are exactly zero now get zero gradients, so they stay zero (SGD's
    momentum and weight decay, Adam's moments and AdamW's decay all leave a zero weight with zero gradients at zero):
    fine-tuning keeps a pruned model's sparsity, resumed runs too, since the zeros are in the saved weights."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.requires_grad:
            mask = module.weight.detach() != 0
            if not bool(mask.all()):
                module.weight.register_hook(lambda grad, mask=mask: grad * mask)
