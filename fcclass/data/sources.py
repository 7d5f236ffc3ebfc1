"""Where images come from: torchvision's in-memory sets (with Debian's Fashion-MNIST copy) and image folders.

A source yields *pools*: the images a split may be drawn from ("train", "test", and "val" for an image folder that
has a val/ folder), each with its labels and either a uint8 tensor of images or the files to decode."""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from fcclass.config.registries import DATASETS, ShardSet, TorchvisionSet
from fcclass.config.sections import DataConfig
from fcclass.data.images import list_images
from fcclass.data.splits import Split
from fcclass.errors import DataError

SPLIT_FOLDERS = ("train", "val", "test")


Pool = Split  # what a split is drawn from: labels plus uint8 images or the files to decode (absolute paths)


@dataclass
class Source:
    kind: str  # "tensors" (torchvision) or "files" (imagefolder)
    root: Path  # data.root for torchvision sets; the image folder for imagefolder (absolute)
    class_names: list[str]
    pools: dict[str, Pool] = field(default_factory=dict)
    shape: tuple[int, int, int] | None = None  # C, H, W of torchvision sets
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. a dataset was unpacked)
    pool_dirs: dict[str, Path] = field(default_factory=dict)  # the folder naming each pool's decode cache (default: root/<pool>)
    version: str | None = None  # a packed dataset's version id
    names: dict[Path, str] = field(default_factory=dict)  # a packed image's file in the shard cache -> its name in the source


def data_root(cfg: DataConfig) -> Path:
    """The folder a run's data lives in, absolute: data.path for imagefolder, data.root otherwise."""
    return Path(getattr(cfg, cfg.location_key)).expanduser().absolute()


def open_source(cfg: DataConfig, pools: Sequence[str] = ("train", "test"), fetch: bool = True, progress: Any = None) -> Source:
    """Read the dataset's pools; a pool not asked for stays out (the test set is not read for training, etc.).
    ``fetch``: a torchvision set missing from data.root may be unpacked from Debian's copy or downloaded there;
    False (a folder the user named with --data-root) only reads what is there. A packed dataset (shards) fetches the
    shards its version lacks in the local cache (``progress`` shows it)."""
    spec = DATASETS[cfg.dataset]
    if isinstance(spec, TorchvisionSet):
        if not fetch:
            cfg = cfg.model_copy(update={"download": False})
        return _torchvision_source(spec, cfg, pools, fetch)
    if isinstance(spec, ShardSet):
        from fcclass.data.shards.source import shards_source

        got = shards_source(cfg, progress)
        return Source("files", got["root"], got["labels"], {k: Pool(labels, files=files) for k, (labels, files) in got["pools"].items()},
                      shape=got["shape"], notes=got["notes"], pool_dirs=got["pool_dirs"], version=got["version"], names=got["names"])
    return imagefolder_source(data_root(cfg))


# ----------------------------------------------------------------------------- torchvision sets
def _torchvision_source(spec: TorchvisionSet, cfg: DataConfig, pools: Sequence[str], fetch: bool = True) -> Source:
    import torchvision

    root = data_root(cfg)
    if not fetch and not (root / spec.class_name / "raw").is_dir():
        raise DataError(f"'{root}' (given with --data-root) holds no {cfg.dataset} files: there is no {root / spec.class_name / 'raw'}. "
                        f"Give --data-root the folder that contains {spec.class_name}/ (the run's data.root).")
    unpacked = unpack_debian_copy(spec, root) if spec.debian_dir and fetch else 0
    cls = getattr(torchvision.datasets, spec.class_name)
    source = Source("tensors", root, [], shape=spec.shape)
    if unpacked:
        source.notes.append(f"Unpacked Debian's {cfg.dataset} files ({spec.debian_dir}) into {root / spec.class_name / 'raw'} "
                            f"({unpacked / 1e6:.0f} MB), where torchvision reads them; runs with the same data.root reuse them.")
    for name in ("train", "test"):
        if name not in pools:
            continue
        ds = _open_torchvision(cls, spec, cfg, root, train=name == "train")
        images = torch.as_tensor(ds.data)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # N, C, H, W
        source.pools[name] = Pool(torch.as_tensor(ds.targets, dtype=torch.long), images.contiguous())
        source.class_names = list(ds.classes)
    if not source.class_names:  # no pool asked for: the names still come from the dataset
        source.class_names = list(_open_torchvision(cls, spec, cfg, root, train=False).classes)
    return source


def _open_torchvision(cls: Any, spec: TorchvisionSet, cfg: DataConfig, root: Path, train: bool) -> Any:
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
    hint = f"install Debian's package with `sudo apt-get install {spec.debian_package}`, or " if spec.debian_package else ""
    raise DataError(
        f"Dataset '{cfg.dataset}' not found under '{root}' and it could not be downloaded"
        f"{'' if cfg.download else ' (data.download is false)'}. To get it: {hint}run once on a machine with "
        f"internet access (torchvision downloads it into {root}/{spec.class_name}/), or point data.root at a folder that holds it."
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


def unpack_debian_copy(spec: TorchvisionSet, root: Path) -> int:
    """Decompress the Debian package's raw files into root/<Class>/raw/, where torchvision reads them; returns the
    bytes written (0 when they were there already)."""
    src = Path(spec.debian_dir or "")
    raw = Path(root) / spec.class_name / "raw"
    gz_files = sorted(src.glob("*-ubyte.gz")) if spec.debian_dir and src.is_dir() else []
    written = 0
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
            written += target.stat().st_size
        except OSError as e:
            raise DataError(f"Cannot unpack {gz} into {raw}: {e}. Make data.root writable or point it elsewhere.") from None
    return written


# ----------------------------------------------------------------------------- image folders
LAYOUTS = (
    "Expected one of two layouts:\n"
    "  {root}/<label>/<image files>                   (fcclass holds data.test_split out for testing), or\n"
    "  {root}/train/<label>/...  and  {root}/test/<label>/...  (and optionally {root}/val/<label>/...),\n"
    "      with the same label folders in each."
)


def _subfolders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def imagefolder_layout(root: Path) -> dict[str, Path]:
    """{"train": folder, "test": folder?, "val": folder?} of an image folder, or a DataError describing what was
    found against what is expected."""
    if not root.is_dir():
        raise DataError(f"data.path '{root}' is not a folder. For imagefolder, point it at a folder with one sub-folder of images per label.")
    found = _subfolders(root)
    split_dirs = [name for name in SPLIT_FOLDERS if name in found]
    if not split_dirs:
        return {"train": root}
    others = [name for name in found if name not in SPLIT_FOLDERS]
    layout = LAYOUTS.format(root=root)
    if others:
        raise DataError(f"'{root}' mixes split folders ({_dirs(split_dirs)}) with other folders ({_dirs(others[:5])}). {layout}")
    if "train" not in split_dirs or "test" not in split_dirs:
        missing = "test" if "train" in split_dirs else "train"
        raise DataError(f"'{root}' has {_dirs(split_dirs)} but no {missing}/ folder. {layout}")
    return {name: root / name for name in split_dirs}


def _dirs(names: list[str]) -> str:
    return ", ".join(f"{n}/" for n in names)


def _class_names(train_dir: Path, root: Path) -> list[str]:
    classes = _subfolders(train_dir)
    if len(classes) < 2:
        raise DataError(f"'{train_dir}' must hold one sub-folder per label (at least 2); found {len(classes)}: {classes}. "
                        + LAYOUTS.format(root=root))
    return classes


def imagefolder_source(root: Path) -> Source:
    layout = imagefolder_layout(root)
    classes = _class_names(layout["train"], root)
    source = Source("files", root, classes)
    for split, folder in layout.items():
        here = _subfolders(folder)
        if split != "train" and here != classes:
            missing, extra = sorted(set(classes) - set(here)), sorted(set(here) - set(classes))
            raise DataError(
                f"The label folders of '{folder}' differ from those of '{layout['train']}': "
                + "; ".join(part for part in (f"missing {missing}" if missing else "", f"extra {extra}" if extra else "") if part)
                + f". Every split folder needs the same labels ({', '.join(classes)}); add or remove folders so they match."
            )
        source.pools[split] = _scan(folder, classes)
    return source


def _check_distinct(folder: Path, classes: list[str]) -> None:
    """Two label folders that are one folder (a symlink to another label's folder, or into it) would give the same
    images two labels: refused, naming the link."""
    real = {name: (folder / name).resolve() for name in classes}
    for a in classes:
        for b in classes:
            if a != b and (real[a] == real[b] or real[b] in real[a].parents):
                link = a if (folder / a).is_symlink() else b
                same = "the same folder" if real[a] == real[b] else f"inside '{folder / b}'"
                raise DataError(f"Label folders '{folder / a}' and '{folder / b}' hold the same images: '{folder / a}' is {same} "
                                f"(through the symlink '{folder / link}' -> {real[link]}), so its images would get two labels. "
                                "Remove the symlink, or copy the images that really belong to both labels.")


def _scan(folder: Path, classes: list[str]) -> Pool:
    _check_distinct(folder, classes)
    files: list[Path] = []
    labels: list[int] = []
    empty = []
    for i, name in enumerate(classes):
        found = list_images(folder / name)
        if not found:
            empty.append(name)
        files += found
        labels += [i] * len(found)
    if empty:
        from fcclass.data.images import IMAGE_EXTENSIONS

        raise DataError(f"Label folder(s) {', '.join(str(folder / n) for n in empty)} have no images ({', '.join(IMAGE_EXTENSIONS)}); "
                        "add images or remove the folder.")
    return Pool(torch.tensor(labels, dtype=torch.long), files=files)
