"""Relocating a run's data: after the data moved, `fcclass runs relocate RUN --data-root NEW` checks that NEW holds
the data the run recorded (its splits.json) and records the new place everywhere the run records it, so eval, predict
and resume find the data there without --data-root."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fcclass.data import record_differences
from fcclass.errors import CheckpointError, DataError, FcclassError
from fcclass.files import RunWriteError, os_error_reason
from fcclass.runs.checkpoint import Checkpoint, lock_run, run_config
from fcclass.runs.create import write_config
from fcclass.runs.layout import BEST, CONFIG, LAST, SPLITS, SUMMARY, is_run_dir
from fcclass.runs.splits import read_splits, write_splits
from fcclass.runs.summary import read_summary, write_summary


@dataclass
class Relocation:
    run_dir: str
    key: str  # data.root or data.path
    old: str
    new: str
    checked: int  # images of the recorded splits found unchanged at the new place
    rewritten: list[str]  # the run's files that now record the new place (empty: it was there already)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def relocate(run_dir: str | Path, place: str | Path) -> Relocation:
    """Record ``place`` as where the data of ``run_dir`` is now, after checking it holds the recorded splits
    unchanged. Each file is replaced atomically; nothing is written when a check fails."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise FcclassError(f"'{run_dir}' is not a run directory (no {CONFIG}, {SUMMARY} or checkpoint). `fcclass runs` lists the runs.")
    packed = _packed_config(run_dir)
    if packed is not None:
        return _relocate_packed(run_dir, packed, str(place))
    new = Path(place).expanduser().absolute()
    if not new.is_dir():
        raise FcclassError(f"--data-root '{place}' {'is not a folder' if new.exists() else 'does not exist'}: give the folder the "
                           "run's data is in now (the image folder, or the folder that holds the torchvision dataset).")
    record = read_splits(run_dir)
    if record is None:
        raise FcclassError(f"'{run_dir}' has no {SPLITS} (made by an earlier fcclass), so there is nothing to check '{new}' "
                           "against. Pass --data-root to each command instead.")
    cfg = run_config(run_dir)
    lock = _lock(run_dir)
    try:
        differences = record_differences(cfg.data, record, new)
        if differences:
            raise DataError(f"'{new}' does not hold the data run '{run_dir}' was trained on: {'; '.join(d.rstrip('.') for d in differences)}. Nothing "
                            f"was changed: give --data-root the copy of the data the run was trained on.")
        moved = Relocation(str(run_dir), f"data.{cfg.data.location_key}", str(record.root), str(new),
                           sum(len(s.get("files", s.get("indices", []))) for s in record.splits.values()), [])
        if record.root != new or getattr(cfg.data, cfg.data.location_key) != str(new):
            moved.rewritten = _record_place(run_dir, cfg, record, new)
    finally:
        lock.close()
    return moved


def _lock(run_dir: Path) -> Any:
    try:
        return lock_run(run_dir)
    except CheckpointError:
        raise FcclassError(f"Run '{run_dir}' is being trained by another process right now; relocate it once that training "
                           "has ended.") from None


def _packed_config(run_dir: Path) -> Any:
    """The run's config if it trained on a packed dataset (data.dataset: shards), else None."""
    try:
        cfg = run_config(run_dir)
    except FcclassError:
        return None  # the checks of an image folder's or torchvision run say what is wrong with the run
    return cfg if cfg.data.dataset == "shards" else None


def _relocate_packed(run_dir: Path, cfg: Any, place: str) -> Relocation:
    """A packed dataset's run (data.dataset: shards) whose folder or bucket moved: ``place`` must hold the version
    the run recorded; its data.path is rewritten (its splits.json names files of the local shard cache: unchanged)."""
    from fcclass.data.shards.store import open_store
    from fcclass.data.shards.versions import resolve

    store = open_store(place)
    m = resolve(store, cfg.data.version)
    if m.id != cfg.data.version:
        raise DataError(f"'{store.url}' does not hold version {cfg.data.version}, which run '{run_dir}' was trained on. Nothing was "
                        "changed: give --data-root the place that holds it (`fcclass data ls PLACE` lists a place's versions).")
    lock = _lock(run_dir)
    try:
        moved = Relocation(str(run_dir), "data.path", str(cfg.data.path), store.url, len(m.images), [])
        if cfg.data.path != store.url:
            moved.rewritten = _record_place(run_dir, cfg, None, store.url)
    finally:
        lock.close()
    return moved


def _record_place(run_dir: Path, cfg: Any, record: Any, new: Path | str) -> list[str]:
    """Write ``new`` into each file that records the data's place: the checkpoints' configs, splits.json (unless
    ``record`` is None), summary.json and config.yaml (last, as the one users read)."""
    key = cfg.data.location_key
    written = []
    try:
        for name in (LAST, BEST):
            if (run_dir / name).is_file():
                ckpt = Checkpoint.load(run_dir / name)
                ckpt.config = {**ckpt.config, "data": {**ckpt.config.get("data", {}), key: str(new)}}
                ckpt.save(run_dir / name)
                written.append(name)
        if record is not None:
            record.root = new
            write_splits(run_dir, record)
            written.append(SPLITS)
        summary = read_summary(run_dir)
        if summary is not None and summary.data is not None:
            summary.data = str(new)
            write_summary(run_dir, summary)
            written.append(SUMMARY)
        write_config(run_dir, cfg.model_copy(update={"data": cfg.data.moved_to(new)}))
        written.append(CONFIG)
    except OSError as e:
        raise RunWriteError(f"Cannot write to '{run_dir}': {os_error_reason(e)}. Make it writable (or free some space) and "
                            f"relocate again; {', '.join(written) or 'nothing'} already record(s) the new place.") from None
    return written
