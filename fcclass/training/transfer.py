"""Starting from trained weights and freezing: ``model.init_from`` (the source run's best.pt, or a checkpoint file,
read through fcclass.runs), ``init_from.freeze`` and ``train.unfreeze``. The matching of layers is
fcclass.model.init_from's; this module finds the source, reports what was loaded and says what differs."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from fcclass.config.sections import Config
from fcclass.errors import CheckpointError, ConfigError, FcclassError, ModelError
from fcclass.model.init_from import LOADED, NEW, SKIPPED, SourceModel, Transfer, load_transfer, plan_transfer
from fcclass.model.network import Network


@dataclass
class InitFrom:
    """Where a new run's weights came from and what became of each layer (the header's table, summary.json)."""

    path: str  # model.init_from.path (made absolute)
    checkpoint: Path
    epoch: int  # the source checkpoint's completed epochs
    transfer: Transfer
    notes: list[str] = field(default_factory=list)  # how the source's preprocessing differs from this run's
    frozen: list[str] = field(default_factory=list)  # the layers init_from.freeze fixed (a resumed run fixes them again)
    fixed: list[str] = field(default_factory=list)  # the loaded layers that start fixed: by init_from.freeze or trainable: false

    def record(self) -> dict[str, Any]:
        return {"path": self.path, "checkpoint": str(self.checkpoint), "epoch": self.epoch,
                "loaded": self.transfer.named(LOADED), "skipped": self.transfer.named(SKIPPED),
                "new": self.transfer.named(NEW), "frozen": list(self.fixed)}


def source_checkpoint(path: str) -> Any:
    """The checkpoint ``model.init_from`` names: a run directory's best.pt, or a checkpoint file."""
    from fcclass.runs.checkpoint import Checkpoint, resolve_checkpoint
    from fcclass.runs.layout import BEST, LAST

    where = Path(os.path.normpath(path))
    if not where.exists():
        raise CheckpointError(f"model.init_from: '{where}' does not exist. Give a run directory made by `fcclass train` "
                              "(`fcclass runs` lists them) or a checkpoint file (a run's best.pt); a relative path is read "
                              "from the folder fcclass runs in.")
    if where.is_dir() and not (where / BEST).is_file() and (where / LAST).is_file():
        last = _epoch_of(where / LAST)
        if last:
            raise CheckpointError(f"model.init_from: '{where}' has no {BEST} (its {LAST} holds epoch {last}): give that file, "
                                  f"--init-from {where / LAST}, or resume the run to write {BEST} again.")
    try:
        resolved = resolve_checkpoint(where if where.is_dir() else None, None if where.is_dir() else where)
        ckpt = Checkpoint.load(resolved.checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"model.init_from: {e}{_hint(where)}") from None
    if ckpt.epoch < 1:
        raise CheckpointError(f"model.init_from: '{resolved.checkpoint}' holds untrained weights (epoch 0). Give a trained "
                              "run, or resume that one first.")
    return resolved.checkpoint, ckpt


def _hint(where: Path) -> str:
    """What the user probably meant: one of the runs in a runs folder, or a Backbone for a torchvision weights file."""
    from fcclass.runs.layout import is_run_dir

    if where.is_dir():
        runs = sorted((p for p in where.iterdir() if is_run_dir(p)), key=lambda p: p.stat().st_mtime)
        if runs:
            return f" It is a folder of {len(runs)} run(s): name one of them, e.g. --init-from {runs[-1]}."
    elif where.suffix in (".pth", ".pt") and where.is_file():
        return (" A torchvision model's weights file is not a run's checkpoint: use it as the weights of a Backbone layer "
                f"({{type: Backbone, arch: ..., weights: {where}}}).")
    return ""


def _epoch_of(path: Path) -> int:
    from fcclass.runs.checkpoint import Checkpoint

    try:
        return int(Checkpoint.load(path).epoch)
    except CheckpointError:
        return 0


def _source_model(ckpt: Any, checkpoint: Path) -> SourceModel:
    from fcclass.config.load import config_from_dict

    try:
        layers = config_from_dict(ckpt.config, source=f"config in {checkpoint}", stored=True).model.layers
    except FcclassError as e:
        raise CheckpointError(f"model.init_from: the config in '{checkpoint}' cannot be read: {e}") from None
    return SourceModel(layers, ckpt.model_state, list(ckpt.class_names))


def apply_init_from(cfg: Config, model: Network, class_names: list[str], input_shape: list[int], mean: list[float],
                    std: list[float]) -> InitFrom | None:
    """Load the weights ``cfg.model.init_from`` names into ``model`` (a new run's, before its first step) and freeze
    them with init_from.freeze. None without init_from."""
    spec = cfg.model.init_from
    if spec is None:
        return None
    if spec.path is None:
        raise ConfigError("model.init_from has no path: name the run to start from with --init-from RUN_DIR (or "
                          "model.init_from.path: RUN_DIR), or remove model.init_from.")
    checkpoint, ckpt = source_checkpoint(spec.path)
    transfer, loads = plan_transfer(model, cfg.model.layers, class_names, _source_model(ckpt, checkpoint), spec)
    if not loads:
        reasons = "; ".join(f"{t.name}: {t.why}" for t in transfer.layers[:8])
        raise ModelError(f"model.init_from: no layer of this model can take weights from '{checkpoint}' ({reasons}). "
                         "Give a run whose layers have the same names and shapes, or choose them with init_from.layers.")
    load_transfer(model, loads)
    result = InitFrom(str(spec.path), checkpoint, int(ckpt.epoch), transfer,
                      preprocessing_notes(list(ckpt.input_shape), list(ckpt.mean), list(ckpt.std), input_shape, mean, std))
    if spec.freeze:
        result.frozen = transfer.named(LOADED)
        model.freeze(result.frozen)
    result.fixed = [name for name in model.frozen_layers() if name in transfer.named(LOADED)]
    return result


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]" if values else "none"


def preprocessing_notes(src_shape: list[int], src_mean: list[float], src_std: list[float], shape: list[int],
                        mean: list[float], std: list[float]) -> list[str]:
    """What differs between the source's inputs and this run's; this run keeps its own data's preprocessing."""
    notes = []
    if list(src_shape) != list(shape):
        notes.append(f"The source model took inputs of shape {'x'.join(map(str, src_shape))}; this data gives "
                     f"{'x'.join(map(str, shape))} (channels x height x width). Layers whose weights no longer fit are new "
                     "(see the table); this run uses its own data's shape.")
    same = len(src_mean) == len(mean) and all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4)
                                              for a, b in zip([*src_mean, *src_std], [*mean, *std]))
    if not same:
        notes.append(f"The source model's inputs were normalised with mean {_fmt(src_mean)}, std {_fmt(src_std)}; this "
                     f"run normalises with its own data's: mean {_fmt(mean)}, std {_fmt(std)} (data.normalize).")
    return notes


def refreeze(model: Network, frozen: list[str]) -> None:
    """A resumed run fixes again the layers init_from.freeze fixed when it started (recorded in its train state)."""
    known = [name for name in frozen if name in model.layer_names]
    if known:
        model.freeze(known)


def unfreeze_epoch(cfg: Config) -> int | None:
    """The first epoch in which every layer trains (train.unfreeze.epoch), or None."""
    return cfg.train.unfreeze.epoch if cfg.train.unfreeze is not None else None


def everything_frozen_message(cfg: Config, model: Network, by_init: list[str]) -> str:
    """Why nothing would train: each layer with weights, and what fixed it (init_from.freeze, or trainable: false)."""
    frozen = model.frozen_layers()
    flagged = [n for n, layer in zip(model.layer_names, cfg.model.layers) if not layer.trainable and n in frozen]
    init = [n for n in by_init if n not in flagged]
    causes = "; ".join(part for part in (
        f"init_from.freeze fixed {', '.join(init)} (the layers it loaded)" if init else "",
        f"trainable: false fixes {', '.join(flagged)}" if flagged else "") if part)
    fixes = ["set trainable: true on a layer (the classifier, say)"]
    if init:
        fixes.append("set init_from.freeze: false" + (", or give the model a new classifier (init_from.exclude: [its name])"
                                                       if not flagged else ""))
    return f"Every layer with weights is frozen, so there is nothing to train: {causes}. To train, {' or '.join(fixes)}."


@contextmanager
def scaled_lr(optimizer: Any, factor: float) -> Iterator[None]:
    """The optimizer steps at ``factor`` times the learning rate the schedule set (train.unfreeze.lr_scale); the
    schedule's own values are put back after, so every torch scheduler keeps its plan."""
    if factor == 1.0:
        yield
        return
    saved = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr


def start_weights(trainer: Any, mean: list[float], std: list[float], new: bool) -> InitFrom | None:
    """A new run's (``new``) weights: its pretrained backbones' files, then model.init_from (frozen with
    init_from.freeze), which may overwrite them. A resumed run freezes again what its start froze (its weights come
    from its checkpoint, as do those compress fine-tunes). Any of them thaws every layer when train.unfreeze's epoch
    has come (a run resumed after it)."""
    from fcclass.model.backbones import load_pretrained

    init_from = None
    if trainer.resumed:
        refreeze(trainer.model, trainer.state.frozen)
    elif new:
        trainer.weight_notes = load_pretrained(trainer.model, trainer.cfg.model)
        init_from = apply_init_from(trainer.cfg, trainer.model, list(trainer.data.info.class_names), trainer.input_shape, mean, std)
        trainer.state.frozen = init_from.frozen if init_from is not None else []
    first = unfreeze_epoch(trainer.cfg)
    if first is not None and trainer.state.epoch + 1 >= first:
        _unfreeze(trainer)
    return init_from


def _unfreeze(trainer: Any) -> None:
    trainer.model.unfreeze()
    trainer.lr_factor, trainer.thawed = trainer.cfg.train.unfreeze.lr_scale, True


def thaw(trainer: Any, epoch: int) -> None:
    """train.unfreeze: from its epoch on every layer trains, at the scheduled learning rate times its lr_scale. Under
    torchrun the DDP wrapper is made again: it reduces only the gradients of weights that trained when it was made."""
    if epoch != unfreeze_epoch(trainer.cfg) or trainer.thawed:
        return
    _unfreeze(trainer)
    if trainer.job.enabled:
        trainer.net = trainer._wrap_ddp(convert=False)
