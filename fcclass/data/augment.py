"""Batch preprocessing on the training device: uint8 -> float, augmentation of whole batches, normalisation.
Augmentation draws from a generator seeded by (seed, epoch), so a resumed run augments exactly as an
uninterrupted one."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from fcclass.data.loaders import epoch_seed


class BatchPreprocess:
    """uint8 batch -> normalised float batch (with augmentation in training), on the batch's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: Any = None, seed: int = 0) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1) if mean else None
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1) if std else None
        self.augment, self.seed = augment, seed
        self.generator = torch.Generator().manual_seed(epoch_seed(seed, 0, "augment"))

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        """Seed the epoch's augmentation from (seed, epoch) and, under torchrun, the rank (each rank augments its own images)."""
        self.generator.manual_seed(epoch_seed(self.seed, epoch, "augment" if not rank else f"augment:{rank}"))

    def __call__(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        x = x.float().div_(255.0)
        if train and self.augment is not None:
            x = augment_batch(x, self.augment, self.generator)
        if self.mean is not None:
            if self.mean.device != x.device:
                self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
            x = (x - self.mean) / self.std
        return x


def augment_batch(x: torch.Tensor, aug: Any, gen: torch.Generator | None) -> torch.Tensor:
    """Random crop with zero padding, horizontal flip and rotation, for a whole float batch at once."""
    b = x.shape[0]

    def rand(n: int) -> torch.Tensor:
        return torch.rand(n, generator=gen).to(x.device)

    if aug.random_crop_padding:
        x = random_crop(x, aug.random_crop_padding, rand(b), rand(b))
    if aug.horizontal_flip:
        flip = (rand(b) < 0.5).view(b, 1, 1, 1)
        x = torch.where(flip, x.flip(3), x)
    if aug.rotation:
        x = rotate(x, (rand(b) * 2 - 1) * math.radians(aug.rotation))
    return x


def random_crop(x: torch.Tensor, p: int, uy: torch.Tensor, ux: torch.Tensor) -> torch.Tensor:
    """Pad by ``p`` zeros and crop back to the original size at offsets chosen by ``uy``, ``ux`` in [0, 1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (p, p, p, p))
    dy = (uy * (2 * p + 1)).long().clamp_max(2 * p)
    dx = (ux * (2 * p + 1)).long().clamp_max(2 * p)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # b, h, 1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # b, 1, w
    bidx = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 3, 1, 2).contiguous()


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by its angle (radians), bilinear, zeros outside. affine_grid works in
    coordinates normalised to [-1, 1] on each axis, so on a non-square image the off-diagonal terms are scaled by the
    aspect ratio; without that a rotation would also stretch the picture."""
    _, _, h, w = x.shape
    cos, sin = angles.cos(), angles.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin * (h / w), zero], 1), torch.stack([sin * (w / h), cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
