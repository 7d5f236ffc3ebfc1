"""Fine-tuning a pruned model (`fcclass compress --finetune EPOCHS`): its config, what ``--set`` may change in it,
and the training itself, with fcclass's own trainer in the new run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from fcclass.config.load import config_from_dict
from fcclass.config.sections import Config
from fcclass.data import Dataset
from fcclass.errors import ConfigError, FcclassError
from fcclass.inference.load import Inference
from fcclass.runs.metrics import rounded_row

FINETUNE_LR = 0.1  # fine-tuning starts from trained weights: the run's optimizer at a tenth of its learning rate

# What `--set` may change for the fine-tuning: how it trains. The data (and its splits) and the model are the
# source run's, as pruned, whatever a --set would say; the new run's config would otherwise record what was not done.
FINETUNABLE_KEYS = ("train.*", "optimizer.*", "scheduler.*", "data.batch_size", "data.sampler", "data.augment.*", "tracking.*")
FIXED_KEYS = ("train.runs_dir",)  # the new run's place is --out


class CompressInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during compress: the message says what was kept and how to go on."""


def check_overrides(epochs: int, overrides: Sequence[str]) -> None:
    """``--set`` goes with --finetune, and names only keys the fine-tuning really uses."""
    if overrides and not epochs:
        raise FcclassError("--set changes the fine-tuning's config; it goes with --finetune EPOCHS.")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in FIXED_KEYS and any(key == k.removesuffix(".*") or k.endswith(".*") and key.startswith(k[:-1])
                                         for k in FINETUNABLE_KEYS):
            continue
        why = ("the model is the source run's, pruned, and its weights are what is fine-tuned; to train other layers, "
               "start a new run with fcclass train" if key.split(".")[0] == "model" else
               "fine-tuning uses the source run's data and splits as they are (--data-root says where the data moved)"
               if key.split(".")[0] == "data" else "--out says where the new run goes" if key in FIXED_KEYS else
               "it is the source run's")
        raise ConfigError(f"--set {key} cannot change when fine-tuning in compress: {why}. Only {', '.join(FINETUNABLE_KEYS)} can "
                          f"(not {', '.join(FIXED_KEYS)}).")


def finetune_config(cfg: Config, epochs: int, keep_pruned: bool, runs_dir: Path, overrides: Sequence[str]) -> Config:
    """The pruned run's config: ``epochs`` of fine-tuning at a tenth of the learning rate (``--set`` changes it), with
    pruned weights kept at zero when the pruning was unstructured; without the source's model.init_from and
    train.unfreeze, which were about how the source started."""
    check_overrides(epochs, overrides)
    raw = cfg.to_dict()
    raw["train"].update(keep_pruned=keep_pruned, runs_dir=str(runs_dir), unfreeze=None)
    raw["model"]["init_from"] = None  # the weights are the pruned model's, not those the source run started from
    if epochs:
        raw["optimizer"]["lr"] = raw["optimizer"]["lr"] * FINETUNE_LR
        raw["train"]["epochs"] = epochs
    return config_from_dict(raw, source="the compressed run's config", overrides=list(overrides))


def finetune(target: Path, cfg: Config, model: torch.nn.Module, src: Inference, ds: Dataset, console: Any) -> dict[str, Any]:
    """Train the pruned weights for cfg.train.epochs in ``target`` with fcclass's own trainer: progress, checkpoints,
    the best epoch by validation, a resumable last.pt and the test at the end, as in any run."""
    from fcclass.runs.layout import LAST
    from fcclass.training.callbacks import ConsoleProgress, Curves
    from fcclass.training.record import RunRecord
    from fcclass.training.trainer import Trainer, TrainState

    data = Dataset(ds.info, {k: ds.splits[k] for k in ("train", "val")}, ds.size, ds.channels, ds.name)
    observers = [*([ConsoleProgress(console, 10.0)] if console is not None else []), Curves(), RunRecord()]
    trainer = Trainer(cfg, target, data, list(src.checkpoint.mean), list(src.checkpoint.std), TrainState(), observers)
    trainer.model.load_state_dict(model.state_dict())
    # No trainer.lock: compress holds the run's lock for all of its writing (run._held), and a second lock from this
    # process would be refused.
    trainer.checkpoint(None, training=True).save(target / LAST)  # killed while fine-tuning: fcclass train --resume continues
    fitted = trainer.fit()
    if fitted.interrupted:
        done = trainer.state.epoch
        raise CompressInterrupted(
            f"Fine-tuning stopped ({fitted.interrupted}) after {done} of {cfg.train.epochs} epochs; nothing was quantized or measured. "
            + (f"The pruned run is kept in {target}: finish it with `fcclass train --resume {target}`, then compress it further "
               f"(e.g. `fcclass compress {target} --quantize int8`)." if done else "No epoch completed, so nothing was kept."))
    return {"epochs": cfg.train.epochs, "lr": cfg.optimizer.lr, "best_epoch": fitted.best_epoch,
            "best_val": rounded_row(fitted.best) if fitted.best else None, "keep_pruned": cfg.train.keep_pruned}
