"""Resuming a run: what may change (``--set`` on resume), and whether there is anything left to train."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from fcclass.config.load import config_from_dict
from fcclass.config.sections import Config
from fcclass.errors import CheckpointError, ConfigError, FcclassError
from fcclass.runs.checkpoint import Checkpoint
from fcclass.runs.layout import CONFIG, LAST, is_trained

# What `--set` may change when resuming: nothing that alters the data, the model or the optimisation already done.
RESUMABLE_KEYS = ("train.epochs", "train.early_stopping.patience", "train.early_stopping.min_delta", "train.device",
                  "train.precision", "train.threads", "train.test_at_end", "data.num_workers", "data.root", "data.path",
                  "data.download", "data.cache", "data.cache_dir", "data.cache_max_gb", "data.on_unreadable",
                  "tracking.mlflow.uri")


class RunFinished(FcclassError):
    """``--resume`` of a run that has nothing left to train."""


def resumable_checkpoint(run_dir: Path) -> Checkpoint:
    if not run_dir.is_dir():
        raise CheckpointError(f"Cannot resume '{run_dir}': no such run directory.")
    if not (run_dir / LAST).is_file():
        what = "it has best.pt but no last.pt" if is_trained(run_dir) else "it is not a run directory made by `fcclass train` (no last.pt)"
        raise CheckpointError(f"Cannot resume '{run_dir}': {what}.")
    ckpt = Checkpoint.load(run_dir / LAST)
    if not ckpt.resumable:
        raise CheckpointError(f"Cannot resume '{run_dir}': it was made by an earlier fcclass (checkpoint format {ckpt.format}) "
                              "whose checkpoints do not hold what resuming needs now. It can still be evaluated, used for "
                              "prediction and exported; to train further, start a new run.")
    return ckpt


def config_for_resume(run_dir: Path, ckpt: Checkpoint, overrides: Sequence[str], data_root: str | Path | None = None) -> Config:
    """The run's config with the allowed ``--set`` changes and, if the data moved, its new place (``data_root``: the
    image folder, or the torchvision root). Folders are made absolute, as for a new run."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in RESUMABLE_KEYS:
            raise ConfigError(f"--set {key} cannot change when resuming a run: only {', '.join(RESUMABLE_KEYS)} can "
                              f"(the rest would change the data, the model or the optimisation already done). "
                              f"To train with other settings, start a new run: fcclass train -c {run_dir / CONFIG} --set {item}")
    cfg = config_from_dict(ckpt.config, source=f"the config of {run_dir}", stored=True, overrides=list(overrides))
    if data_root is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.moved_to(data_root)})
    return with_absolute_paths(cfg)


def with_absolute_paths(cfg: Config) -> Config:
    """The config with its folders made absolute, so the run can be evaluated and resumed from anywhere."""
    def absolute(p: str | None) -> str | None:
        return None if p is None else p if "://" in p else os.path.abspath(Path(p).expanduser())

    data = cfg.data.model_copy(update={"root": absolute(cfg.data.root), "path": absolute(cfg.data.path),
                                       "cache_dir": absolute(cfg.data.cache_dir)})
    train = cfg.train.model_copy(update={"runs_dir": absolute(cfg.train.runs_dir)})
    model = cfg.model if cfg.model.init_from is None or cfg.model.init_from.path is None else \
        cfg.model.with_init_from(os.path.normpath(absolute(cfg.model.init_from.path) or ""))
    # a Backbone's weights file, like the data, is found from anywhere (the run's config.yaml trains again elsewhere)
    layers = [layer.model_copy(update={"weights": absolute(layer.weights_file)}) if getattr(layer, "weights_file", None) else layer
              for layer in model.layers]
    model = model.model_copy(update={"layers": layers})
    return cfg.model_copy(update={"data": data, "train": train, "model": model})


def check_more_to_train(run_dir: Path, cfg: Config, state: Any) -> None:
    epochs = cfg.train.epochs
    if epochs < state.epoch:
        raise ConfigError(f"train.epochs={epochs} is below the {state.epoch} epochs '{run_dir}' has already completed; "
                          f"give at least {state.epoch + 1} to train further.")
    best = f" (best epoch {state.best_epoch})" if state.best_epoch else ""
    if state.stopped_early:
        es = cfg.train.early_stopping
        raise RunFinished(f"Run '{run_dir}' already finished: early stopping ended it after epoch {state.epoch}{best}, "
                          f"{es.monitor} not having improved for {state.es_wait} epoch(s). To train on anyway, resume with "
                          f"--set train.early_stopping.patience=N (N > {state.es_wait}), and --set train.epochs=N if needed.")
    if state.epoch >= epochs:
        raise RunFinished(f"Run '{run_dir}' already finished: it completed all {epochs} epochs{best}. To train it for longer, "
                          f"resume with --set train.epochs=N (N > {epochs}); the LR schedule is re-planned for N epochs.")
