"""Train/val/test splits: drawn once (stratified, seeded) when a run starts, recorded in the run directory
(``splits.json``, read and written by fcclass.runs.splits), and read back from there by evaluation, prediction on a
split and resume, so the images a model was tested on can never silently change. Image-folder records name each file relative to the folder, with
its size, modification time and content hash; torchvision records hold indices into the dataset's sets."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from fcclass.errors import DataError

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Split:
    """A split as the loaders see it: labels plus either uint8 images (N, C, H, W) or the files to decode. With
    ``rows``, ``images`` is a pool several splits share (an image folder's memory-mapped decode cache) and the
    split's i-th image is ``images[rows[i]]``: nothing is copied out of the pool until a batch is drawn."""

    labels: torch.Tensor
    images: torch.Tensor | None = None
    files: list[Path] | None = None
    names: list[str] | None = None  # in-memory images: where each comes from, e.g. "fashion_mnist:test[17]"
    rows: torch.Tensor | None = None  # positions of this split's images in ``images`` (a shared pool); None: its own

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, idx: torch.Tensor) -> "Split":
        pick = idx.tolist()
        files = [self.files[i] for i in pick] if self.files is not None else None
        names = [self.names[i] for i in pick] if self.names is not None else None
        if self.rows is not None:  # still rows of the same pool
            return Split(self.labels[idx], self.images, files, names, self.rows[idx])
        return Split(self.labels[idx], self.images[idx] if self.images is not None else None, files, names)

    def take(self, idx: torch.Tensor | slice) -> torch.Tensor:
        """The uint8 images at positions ``idx`` (an index tensor or a slice) of the split."""
        assert self.images is not None
        return self.images[idx] if self.rows is None else self.images[self.rows[idx]]

    def on(self, device: Any) -> "Split":
        """Labels and images ready to batch on ``device``. On the CPU a memory-mapped pool stays where it is, read
        through the rows; elsewhere only this split's images are copied over, a chunk at a time (so the pool, which
        may hold other splits and be larger than memory, is never read whole)."""
        assert self.images is not None
        dev = torch.device(device)
        if self.rows is None:
            return Split(self.labels.to(dev), self.images.to(dev))
        if dev.type == "cpu":
            return Split(self.labels, self.images, rows=self.rows)
        out = torch.empty((len(self), *self.images.shape[1:]), dtype=self.images.dtype, device=dev)
        for start in range(0, len(self), 4096):
            out[start : start + 4096].copy_(self.images[self.rows[start : start + 4096]])
        return Split(self.labels.to(dev), out)


def stratified_take(labels: torch.Tensor, n_take: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``n_take`` indices with the class proportions of ``labels`` (largest remainder); return (taken, rest)."""
    n = labels.numel()
    n_take = max(0, min(n_take, n))
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * n_take / max(n, 1)
    quota = exact.floor().long()
    short = n_take - int(quota.sum())
    if short > 0:
        order = torch.argsort(exact - quota, descending=True, stable=True)
        quota[order[:short]] += 1
    taken, rest = [], []
    for c, q in zip(classes.tolist(), quota.tolist()):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        taken.append(idx[:q])
        rest.append(idx[q:])
    if not taken:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(taken).sort().values, torch.cat(rest).sort().values


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()


def draw_splits(pools: dict[str, Any], cfg: Any, seed: int) -> dict[str, tuple[str, torch.Tensor]]:
    """{split: (pool, indices into the pool)}: test from the test pool (or data.test_split of the training pool when
    there is none), then data.limit_train, then val from a val pool (or data.val_split of what is left)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, tuple[str, torch.Tensor]] = {}
    if "test" in pools:
        test_idx = torch.arange(len(pools["test"]))
        if cfg.limit_test is not None and cfg.limit_test < len(test_idx):
            test_idx, _ = stratified_take(pools["test"].labels, cfg.limit_test, torch.Generator().manual_seed(seed))
        out["test"] = ("test", test_idx)
        if "train" not in pools:  # only the test set was read (evaluation on a fresh draw)
            return out
    train_idx = torch.arange(len(pools["train"]))
    labels = pools["train"].labels
    if "test" not in pools:
        n_test = max(1, round(cfg.test_split * len(train_idx)))
        taken, rest = stratified_take(labels, n_test, gen)
        if cfg.limit_test is not None and cfg.limit_test < len(taken):
            keep, _ = stratified_take(labels[taken], cfg.limit_test, torch.Generator().manual_seed(seed))
            taken = taken[keep]
        out["test"], train_idx = ("train", taken), rest
    if cfg.limit_train is not None and cfg.limit_train < len(train_idx):
        keep, _ = stratified_take(labels[train_idx], cfg.limit_train, gen)
        train_idx = train_idx[keep]
    if "val" in pools:
        out["val"] = ("val", torch.arange(len(pools["val"])))
    else:
        val, rest = stratified_take(labels[train_idx], round(cfg.val_split * len(train_idx)), gen)
        out["val"], train_idx = ("train", train_idx[val]), train_idx[rest]
    out["train"] = ("train", train_idx)
    if len(train_idx) == 0:
        raise DataError("The training split is empty: raise data.limit_train or lower data.val_split / data.test_split.")
    return out


# ----------------------------------------------------------------------------- the record
def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


Facts = tuple[int, int, str]  # a file's size, mtime_ns and content hash


def file_facts(paths: Sequence[Path], known: dict[Path, Facts] | None = None) -> list[Facts]:
    """(size, mtime_ns, content hash) of each file, read on threads; those in ``known`` (hashed earlier in this run,
    by the decode cache's check) are not read again."""

    def facts(path: Path) -> Facts:
        if known and path in known:
            return known[path]
        st = path.stat()
        return st.st_size, st.st_mtime_ns, file_digest(path)

    from fcclass.data.images import decode_threads

    with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
        return list(pool.map(facts, paths))


def _labels_digest(labels: torch.Tensor) -> str:
    return hashlib.blake2b(labels.to(torch.int64).numpy().tobytes(), digest_size=16).hexdigest()


@dataclass
class SplitRecord:
    """What a run records of its splits (its ``splits.json``): the dataset, its root when the run started, and every
    split's members."""

    dataset: str
    root: Path
    class_names: list[str]
    channels: int
    size: list[int]
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}: left out as unreadable (on_unreadable: skip)

    @classmethod
    def of(cls, source: Any, chosen: dict[str, tuple[str, torch.Tensor]], dataset: str, channels: int,
           size: Sequence[int], skipped: Sequence[tuple[Path, str]] = (), known: dict[Path, Facts] | None = None) -> "SplitRecord":
        record = cls(dataset, source.root, list(source.class_names), channels, list(size))
        record.skipped = [{"file": f.relative_to(source.root).as_posix(), "reason": why} for f, why in skipped]
        for name, (pool_name, idx) in chosen.items():
            pool = source.pools[pool_name]
            labels = pool.labels[idx]
            if pool.files is None:
                record.splits[name] = {"pool": pool_name, "indices": idx.tolist(), "labels_digest": _labels_digest(labels),
                                       "counts": class_counts(labels, len(source.class_names))}
                continue
            files = [pool.files[i] for i in idx.tolist()]
            facts = file_facts(files, known)
            record.splits[name] = {"files": [f.relative_to(source.root).as_posix() for f in files], "labels": labels.tolist(),
                                   "sizes": [s for s, _, _ in facts], "mtimes_ns": [m for _, m, _ in facts],
                                   "blake2b": [d for _, _, d in facts]}
        return record

    @property
    def kind(self) -> str:
        return "files" if any("files" in s for s in self.splits.values()) else "tensors"

    def label_counts(self, name: str) -> list[int] | None:
        """Images per label in a split, without reading the data."""
        split = self.splits.get(name, {})
        if "labels" in split:
            return class_counts(torch.tensor(split["labels"], dtype=torch.long), len(self.class_names))
        return split.get("counts")


# ----------------------------------------------------------------------------- checking a recorded file split
@dataclass
class FileCheck:
    present: list[int]  # positions in the record whose file is usable
    vanished: list[str]
    changed: list[str]

    def describe(self) -> str:
        """E.g. '2 file(s) vanished (a.png, b.png); 1 file(s) changed (c.png)'; empty when none did."""
        return "; ".join(f"{len(files)} file(s) {what} ({', '.join(files[:5])}{', ...' if len(files) > 5 else ''})"
                         for what, files in (("vanished", self.vanished), ("changed", self.changed)) if files)


def check_files(split: dict[str, Any], root: Path) -> FileCheck:
    """Compare a recorded file split with the folder now: a file whose size and mtime match is unchanged; one whose
    mtime moved (copied without -p, say) is unchanged if its content hash matches."""

    def state(i: int) -> str:
        path = root / split["files"][i]
        try:
            st = path.stat()
        except OSError:
            return "vanished"
        if st.st_size != split["sizes"][i]:
            return "changed"
        if st.st_mtime_ns == split["mtimes_ns"][i]:
            return "same"
        try:
            return "same" if file_digest(path) == split["blake2b"][i] else "changed"
        except OSError:
            return "vanished"

    from fcclass.data.images import decode_threads

    with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
        states = list(pool.map(state, range(len(split["files"]))))
    check = FileCheck([], [], [])
    for i, s in enumerate(states):
        if s == "vanished":
            check.vanished.append(split["files"][i])
        else:
            if s == "changed":
                check.changed.append(split["files"][i])
            check.present.append(i)
    return check


def tensor_split(record: SplitRecord, name: str, pool: Any) -> Split:
    """A recorded torchvision split from the dataset's pool, after checking the pool still holds the same labels."""
    split = record.splits[name]
    idx = torch.tensor(split["indices"], dtype=torch.long)
    if len(idx) and int(idx.max()) >= len(pool):
        raise DataError(f"The {name} split recorded for this run indexes image {int(idx.max())}, but the {record.dataset} "
                        f"{split['pool']} set has {len(pool)} images now: it is not the data the run was trained on.")
    labels = pool.labels[idx]
    if _labels_digest(labels) != split["labels_digest"]:
        raise DataError(f"The {record.dataset} {split['pool']} set's labels differ from those recorded for this run's {name} split: "
                        "the dataset files changed since training. Point --data-root at the copy the run was trained on.")
    names = [f"{record.dataset}:{split['pool']}[{i}]" for i in idx.tolist()]  # torchvision's own indices
    return Split(labels, pool.images[idx] if pool.images is not None else None, names=names)
