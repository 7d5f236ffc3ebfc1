"""Building a trainer: for a new run (draw and record the splits, create the run directory) or a resumed one (its
config, recorded splits and last checkpoint, after repairing a best.pt lost to a full disk)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from fcclass.config.registries import DATASETS, TorchvisionSet
from fcclass.config.sections import Config
from fcclass.data import data_root as data_location
from fcclass.data import (
    dataset_from_record,
    describe,
    load_dataset,
    normalization,
)
from fcclass.device import select_device
from fcclass.errors import CheckpointError
from fcclass.files import RunWriteError, os_error_reason
from fcclass.memory import check_training
from fcclass.model.backbones import normalises_input
from fcclass.model.network import build_model
from fcclass.runs.checkpoint import BEST, Checkpoint, lock_run
from fcclass.runs.create import create_run_dir, start_run, write_config
from fcclass.runs.layout import SPLITS
from fcclass.runs.resume import check_more_to_train, config_for_resume, resumable_checkpoint, with_absolute_paths
from fcclass.runs.splits import read_splits, write_splits
from fcclass.training.callbacks import Callback, decode_progress
from fcclass.training.distributed import (
    check_same_config,
    init,
    main_first,
)
from fcclass.training.state import TrainState
from fcclass.training.trainer import Trainer


def check_fits_early(cfg: Config) -> None:
    """For the in-memory datasets, whose shape is known without reading them: refuse a model that cannot be trained
    here before spending minutes loading the data (Trainer checks again, for every dataset, before building)."""
    if not isinstance(DATASETS[cfg.data.dataset], TorchvisionSet):
        return
    shape, num_classes = describe(cfg.data)
    if cfg.model.input_shape in (None, list(shape)):
        plan = build_model(cfg.model, list(shape), num_classes, device="meta")
        check_training(plan, min(cfg.data.batch_size, cfg.data.limit_train or cfg.data.batch_size), select_device(cfg.train.device))


def repair_best(run_dir: Path, last: Checkpoint, state: TrainState) -> None:
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


def start_trainer(cfg: Config, callbacks: Sequence[Callback] = ()) -> Trainer:
    """A new run: draw and record the splits, build everything, then create the run directory."""
    cfg = with_absolute_paths(cfg)
    job, _ = init(cfg.train.device)
    check_same_config(job, cfg.to_dict())
    check_fits_early(cfg)
    # A first layer that normalises its input itself (a pretrained Backbone) gets the pixels as they are.
    by_model = normalises_input(cfg.model, cfg.data.normalize)
    with main_first(job):  # each machine's first process downloads, unpacks or caches the data for the others
        data = load_dataset(cfg.data, cfg.seed, splits=("train", "val"),  # the test split is recorded, not loaded
                            progress=decode_progress(callbacks))
    if data.version is not None:  # a packed dataset: the version it resolved to, recorded in the run's config
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"version": data.version})})
    mean, std = ([], []) if by_model else normalization(cfg.data, data)
    trainer = Trainer(cfg, None, data, mean, std, TrainState(), callbacks, new_weights=True)
    if not job.is_main:
        return trainer  # only rank 0 writes the run directory
    record = data.record()
    run_dir = trainer.run_dir = create_run_dir(cfg.train.runs_dir, cfg.name)
    trainer.lock = lock_run(run_dir)
    start_run(run_dir, cfg, data.info.class_names, record, last=trainer.checkpoint(None, training=True),
              fix="Set train.runs_dir to a writable folder with free space.")
    return trainer


def resume_trainer(run_dir: str | Path, overrides: Sequence[str] = (), callbacks: Sequence[Callback] = (),
                   data_root: str | Path | None = None) -> Trainer:
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
    state.stopped_early = state.out_of_patience(cfg.train.early_stopping.patience)  # --set may have changed the patience
    if job.is_main:
        repair_best(run_dir, ckpt, state)
    check_more_to_train(run_dir, cfg, state)
    record = read_splits(run_dir)
    if record is None:
        raise CheckpointError(f"Cannot resume '{run_dir}': its {SPLITS} is missing, so the data it trained on is unknown.")
    packed = cfg.data.dataset == "shards"  # its place is data.path (a folder or s3://); its files are in the shard cache
    with main_first(job):
        data = dataset_from_record(cfg.data, record, ("train", "val"), root=None if packed else data_location(cfg.data),
                                   fetch=data_root is None, progress=decode_progress(callbacks))
    trainer = Trainer(cfg, run_dir, data, list(ckpt.mean), list(ckpt.std), state, callbacks, resumed=True)
    trainer.lock = lock
    trainer.restore(ckpt)
    if not job.is_main:
        return trainer
    try:
        if cfg.to_dict() != ckpt.config:
            write_config(run_dir, cfg)
        if not packed and data_location(cfg.data) != record.root:  # the data moved: eval and later resumes find it there
            record.root = data_location(cfg.data)
            write_splits(run_dir, record)
    except OSError as e:
        raise RunWriteError(f"Cannot write to '{run_dir}': {os_error_reason(e)}. Free some space or make it writable, then resume again.") from None
    return trainer

