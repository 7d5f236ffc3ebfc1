"""Batch loaders. In-memory sets are batched by indexing one uint8 tensor (on the training device); image folders
are decoded by a DataLoader with worker processes. Both draw each epoch's order from (seed, epoch) alone, so a
resumed run sees exactly the batches an uninterrupted one would, whatever the number of workers."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterator, Sequence

import torch

from fcclass.data.images import load_resized, unreadable, unreadable_error
from fcclass.data.splits import Split
from fcclass.device import SINGLE, Dist
from fcclass.errors import DataError


def epoch_seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed for one epoch of one random stream ("order", "augment", "model"), independent of the others."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool, weights: torch.Tensor | None) -> torch.Tensor | None:
    """The sample order of ``epoch``: a permutation, a weighted draw with replacement, or None (in order)."""
    if weights is None and not shuffle:
        return None
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch, "order"))
    if weights is not None:
        return torch.multinomial(weights, n, replacement=True, generator=gen)
    return torch.randperm(n, generator=gen)


def epoch_batches(n: int, batch_size: int, job: Dist = SINGLE) -> list[tuple[int, int, int]]:
    """(start, end, global size) of this rank's part of every batch of an epoch, as positions in the epoch's order.
    Each global batch is cut into contiguous parts, one per rank, whose sizes differ by at most one; a last batch
    smaller than the number of processes is left out (every rank must take part in every step)."""
    out = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        if not job.enabled:
            out.append((start, start + size, size))
            continue
        if size < job.world:
            continue
        base, extra = divmod(size, job.world)
        lo = start + job.rank * base + min(job.rank, extra)
        out.append((lo, lo + base + (job.rank < extra), size))
    return out


def balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-sample weights that make every class equally likely (the balanced sampler)."""
    counts = torch.bincount(labels).double().clamp_min(1)
    return (1.0 / counts)[labels].float()


class TensorLoader:
    """Batches of an in-memory uint8 tensor by indexing: no per-sample Python work."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool, seed: int, weights: torch.Tensor | None = None,
                 device: Any = "cpu", job: Dist = SINGLE) -> None:
        assert split.images is not None
        self.data = split.on(device)  # a memory-mapped pool (cached image folder) stays on the CPU, read through rows
        self.labels = self.data.labels
        self.batch_size, self.shuffle, self.seed, self.weights = batch_size, shuffle, seed, weights
        self.batches = epoch_batches(self.labels.numel(), batch_size, job)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def global_size(self, batch: int) -> int:
        """Images in the whole job's batch ``batch`` (0-based), of which this rank trains on its part."""
        return self.batches[batch][2]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(self.labels.numel(), self.seed, self.epoch, self.shuffle, self.weights)
        for start, end, _ in self.batches:
            if order is None:
                yield self.data.take(slice(start, end)), self.labels[start:end]
            else:
                idx = order[start:end].to(self.labels.device)
                yield self.data.take(idx), self.labels[idx]


class EpochSampler(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: this rank's part of each batch of ``epoch_order`` for the epoch set with
    ``set_epoch``."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool, weights: torch.Tensor | None, job: Dist = SINGLE) -> None:
        self.n, self.seed, self.shuffle, self.weights = n, seed, shuffle, weights
        self.batches = epoch_batches(n, batch_size, job)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle, self.weights)
        order_list = list(range(self.n)) if order is None else order.tolist()
        return iter([order_list[start:end] for start, end, _ in self.batches])


class _FileDataset(torch.utils.data.Dataset):
    """Decodes one file to uint8 (C, H, W); a file that fails gets label -1 - index, reported by the loader."""

    def __init__(self, files: list[Any], labels: torch.Tensor, channels: int, size: Sequence[int]) -> None:
        self.files, self.labels, self.channels, self.size = files, labels, channels, tuple(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return load_resized(self.files[i], self.channels, self.size), self.labels[i]
        except DataError:
            return torch.zeros(self.channels, *self.size, dtype=torch.uint8), torch.tensor(-1 - i)


class FileLoader:
    """A DataLoader over image files. A file that cannot be decoded stops the epoch with every unreadable file of the
    split listed (one sweep over the split), not just the first one found; with ``skip`` (data.on_unreadable: skip)
    it is left out of its batch instead, in every epoch (it stays in the split, so each epoch's order is what it
    would be without it), and ``skipped`` names it ({position in the split: why})."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool, seed: int, channels: int, size: Sequence[int],
                 weights: torch.Tensor | None = None, device: Any = "cpu", num_workers: int | None = None,
                 job: Dist = SINGLE, skip: bool = False) -> None:
        from torch.utils.data import DataLoader

        self.split, self.channels, self.skip = split, channels, skip
        self.skipped: dict[int, str] = {}
        self.sampler = EpochSampler(len(split), batch_size, seed, shuffle, weights, job)
        workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        # A generator of its own: without one, DataLoader seeds its workers from torch's global generator when it
        # starts them, which would shift the dropout masks of that epoch (and a resumed run starts them an epoch later).
        self.loader = DataLoader(_FileDataset(split.files or [], split.labels, channels, size),
                                 batch_sampler=self.sampler, num_workers=workers, persistent_workers=workers > 0,
                                 pin_memory=torch.device(device).type == "cuda", generator=torch.Generator().manual_seed(seed))

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def global_size(self, batch: int) -> int:
        return self.sampler.batches[batch][2]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            failed = y < 0
            if bool(failed.any()):
                if not self.skip:
                    raise unreadable_error(unreadable(self.split.files or [], full_decode=True, channels=self.channels))
                self._note((-1 - y[failed]).tolist())
                x, y = x[~failed], y[~failed]
            yield x, y

    def _note(self, positions: list[int]) -> None:
        """Files found unreadable in a batch (with ``skip``): why, asked once per file."""
        files = self.split.files or []
        new = [i for i in positions if i not in self.skipped]
        found = dict(unreadable([files[i] for i in new], full_decode=True, channels=self.channels))
        for i in new:
            self.skipped[i] = found.get(files[i], "could not be decoded")


def make_loader(split: Split, batch_size: int, shuffle: bool, seed: int, channels: int, size: Sequence[int],
                balanced: bool = False, device: Any = "cpu", num_workers: int | None = None, job: Dist = SINGLE,
                skip: bool = False) -> TensorLoader | FileLoader:
    """The loader of a split; with ``job`` (distributed training), of this rank's part of every batch; ``skip``: files
    that cannot be decoded are left out of their batch (FileLoader.skipped) rather than stop it."""
    weights = balanced_weights(split.labels) if balanced else None
    if split.images is not None:
        return TensorLoader(split, batch_size, shuffle, seed, weights, device, job)
    return FileLoader(split, batch_size, shuffle, seed, channels, size, weights, device, num_workers, job, skip)


def channel_stats(split: Split, channels: int, size: Sequence[int], num_workers: int | None = None,
                  batch_size: int = 1024, skipped: dict[int, str] | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the split's pixels scaled to [0, 1] (accumulated in float64 on the CPU). With
    ``skipped``, files that cannot be decoded are left out and put there ({position: why})."""
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    loader = make_loader(split, batch_size, False, 0, channels, size, num_workers=num_workers, skip=skipped is not None)
    for x, _ in loader:
        x = x.double() / 255.0
        total += x.sum((0, 2, 3))
        total_sq += x.square().sum((0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if skipped is not None and isinstance(loader, FileLoader):
        skipped.update(loader.skipped)
    mean = total / max(count, 1)
    std = (total_sq / max(count, 1) - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()
