"""Datasets, stratified splits, the shared image preprocessing and the batch loaders.

The MNIST family and CIFAR are held as one uint8 tensor and served by slicing whole batches
(normalised and augmented as batches on the training device); ``imagefolder`` decodes files in a
DataLoader with workers. Both yield uint8 batches, so training, eval and predict share one
preprocessing path: ``load_image``/``resize_uint8``/``convert_channels`` then ``BatchPreprocess``.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from fcclass.config import AugmentConfig, DataConfig
from fcclass.errors import DataError
from fcclass.registries import DATASETS, TorchvisionSet

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default bomb limit (~0.25 GB of RGBA), enforced as an error
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what Pillow's convert("L") uses


@dataclass
class DataInfo:
    """What a model and a checkpoint need to know about the data."""

    class_names: list[str]
    input_shape: tuple[int, int, int]  # C, H, W after resize and channel conversion
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    train_counts: list[int] = field(default_factory=list)
    val_counts: list[int] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class Split:
    """Labels plus either the images themselves (uint8 N,C,H,W) or the files to decode."""

    labels: torch.Tensor
    images: torch.Tensor | None = None
    files: list[Path] | None = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, idx: torch.Tensor) -> "Split":
        files = [self.files[i] for i in idx.tolist()] if self.files is not None else None
        images = self.images[idx] if self.images is not None else None
        return Split(self.labels[idx], images, files)


@dataclass
class Dataset:
    info: DataInfo
    train: Split | None = None
    val: Split | None = None
    test: Split | None = None
    size: tuple[int, int] | None = None  # (H, W) every image is resized to
    channels: int = 1


# ----------------------------------------------------------------------------- image helpers
def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, channels, H, W): gray to RGB by repeating, RGB to gray by luma."""
    c = x.shape[1]
    if c == channels:
        return x
    if channels == 3 and c == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and c == 3:
        w = torch.tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)
        return (x.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise DataError(f"Cannot convert {c}-channel images to {channels} channels; set data.channels to 1 or 3.")


def resize_uint8(x: torch.Tensor, size: Sequence[int] | None, chunk: int = 4096) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 (N, C, H, W) images, in chunks to bound memory."""
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    out = []
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].float()
        part = F.interpolate(part, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
        out.append(part.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def load_image(path: str | Path, channels: int) -> torch.Tensor:
    """Decode one image file to uint8 (channels, H, W). Raises DataError naming the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img)
                img = _to_mode(img, "L" if channels == 1 else "RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found.") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an image.") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{path}: image is too large (over {MAX_IMAGE_PIXELS:,} pixels); refused as a possible decompression bomb. Downscale it first.") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file Pillow can read (corrupt, empty or another format).") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({e}); the file is corrupt or truncated.") from None
    import numpy as np

    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def load_resized(path: str | Path, channels: int, size: Sequence[int]) -> torch.Tensor:
    """One image file as the model sees it before normalisation: uint8 (channels, *size). Shared by every path."""
    return resize_uint8(load_image(path, channels).unsqueeze(0), size)[0]


def _to_mode(img: Any, mode: str) -> Any:
    """Convert any Pillow mode (RGBA, P, CMYK, 16-bit, float) to L or RGB."""
    from PIL import Image

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if img.mode != "F" else (255.0 if arr.max(initial=0) <= 1.0 else 1.0)
        img = Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white, as viewers show it
        img = Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert(mode)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------- splits
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
    taken_t, rest_t = torch.cat(taken), torch.cat(rest)
    return taken_t.sort().values, rest_t.sort().values


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()


# ----------------------------------------------------------------------------- sources
def describe(cfg: DataConfig) -> tuple[tuple[int, int, int], int]:
    """Input shape (C, H, W) and number of classes, without loading the images (for `summary`)."""
    source = DATASETS[cfg.dataset]
    if isinstance(source, TorchvisionSet):
        c, h, w = source.shape
        num_classes = source.num_classes
    else:
        train_dir, _ = _imagefolder_dirs(cfg)
        classes = _class_dirs(train_dir)
        files = list_images(train_dir / classes[0])
        if not files:
            raise DataError(f"Class folder '{train_dir / classes[0]}' has no images ({', '.join(IMAGE_EXTENSIONS)}).")
        first = load_image(files[0], cfg.channels or 3)
        c, h, w = first.shape
        num_classes = len(classes)
    if cfg.image_size:
        h, w = cfg.image_size
    return (cfg.channels or c, h, w), num_classes


def load_dataset(cfg: DataConfig, seed: int, splits: Sequence[str] = ("train", "val", "test")) -> Dataset:
    """Load the requested splits. Train/val come from the training set (stratified, seeded); test from the test set."""
    source = DATASETS[cfg.dataset]
    gen = torch.Generator().manual_seed(seed)
    if isinstance(source, TorchvisionSet):
        train_all, test, class_names = _load_torchvision(source, cfg, splits)
        channels = cfg.channels or source.shape[0]
        size = tuple(cfg.image_size) if cfg.image_size else source.shape[1:]
    else:
        train_all, test, class_names, size = _load_imagefolder(cfg, gen)
        channels = cfg.channels or 3
    num_classes = len(class_names)
    ds = Dataset(DataInfo(class_names, (channels, *size)), size=tuple(size), channels=channels)

    if "train" in splits or "val" in splits:
        if cfg.limit_train is not None and cfg.limit_train < len(train_all):
            keep, _ = stratified_take(train_all.labels, cfg.limit_train, gen)
            train_all = train_all.subset(keep)
        n_val = round(cfg.val_split * len(train_all))
        val_idx, train_idx = stratified_take(train_all.labels, n_val, gen)
        ds.train = _finish(train_all.subset(train_idx), channels, size)
        ds.val = _finish(train_all.subset(val_idx), channels, size)
        ds.info.train_counts = class_counts(ds.train.labels, num_classes)
        ds.info.val_counts = class_counts(ds.val.labels, num_classes)
        if len(ds.train) == 0:
            raise DataError("The training split is empty: raise data.limit_train or lower data.val_split.")
    if "test" in splits:
        if cfg.limit_test is not None and cfg.limit_test < len(test):
            keep, _ = stratified_take(test.labels, cfg.limit_test, torch.Generator().manual_seed(seed))
            test = test.subset(keep)
        ds.test = _finish(test, channels, size)
    return ds


def _finish(split: Split, channels: int, size: Sequence[int]) -> Split:
    if split.images is not None:
        split.images = resize_uint8(convert_channels(split.images, channels), size).contiguous()
    return split


def _load_torchvision(source: TorchvisionSet, cfg: DataConfig, splits: Sequence[str]) -> tuple[Split, Split, list[str]]:
    """The training and test sets as uint8 tensors; a part no requested split needs stays empty."""
    import torchvision

    root = Path(cfg.root)
    if source.debian_dir:
        unpack_debian_copy(source, root)
    cls = getattr(torchvision.datasets, source.class_name)
    parts = []
    class_names: list[str] = []
    for train, needed in ((True, "train" in splits or "val" in splits), (False, "test" in splits)):
        if not needed:
            parts.append(Split(torch.zeros(0, dtype=torch.long), torch.zeros(0, *source.shape, dtype=torch.uint8)))
            continue
        ds = _open_torchvision(cls, source, cfg, root, train)
        images = torch.as_tensor(ds.data)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # N, C, H, W
        parts.append(Split(torch.as_tensor(ds.targets, dtype=torch.long), images.contiguous()))
        class_names = list(ds.classes)
    return parts[0], parts[1], class_names


def _open_torchvision(cls: Any, source: TorchvisionSet, cfg: DataConfig, root: Path, train: bool) -> Any:
    try:
        return cls(str(root), train=train, download=False)
    except RuntimeError:
        pass
    if cfg.download:
        import socket

        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)
        try:
            with _quiet():
                return cls(str(root), train=train, download=True)
        except Exception:  # noqa: BLE001 - any network or mirror failure means the same thing to the user
            pass
        finally:
            socket.setdefaulttimeout(old)
    hint = f"install Debian's package with `sudo apt-get install {source.debian_package}`, or " if source.debian_package else ""
    raise DataError(
        f"Dataset '{cfg.dataset}' not found under '{root}' and it could not be downloaded"
        f"{'' if cfg.download else ' (data.download is false)'}. To get it: {hint}run once on a machine with "
        f"internet access (torchvision downloads it into {root}/{source.class_name}/), or point data.root at a folder that holds it."
    )


class _quiet:
    """Silence torchvision's download chatter, which would break --json output."""

    def __enter__(self) -> None:
        import contextlib
        import io

        self._ctx = contextlib.ExitStack()
        self._ctx.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._ctx.enter_context(contextlib.redirect_stderr(io.StringIO()))

    def __exit__(self, *exc: Any) -> None:
        self._ctx.close()


def unpack_debian_copy(source: TorchvisionSet, root: Path) -> None:
    """Decompress the Debian package's raw files into root/<Class>/raw/, where torchvision reads them."""
    src = Path(source.debian_dir)
    raw = root / source.class_name / "raw"
    gz_files = sorted(src.glob("*-ubyte.gz")) if src.is_dir() else []
    if not gz_files:
        return
    for gz in gz_files:
        target = raw / gz.name[: -len(".gz")]
        if target.exists():
            continue
        try:
            raw.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            with gzip.open(gz, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            os.replace(tmp, target)
        except OSError as e:
            raise DataError(f"Cannot unpack {gz} into {raw}: {e}. Make data.root writable or point it elsewhere.") from None


def _imagefolder_dirs(cfg: DataConfig) -> tuple[Path, Path | None]:
    base = Path(cfg.path or "")
    if not base.is_dir():
        raise DataError(f"data.path '{base}' is not a folder. For imagefolder, point it at a folder with one sub-folder of images per class.")
    if (base / "train").is_dir() and (base / "test").is_dir():
        return base / "train", base / "test"
    return base, None


def _class_dirs(folder: Path) -> list[str]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"'{folder}' must hold one sub-folder per class (at least 2); found {len(classes)}: {classes}.")
    return classes


def _scan(folder: Path, classes: list[str]) -> Split:
    files: list[Path] = []
    labels: list[int] = []
    for i, name in enumerate(classes):
        found = list_images(folder / name) if (folder / name).is_dir() else []
        if not found:
            raise DataError(f"Class folder '{folder / name}' has no images ({', '.join(IMAGE_EXTENSIONS)}).")
        files += found
        labels += [i] * len(found)
    return Split(torch.tensor(labels, dtype=torch.long), files=files)


def _load_imagefolder(cfg: DataConfig, gen: torch.Generator) -> tuple[Split, Split, list[str], tuple[int, int]]:
    train_dir, test_dir = _imagefolder_dirs(cfg)
    classes = _class_dirs(train_dir)
    train_all = _scan(train_dir, classes)
    if test_dir is not None:
        test = _scan(test_dir, classes)
    else:
        test_idx, train_idx = stratified_take(train_all.labels, max(1, round(cfg.test_split * len(train_all))), gen)
        test, train_all = train_all.subset(test_idx), train_all.subset(train_idx)
    if cfg.image_size:
        size = tuple(cfg.image_size)
    else:
        size = tuple(load_image(train_all.files[0], cfg.channels or 3).shape[1:])
    return train_all, test, classes, size  # type: ignore[return-value]


# ----------------------------------------------------------------------------- statistics
def channel_stats(split: Split, channels: int, size: Sequence[int], batch_size: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the split's pixels scaled to [0, 1]."""
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for x, _ in make_loader(split, batch_size, shuffle=False, seed=0, channels=channels, size=size, num_workers=0):
        x = x.double() / 255.0
        total += x.sum((0, 2, 3))
        total_sq += x.square().sum((0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / max(count, 1)
    std = (total_sq / max(count, 1) - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


# ----------------------------------------------------------------------------- loaders
class TensorLoader:
    """Batches of an in-memory uint8 tensor by indexing: no per-sample Python work."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
                 generator: torch.Generator | None, weights: torch.Tensor | None = None, device: Any = "cpu") -> None:
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.weights = weights

    def __len__(self) -> int:
        return math.ceil(self.labels.numel() / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.labels.numel()
        if self.weights is not None:
            order = torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        elif self.shuffle:
            order = torch.randperm(n, generator=self.generator)
        else:
            order = None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield self.images[start : start + self.batch_size], self.labels[start : start + self.batch_size]
            else:
                idx = order[start : start + self.batch_size].to(self.labels.device)
                yield self.images[idx], self.labels[idx]


class _FileDataset(torch.utils.data.Dataset):
    """Decodes one file to uint8 (C, H, W); a file that fails gets label -1 - index, reported by the loader."""

    def __init__(self, files: list[Path], labels: torch.Tensor, channels: int, size: Sequence[int]) -> None:
        self.files, self.labels, self.channels, self.size = files, labels, channels, tuple(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return load_resized(self.files[i], self.channels, self.size), self.labels[i]
        except DataError:
            return torch.zeros(self.channels, *self.size, dtype=torch.uint8), torch.tensor(-1 - i)


class FileLoader:
    def __init__(self, split: Split, loader: Any) -> None:
        self.split, self.loader = split, loader

    @property
    def generator(self) -> torch.Generator:
        """The shuffling/sampling generator, whose state a resumed run restores."""
        return self.loader.generator

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            bad = (y < 0).nonzero().flatten()
            if bad.numel():
                names = ", ".join(str(self.split.files[-1 - int(y[b])]) for b in bad[:5])
                raise DataError(f"Cannot read image(s): {names}. Remove or replace the corrupt file(s) and run again.")
            yield x, y


def make_loader(split: Split, batch_size: int, shuffle: bool, seed: int, channels: int, size: Sequence[int],
                balanced: bool = False, device: Any = "cpu", num_workers: int | None = None) -> TensorLoader | FileLoader:
    gen = torch.Generator().manual_seed(seed)
    weights = None
    if balanced:
        counts = torch.bincount(split.labels).double().clamp_min(1)
        weights = (1.0 / counts)[split.labels]
    if split.images is not None:
        return TensorLoader(split.images, split.labels, batch_size, shuffle, gen, weights, device)
    from torch.utils.data import DataLoader, WeightedRandomSampler

    workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
    sampler = WeightedRandomSampler(weights, len(split), replacement=True, generator=gen) if weights is not None else None
    loader = DataLoader(
        _FileDataset(split.files or [], split.labels, channels, size),
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=gen,
        num_workers=workers,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=workers > 0,
    )
    return FileLoader(split, loader)


class BatchPreprocess:
    """uint8 batch -> normalised float batch (with augmentation in training), on the batch's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: AugmentConfig | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) if mean else None
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) if std else None
        self.augment = augment
        self.generator = generator

    def __call__(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        x = x.float().div_(255.0)
        if train and self.augment is not None:
            x = augment_batch(x, self.augment, self.generator)
        if self.mean is not None:
            if self.mean.device != x.device:
                self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
            x = (x - self.mean) / self.std
        return x


def augment_batch(x: torch.Tensor, aug: AugmentConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Random crop with zero padding, horizontal flip and rotation, for a whole float batch at once."""
    b, c, h, w = x.shape

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(x.device)

    if aug.random_crop_padding:
        p = aug.random_crop_padding
        padded = F.pad(x, (p, p, p, p))
        dy = (rand(b) * (2 * p + 1)).long().clamp_max(2 * p)
        dx = (rand(b) * (2 * p + 1)).long().clamp_max(2 * p)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # b, h, 1
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # b, 1, w
        bidx = torch.arange(b, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 3, 1, 2).contiguous()
    if aug.horizontal_flip:
        flip = (rand(b) < 0.5).view(b, 1, 1, 1)
        x = torch.where(flip, x.flip(3), x)
    if aug.rotation:
        angle = (rand(b) * 2 - 1) * math.radians(aug.rotation)
        cos, sin = angle.cos(), angle.sin()
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x
