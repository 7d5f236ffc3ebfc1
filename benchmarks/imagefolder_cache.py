"""Does the decode cache make an image folder train as fast as in-memory images? Trains the shipped `imagefolder`
config (64x64 RGB, 3 conv layers) on a folder of JPEGs in four ways and prints the training images/s of each epoch:

  (a) streaming    data.cache: off — every epoch decodes and resizes every file in DataLoader workers
  (b) first cached data.cache: auto with an empty cache folder — decodes once into the cache (build time printed
                   apart), then trains from the memory-mapped file
  (c) second cached the same cache folder again — nothing decoded
  (d) in memory    the same pixels copied into one uint8 tensor in RAM (what Fashion-MNIST trains from)

The goal is (c) within 15 % of (d). Without --folder, a folder of --images JPEGs in 10 classes is generated once
under data/ (from Fashion-MNIST when it is installed, else from random patterns) and reused by later runs.

    .venv/bin/python benchmarks/imagefolder_cache.py                   (nothing else running; 20,000 images, 3 epochs)
    .venv/bin/python benchmarks/imagefolder_cache.py --images 500 --epochs 1 --threads 1      (a smoke test)

The page cache is warm for (b) to (d): the file was just written. A second run after a reboot reads it from disk once.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # time this checkout's fcclass, whichever one the interpreter has installed


def make_folder(folder: Path, n: int, side: int) -> Path:
    """``n`` JPEGs of side x side in 10 class folders (reused when it is there, complete)."""
    from PIL import Image

    if folder.is_dir() and sum(1 for _ in folder.rglob("*.jpg")) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    images, labels = _source_images(n)
    for k in range(10):
        (folder / f"class{k}").mkdir(parents=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        pil = Image.fromarray(img).convert("RGB").resize((side, side), Image.BILINEAR)
        pil.save(folder / f"class{label}" / f"{i:06d}.jpg", quality=90)
    return folder


def _source_images(n: int) -> tuple[np.ndarray, list[int]]:
    """Fashion-MNIST training images (28x28 gray) when installed, else random stripes whose angle is the class."""
    try:
        from fcclass.config.sections import DataConfig
        from fcclass.data import load_dataset

        train = load_dataset(DataConfig(root=str(REPO / "data"), download=False, limit_train=n, val_split=0.0), 0, ("train",)).train
        assert train is not None and len(train) == n
        return train.images[:, 0].numpy(), train.labels.tolist()
    except Exception:  # noqa: BLE001 - any reason it is missing: fall back to synthetic images
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:28, 0:28]
        labels = [i % 10 for i in range(n)]
        images = [np.clip(127 + 100 * np.sin((xx * np.cos(k * 0.314) + yy * np.sin(k * 0.314)) * 0.6 + rng.uniform(0, 6))
                          + rng.normal(0, 20, (28, 28)), 0, 255).astype(np.uint8) for k in labels]
        return np.stack(images), labels


class EpochRates:
    """Training images/s of each epoch, from the trainer's own batch timings (validation left out)."""

    def __init__(self) -> None:
        self.last: dict[int, Any] = {}

    def on_batch_end(self, trainer: Any, info: Any) -> None:
        self.last[info.epoch] = info

    def rates(self) -> list[float]:
        return [info.images / info.seconds for _, info in sorted(self.last.items())]


def train(folder: Path, cache: str, cache_dir: Path, args: argparse.Namespace, runs: Path) -> tuple[list[float], float]:
    """One training run; returns (images/s per epoch, seconds spent building the cache)."""
    import fcclass.data.cache as cache_module
    from fcclass.config.load import load_config
    from fcclass.training.callbacks import Callback
    from fcclass.training.fit import fit

    built = [0.0]
    real_build = cache_module._build

    def timed_build(*a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return real_build(*a, **k)
        finally:
            built[0] += time.perf_counter() - start

    rates = EpochRates()
    observer = type("Rates", (Callback,), {"on_batch_end": rates.on_batch_end})()
    cfg = load_config("imagefolder", [f"data.path={folder}", f"data.cache={cache}", f"data.cache_dir={cache_dir}",
                                      f"data.image_size=[{args.size},{args.size}]", f"train.epochs={args.epochs}",
                                      "train.early_stopping.patience=null", "train.test_at_end=false", f"train.device={args.device}",
                                      f"train.threads={args.threads}", f"train.runs_dir={runs}"])
    cache_module._build = timed_build
    try:
        fit(cfg, callbacks=[observer])
    finally:
        cache_module._build = real_build
    return rates.rates(), built[0]


def in_memory(folder: Path, cache_dir: Path, args: argparse.Namespace, runs: Path) -> list[float]:
    """(d): the cached pixels of each split copied into a tensor of its own in RAM, as an in-memory dataset is."""
    import fcclass.data as data

    real = data._use_cache

    def into_ram(cfg: Any, root: Any, pools: Any, wanted: Any, parts: Any, *rest: Any) -> list[str]:
        notes = real(cfg, root, pools, wanted, parts, *rest)
        for part in parts.values():
            if part.rows is not None:
                part.images, part.rows = part.take(slice(None)).clone(), None
        return notes

    data._use_cache = into_ram
    try:
        return train(folder, "auto", cache_dir, args, runs)[0]
    finally:
        data._use_cache = real


def show(name: str, rates: list[float], extra: str = "") -> None:
    per_epoch = ", ".join(f"{r:,.0f}" for r in rates)
    print(f"{name:<15} median {statistics.median(rates):>8,.0f} images/s   (epochs: {per_epoch}){extra}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, help="an image folder to use (default: generate one under data/)")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=64, help="image side, of the files and of data.image_size")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="times to alternate (c) and (d)")
    args = parser.parse_args()
    folder = args.folder or make_folder(REPO / "data" / f"imagefolder-bench-{args.images}-{args.size}", args.images, args.size)
    print(f"{folder}: {sum(1 for _ in folder.rglob('*.*')):,} files; {args.epochs} epochs, {args.threads} threads, {args.device}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir, runs = Path(tmp) / "cache", Path(tmp) / "runs"
        show("(a) streaming", train(folder, "off", cache_dir, args, runs)[0])
        rates, built = train(folder, "auto", cache_dir, args, runs)
        show("(b) 1st cached", rates, f"   + {built:.1f} s building the cache")
        for _ in range(args.repeats):
            rates, built = train(folder, "auto", cache_dir, args, runs)
            show("(c) 2nd cached", rates, "" if built == 0 else f"   ! rebuilt ({built:.1f} s)")
            show("(d) in memory", in_memory(folder, cache_dir, args, runs))


if __name__ == "__main__":
    main()
