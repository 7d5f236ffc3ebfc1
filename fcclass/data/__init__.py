"""Data: where images come from (``sources``), how they are decoded (``images``), the recorded train/val/test
splits (``splits``), the batch loaders (``loaders``) and batch preprocessing on the device (``augment``).

``load_dataset`` draws new splits (a new run); ``dataset_from_record`` rebuilds the splits a run recorded
(evaluation, prediction on a split, resume)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from fcclass.config.registries import DATASETS, TorchvisionSet
from fcclass.config.sections import DataConfig
from fcclass.data.augment import BatchPreprocess, augment_batch, rotate
from fcclass.data.cache import Progress, cache_folder, cached_pools
from fcclass.data.images import (
    IMAGE_EXTENSIONS,
    LUMA,
    MAX_IMAGE_PIXELS,
    convert_channels,
    decode_resized,
    decode_threads,
    describe_bad_files,
    image_size,
    is_image_name,
    list_images,
    load_image,
    load_resized,
    resize_uint8,
    unreadable,
    unreadable_error,
)
from fcclass.data.loaders import FileLoader, TensorLoader, channel_stats, epoch_seed, make_loader
from fcclass.data.sources import Source, data_root, imagefolder_source, open_source, unpack_debian_copy
from fcclass.data.splits import SPLIT_NAMES, Facts, Split, SplitRecord, check_files, class_counts, draw_splits, stratified_take, tensor_split
from fcclass.data.weights import class_weights
from fcclass.errors import DataError

__all__ = [
    "BatchPreprocess", "DataInfo", "Dataset", "FileLoader", "IMAGE_EXTENSIONS", "LUMA", "MAX_IMAGE_PIXELS", "Progress", "Split",
    "SplitRecord", "TensorLoader", "augment_batch", "cache_folder", "channel_stats", "class_counts", "convert_channels", "data_root", "decode_resized",
    "class_weights", "dataset_from_record", "record_differences", "decode_threads", "describe", "normalization", "epoch_seed", "is_image_name",
    "list_images", "load_dataset", "load_image", "load_resized",
    "make_loader", "resize_uint8", "rotate", "stratified_take", "unpack_debian_copy",
]


@dataclass
class DataInfo:
    """What a model and a checkpoint need to know about the data."""

    class_names: list[str]
    input_shape: tuple[int, int, int]  # C, H, W after resize and channel conversion
    train_counts: list[int] = field(default_factory=list)
    val_counts: list[int] = field(default_factory=list)
    test_counts: list[int] = field(default_factory=list)  # the recorded test split (not loaded for training)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class Dataset:
    info: DataInfo
    splits: dict[str, Split]
    size: tuple[int, int]  # (H, W) every image is resized to
    channels: int
    name: str = ""  # the config's data.dataset
    notes: list[str] = field(default_factory=list)  # what the user should know about the data (changed files...)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # files left out as unreadable (data.on_unreadable: skip), why
    version: str | None = None  # a packed dataset's version (data.dataset: shards)
    _record: SplitRecord | None = None
    _source: Source | None = field(default=None, repr=False)
    _chosen: dict[str, tuple[str, torch.Tensor]] | None = field(default=None, repr=False)
    _facts: dict[Path, Facts] = field(default_factory=dict, repr=False)  # files the decode cache hashed: not hashed twice

    @property
    def train(self) -> Split | None:
        return self.splits.get("train")

    @property
    def val(self) -> Split | None:
        return self.splits.get("val")

    @property
    def test(self) -> Split | None:
        return self.splits.get("test")

    def leave_out(self, name: str, found: dict[int, str]) -> None:
        """Leave out of split ``name`` the positions ``found`` unreadable ({position: why}) while reading it before
        training (data.on_unreadable: skip); a new run's record then leaves them out too."""
        if not found:
            return
        split = self.splits[name]
        keep = torch.tensor([i for i in range(len(split)) if i not in found], dtype=torch.long)
        bad = [(split.files[i], why) for i, why in sorted(found.items())]  # type: ignore[index]
        if not len(keep):
            raise DataError(f"Every image of the {name} split is unreadable ({describe_bad_files(bad, shown=3)}): there is "
                            "nothing to train on. Replace the files, or point data.path at another folder.")
        self.skipped += bad
        self.splits[name] = split.subset(keep)
        if self._chosen is not None and self._record is None:
            pool, idx = self._chosen[name]
            self._chosen[name] = (pool, idx[keep])
        setattr(self.info, f"{name}_counts", class_counts(self.splits[name].labels, self.info.num_classes))

    def record(self) -> SplitRecord:
        """The record of these splits for the run directory (computed once: image folders hash every file)."""
        if self._record is None:
            assert self._source is not None and self._chosen is not None
            self._record = SplitRecord.of(self._source, self._chosen, self.name, self.channels, self.size, self.skipped, self._facts)
        return self._record


def _shape(cfg: DataConfig, source: Source, skipped: Sequence[tuple[Path, str]] = ()) -> tuple[int, tuple[int, int]]:
    """(channels, (height, width)) the images are converted to: the config's, else the dataset's (an image folder:
    RGB, and the size of its first training image that is not ``skipped``)."""
    if source.shape is not None:
        channels, size = cfg.channels or source.shape[0], tuple(cfg.image_size or source.shape[1:])
    else:
        channels = cfg.channels or 3
        left_out = {path for path, _ in skipped}
        first = next(f for f in source.pools["train"].files or [] if f not in left_out)
        size = tuple(cfg.image_size) if cfg.image_size else image_size(first)
    return channels, size  # type: ignore[return-value]


def _materialise(pool: Any, idx: torch.Tensor, channels: int, size: Sequence[int]) -> Split:
    split = Split(pool.labels[idx], files=[pool.files[i] for i in idx.tolist()] if pool.files is not None else None)
    if pool.images is not None:
        split.images = _in_memory(pool.images[idx], channels, size)
    return split


def _in_memory(images: torch.Tensor, channels: int, size: Sequence[int]) -> torch.Tensor:
    """Images converted and resized once, to be held in memory; refused first when they would not fit."""
    from fcclass.memory import images_bytes, require

    n = images.shape[0]
    require(images_bytes(n, (channels, *size)), f"Holding {n:,} images of {channels}x{size[0]}x{size[1]} in memory",
            "Lower data.image_size (or data.limit_train / data.limit_test).")
    return resize_uint8(convert_channels(images, channels), size).contiguous()


def _check_readable(source: Source, chosen: dict[str, tuple[str, torch.Tensor]], skip: bool) -> list[tuple[Path, str]]:
    """Before training, every file of every split is opened (headers, on threads) and the test split, which training
    never reads, is decoded in full: all bad files at once, and none left to be found only at evaluation. Returns
    them with ``skip`` (data.on_unreadable: skip); raises otherwise."""
    def files(*names: str) -> list[Path]:
        return [source.pools[pool].files[i] for pool, idx in (chosen[n] for n in names if n in chosen)
                if source.pools[pool].files is not None for i in idx.tolist()]

    every = files("train", "val", "test")
    bad = unreadable(every)
    broken = {path for path, _ in bad}
    bad += unreadable([f for f in files("test") if f not in broken], full_decode=True)
    if bad and not skip:
        raise unreadable_error(bad, of=len(every), hint=", or set data.on_unreadable: skip to train without them")
    return bad


def _leave_out(source: Source, chosen: dict[str, tuple[str, torch.Tensor]], bad: Sequence[tuple[Path, str]]
               ) -> dict[str, tuple[str, torch.Tensor]]:
    """The splits without the ``bad`` files (data.on_unreadable: skip); an empty training split is an error."""
    if not bad:
        return chosen
    left_out = {path for path, _ in bad}
    out = {}
    for name, (pool, idx) in chosen.items():
        files = source.pools[pool].files or []
        out[name] = (pool, idx[torch.tensor([files[i] not in left_out for i in idx.tolist()], dtype=torch.bool)])
    if not len(out["train"][1]):
        raise DataError(f"Every image of the training split is unreadable ({describe_bad_files(list(bad), shown=3)}): "
                        "there is nothing to train on. Replace the files, or point data.path at another folder.")
    return out


def load_dataset(cfg: DataConfig, seed: int, splits: Sequence[str] = SPLIT_NAMES, progress: Progress | None = None) -> Dataset:
    """Draw new train/val/test splits from the data (stratified, seeded) and load the ones asked for (all three are
    drawn and recorded either way). ``progress`` shows an image folder's decode cache being built."""
    only_test = set(splits) == {"test"} and isinstance(DATASETS[cfg.dataset], TorchvisionSet)
    source = open_source(cfg, pools=("test",) if only_test else ("train", "test"), progress=progress)
    chosen = draw_splits(source.pools, cfg, seed)
    skipped = _check_readable(source, chosen, cfg.on_unreadable == "skip")
    chosen = _leave_out(source, chosen, skipped)
    channels, size = _shape(cfg, source, skipped)
    parts = {name: _materialise(source.pools[chosen[name][0]], chosen[name][1], channels, size) for name in splits}
    notes = list(source.notes)
    facts: dict[Path, Facts] = {}
    if source.kind == "files":
        pools = {name: pool.files or [] for name, pool in source.pools.items()}
        found, cache_notes = _use_cache(cfg, source.root, pools, {name: chosen[name] for name in splits}, parts, channels, size,
                                        progress, facts, source.pool_dirs)
        skipped, chosen, notes = skipped + found, _leave_out(source, chosen, found), notes + cache_notes + _trimmed(cfg, source)
    _name(parts, source)
    info = _info(source.class_names, channels, size, parts)
    test_pool, test_idx = chosen["test"]
    info.test_counts = class_counts(source.pools[test_pool].labels[test_idx], len(source.class_names))
    return Dataset(info, parts, size, channels, cfg.dataset, notes, skipped, source.version, _source=source, _chosen=chosen, _facts=facts)


def _use_cache(cfg: DataConfig, root: Path, pools: dict[str, list[Path]], wanted: dict[str, tuple[str, torch.Tensor]],
               parts: dict[str, Split], channels: int, size: Sequence[int], progress: Progress | None,
               facts: dict[Path, Facts] | None = None, pool_dirs: dict[str, Path] | None = None
               ) -> tuple[list[tuple[Path, str]], list[str]]:
    """Point each split whose pool is cached at the pool's memory-mapped images (its rows in the pool); the others
    keep their files and stream. The cache's build finds files whose pixel data is corrupt: with data.on_unreadable:
    skip they are left out of ``parts`` and returned (file, why). Returns them and the cache's notes."""
    pixels, notes, bad = cached_pools(cfg, root, pools, wanted, channels, size, progress, facts, pool_dirs)
    found: list[tuple[Path, str]] = []
    for name, (pool, rows) in wanted.items():
        if pool not in pixels:
            continue
        parts[name].images, parts[name].rows = pixels[pool], rows
        gone = bad.get(pool, {})
        keep = [j for j, row in enumerate(rows.tolist()) if row not in gone]
        if len(keep) < len(rows):
            found += [(pools[pool][row], gone[row]) for row in rows.tolist() if row in gone]
            parts[name] = parts[name].subset(torch.tensor(keep, dtype=torch.long))
    return found, notes


def _name(parts: dict[str, Split], source: Source | None) -> None:
    """A packed dataset's splits name their images as the source did (``sandal/0007.png``), not by their file in the
    shard cache: what prediction tables and reports show."""
    if source is not None and source.names:
        for split in parts.values():
            split.names = [source.names.get(f, str(f)) for f in split.files or []]


def _trimmed(cfg: DataConfig, source: Source | None) -> list[str]:
    """A packed dataset's cache folder brought back under data.cache_max_gb once the decode cache is built (least
    recently used shards and files first, never a shard in use); a note when what is in use is over the limit."""
    if source is None or source.version is None:
        return []
    from fcclass.data.shards.cache import make_room

    note = make_room(source.root.parent, cfg.cache_max_gb * 1e9)
    return [note] if note else []


def _info(class_names: list[str], channels: int, size: Sequence[int], parts: dict[str, Split]) -> DataInfo:
    info = DataInfo(list(class_names), (channels, int(size[0]), int(size[1])))
    for name, counts in (("train", "train_counts"), ("val", "val_counts")):
        if name in parts:
            setattr(info, counts, class_counts(parts[name].labels, len(class_names)))
    return info


def dataset_from_record(cfg: DataConfig, record: SplitRecord, splits: Sequence[str], root: str | Path | None = None,
                        allow_changed: bool = False, fetch: bool = True, progress: Progress | None = None) -> Dataset:
    """The splits a run recorded, read from the data as it is now (``root``: where the data is now, if it moved).
    Files that vanished or changed since training are an error unless ``allow_changed``. An image folder's splits
    are read from its decode cache when data.cache allows (``progress``: shows it being built)."""
    base = Path(root).expanduser().absolute() if root is not None else record.root
    size = (int(record.size[0]), int(record.size[1]))
    if record.kind == "tensors":
        source = open_source(cfg.model_copy(update={"root": str(base)}), pools={record.splits[s]["pool"] for s in splits}, fetch=fetch)
        parts = {}
        for name in splits:
            split = tensor_split(record, name, source.pools[record.splits[name]["pool"]])
            split.images = _in_memory(split.images, record.channels, size)
            parts[name] = split
        notes: list[str] = []
        skipped: list[tuple[Path, str]] = []
    else:
        if record.dataset == "shards" and root is not None:  # --data-root: where the packed dataset is now
            cfg = cfg.moved_to(root)
        packed = open_source(cfg, progress=progress) if record.dataset == "shards" else None  # fetches what the cache lacks
        if packed is not None:
            base = packed.root
        parts, notes = _file_splits(record, splits, base, allow_changed, count_added=packed is None)
        notes = (packed.notes if packed is not None else []) + notes
        pools, wanted = _recorded_pools(base, parts, packed)
        skipped = [(base / s["file"], s["reason"]) for s in record.skipped]
        if skipped:
            notes.append(f"{len(skipped):,} unreadable file(s) of '{base}' were left out of this run's splits when it was trained "
                         f"(data.on_unreadable: skip): {describe_bad_files(skipped, shown=3)}. splits.json lists them all.")
        found, cache_notes = _use_cache(cfg, base, pools, wanted, parts, record.channels, size, progress,
                                        pool_dirs=packed.pool_dirs if packed is not None else None)
        _name(parts, packed)
        notes += cache_notes + _trimmed(cfg, packed) + ([f"{len(found):,} recorded file(s) cannot be decoded now and are left out (data.on_unreadable: skip): "
                                 f"{describe_bad_files(found, shown=3)}."] if found else [])
        skipped += found
    info = _info(record.class_names, record.channels, size, parts)
    info.test_counts = record.label_counts("test") or []
    return Dataset(info, parts, size, record.channels, record.dataset, notes, skipped, cfg.version, _record=record)


def _file_splits(record: SplitRecord, splits: Sequence[str], base: Path, allow_changed: bool, count_added: bool = True
                 ) -> tuple[dict[str, Split], list[str]]:
    if not base.is_dir():
        raise DataError(f"The run's image folder '{base}' is not there any more (moved or deleted). "
                        "Point the run at the folder's new place with --data-root DIR, or record that place once for every "
                        "later command: fcclass runs relocate RUN --data-root DIR.")
    parts, notes = {}, []
    for name in splits:
        rec = record.splits[name]
        check = check_files(rec, base)
        if (check.vanished or check.changed) and not allow_changed:
            raise DataError(
                f"The {name} split recorded for this run has changed under '{base}' since training: {check.describe()}. "
                "Restore them, point --data-root at the copy the run was trained on, or pass --allow-changed-data to use "
                "the files as they are now (vanished ones skipped).")
        if check.vanished or check.changed:
            notes.append(f"--allow-changed-data: of the {len(rec['files']):,} recorded {name} files, {len(check.vanished)} vanished "
                         f"(left out) and {len(check.changed)} changed (used as they are now).")
        keep = check.present
        parts[name] = Split(torch.tensor([rec["labels"][i] for i in keep], dtype=torch.long),
                            files=[base / rec["files"][i] for i in keep])
    recorded = {f for rec in record.splits.values() for f in rec["files"]} | {s["file"] for s in record.skipped}
    added = sum(1 for f in list_images(base) if f.relative_to(base).as_posix() not in recorded) if count_added else 0
    if added:
        notes.append(f"{added:,} image(s) in '{base}' are not in any split recorded for this run (added after training); "
                     "they are left out.")
    return parts, notes


def record_differences(cfg: DataConfig, record: SplitRecord, root: str | Path) -> list[str]:
    """How the data at ``root`` differs from the splits a run recorded, one line per difference (empty: it is the same
    data): an image folder's vanished or changed files, per split; a torchvision set that is missing there, or whose
    sets or labels are not those recorded. Reads only what the checks need (no decoding, no cache)."""
    base = Path(root).expanduser().absolute()
    if record.kind == "files":
        return [f"the {name} split: {check.describe()}" for name in SPLIT_NAMES if name in record.splits
                for check in [check_files(record.splits[name], base)] if check.vanished or check.changed]
    pools = {split["pool"] for split in record.splits.values()}
    try:
        source = open_source(cfg.model_copy(update={"dataset": record.dataset}).moved_to(base), pools=sorted(pools), fetch=False)
        for name, split in record.splits.items():
            tensor_split(record, name, source.pools[split["pool"]])
    except DataError as e:
        return [str(e)]
    if source.class_names != record.class_names:
        return [f"its labels are {source.class_names}, the run's {record.class_names}"]
    return []


def _recorded_pools(base: Path, parts: dict[str, Split], source: Source | None = None
                    ) -> tuple[dict[str, list[Path]], dict[str, tuple[str, torch.Tensor]]]:
    """The folder's pools as they are now, and each recorded split as (pool, its rows there): what the cache is keyed
    by, so a resume or an eval reuses the cache its training built. A split with a file outside the pools (the
    layout changed) is left out, to stream."""
    try:
        source = source or imagefolder_source(base)
    except DataError:
        return {}, {}
    where = {f: (name, i) for name, pool in source.pools.items() for i, f in enumerate(pool.files or [])}
    wanted = {}
    for name, split in parts.items():
        found = [where.get(f) for f in split.files or []]
        pools = {hit[0] for hit in found if hit is not None}
        if found and None not in found and len(pools) == 1:
            wanted[name] = (pools.pop(), torch.tensor([hit[1] for hit in found if hit is not None], dtype=torch.long))
    return {name: pool.files or [] for name, pool in source.pools.items()}, wanted


def describe(cfg: DataConfig) -> tuple[tuple[int, int, int], int]:
    """Input shape (C, H, W) and number of classes, without decoding the images (for `summary`)."""
    spec = DATASETS[cfg.dataset]
    if isinstance(spec, TorchvisionSet):
        (c, h, w), num_classes = spec.shape, spec.num_classes
    elif cfg.dataset == "shards":
        from fcclass.data.shards.source import pin_version

        m, _ = pin_version(cfg)
        (c, h, w), num_classes = m.first_shape or (3, *(cfg.image_size or (0, 0))), len(m.labels)
    else:
        from fcclass.data.sources import imagefolder_source

        source = imagefolder_source(data_root(cfg))
        c, num_classes = 3, len(source.class_names)
        h, w = image_size(source.pools["train"].files[0])
    if cfg.image_size:
        h, w = cfg.image_size
    return (cfg.channels or c, h, w), num_classes


def normalization(cfg: DataConfig, ds: Dataset) -> tuple[list[float], list[float]]:
    """data.normalize as (mean, std) per channel: measured on the training split (auto), none, or given."""
    norm = cfg.normalize
    channels = ds.info.input_shape[0]
    if norm == "none":
        return [], []
    if norm == "auto":  # decodes a streamed training split once: with skip, what it finds unreadable is left out now
        assert ds.train is not None
        found: dict[int, str] = {}
        stats = channel_stats(ds.train, channels, ds.size, num_workers=cfg.num_workers,
                              skipped=found if cfg.on_unreadable == "skip" else None)
        ds.leave_out("train", found)
        return stats
    if len(norm.mean) != channels:
        raise DataError(f"data.normalize has {len(norm.mean)} mean/std values but the images have {channels} channel(s); give one per channel.")
    return list(norm.mean), list(norm.std)
