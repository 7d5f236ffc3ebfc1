"""`fcclass data pack`: an image folder or a built-in dataset, packed into content-named shards and a new version.

Images are stored as their encoded bytes (an image folder's files as they are; a built-in set's images as PNG), so
size, channels, crops, rotation and normalisation stay training-time settings. Only images the newest version does
not hold yet are written, into new shards (WebDataset tars, written with its TarWriter at a fixed mtime, so the same
images give the same bytes and the same name); the manifest comes last. Packing the same images again writes nothing
and returns the same version; an interrupted pack leaves no version behind, and packing again skips the shards it
had written."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from fcclass.data.shards.manifest import FIXED_MTIME, IMAGE_HASH_HEX, MARKER, Image, Manifest, Shard, check_marker, marker
from fcclass.data.shards.store import FolderStore, S3Store, open_store
from fcclass.data.shards.versions import newest, read_versions
from fcclass.errors import DataError

TAR_BLOCK = 512


@dataclass
class Item:
    """One source image: where it goes and how to read its encoded bytes."""

    split: str
    label: int
    name: str
    ext: str
    read: Callable[[], bytes]
    hash: str = ""


@dataclass
class PackResult:
    version: str
    images: int
    shards: int
    bytes_written: int
    bytes_total: int
    new_images: int
    reused: bool  # the version existed already (nothing written, unless shards of it were missing: written again)
    parent: str | None
    dest: str
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "images": self.images, "shards": self.shards, "bytes_written": self.bytes_written,
                "bytes_total": self.bytes_total, "new_images": self.new_images, "existed": self.reused, "parent": self.parent,
                "dest": self.dest}


def source_items(source: str, data_root: str = "data", skip_unreadable: bool = False, notes: list[str] | None = None
                 ) -> tuple[list[str], list[Item], str]:
    """(labels, images, what the source is) of an image folder or a built-in dataset name. Files that cannot be read
    as images are an error naming each (or, with ``skip_unreadable``, left out and told in ``notes``)."""
    from fcclass.config.registries import DATASETS, TorchvisionSet

    spec = DATASETS.get(source)
    if isinstance(spec, TorchvisionSet):
        return _builtin_items(source, data_root)
    path = Path(source).expanduser().absolute()
    if not path.exists():
        known = ", ".join(k for k, v in DATASETS.items() if isinstance(v, TorchvisionSet))
        raise DataError(f"'{source}' is neither a folder nor a built-in dataset ({known}). Give an image folder "
                        "(one sub-folder per label, or train/ and test/ with one per label) or a dataset name.")
    from fcclass.data.sources import imagefolder_source

    src = imagefolder_source(path)
    bad = _unreadable_files(src, skip_unreadable, notes)
    items = []
    for split, pool in src.pools.items():
        for f, label in zip(pool.files or [], pool.labels.tolist()):
            if f in bad:
                continue
            ext = f.suffix.lower().lstrip(".") or "img"
            items.append(Item(split, int(label), f.relative_to(path).as_posix(), ext, _reader(f)))
    return list(src.class_names), items, str(path)


def _unreadable_files(src: Any, skip: bool, notes: list[str] | None) -> set[Path]:
    """The folder's files whose headers cannot be read as images (on threads): an error naming them, or with
    ``skip`` the set to leave out (told in ``notes``)."""
    from fcclass.data.images import describe_bad_files, unreadable, unreadable_error

    files = [f for pool in src.pools.values() for f in pool.files or []]
    bad = unreadable(files)
    if bad and not skip:
        raise unreadable_error(bad, of=len(files), hint=", or pack with --skip-unreadable to leave them out")
    if bad and notes is not None:
        notes.append(f"Left out {len(bad)} file(s) that cannot be read as images (--skip-unreadable): {describe_bad_files(bad, shown=5)}.")
    return {f for f, _ in bad}


def check_not_inside(source: Path, store: Any) -> None:
    """A folder place inside the source folder would be packed into itself by the next pack."""
    root = getattr(store, "root", None)
    if root is not None and (root == source or source in root.parents):
        raise DataError(f"--out '{root}' is inside the folder being packed ('{source}'): the next pack would read the shards as "
                        "images. Give a place outside it.")


def _reader(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return path.read_bytes()
        except OSError as e:
            raise DataError(f"Cannot read '{path}' while packing: {e.strerror or e}. Fix or remove the file and pack again.") from None
    return read


def _builtin_items(name: str, data_root: str) -> tuple[list[str], list[Item], str]:
    from fcclass.config.sections import DataConfig
    from fcclass.data.sources import open_source

    src = open_source(DataConfig(dataset=name, root=data_root))
    items = []
    for split, pool in src.pools.items():
        images = pool.images
        assert images is not None
        for i, label in enumerate(pool.labels.tolist()):
            items.append(Item(split, int(label), f"{name}:{split}[{i}]", "png", _png(images, i)))
    return list(src.class_names), items, name


def _png(images: Any, i: int) -> Callable[[], bytes]:
    def encode() -> bytes:
        from PIL import Image as PILImage

        x = images[i].numpy()
        img = PILImage.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0))
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=6)
        return buf.getvalue()
    return encode


def _tar_bytes(n: int) -> int:
    return TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK


def _groups(items: list[Item], sizes: dict[str, int], shard_bytes: float) -> Iterator[list[Item]]:
    group: list[Item] = []
    size = 0
    for item in items:
        if group and size + _tar_bytes(sizes[item.hash]) > shard_bytes:
            yield group
            group, size = [], 0
        group.append(item)
        size += _tar_bytes(sizes[item.hash])
    if group:
        yield group


def _write_tar(group: list[Item]) -> bytes:
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, user="", group="", mode=0o444, encoder=False, mtime=FIXED_MTIME) as sink:
        for item in group:
            sink.write({"__key__": item.hash, item.ext: item.read()})
    return buf.getvalue()


def prepare_place(store: FolderStore | S3Store) -> None:
    """A new packed dataset's marker, or a check that the place already is one; a place that holds anything else is
    refused (nothing is written there)."""
    store.check_place()
    if store.size(MARKER) is not None:
        check_marker(store.read(MARKER, limit=1 << 16), store.where(MARKER))
        return
    found = store.list()
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise DataError(f"'{store.url}' holds {len(found):,} file(s) that are not an fcclass packed dataset ({shown}). Pack into "
                        "an empty or new folder (or bucket prefix), or into a place an earlier `fcclass data pack` wrote.")
    store.write(MARKER, marker())


def pack(source: str, dest: str, shard_mb: float = 64.0, data_root: str = "data", progress: Any = None,
         skip_unreadable: bool = False) -> PackResult:
    """Pack ``source`` into ``dest`` as a new version (or the existing one, when it holds exactly these images)."""
    if not shard_mb > 0:
        raise DataError(f"--shard-mb must be more than 0 (got {shard_mb:g}); e.g. 64, or 0.25 for small test sets.")
    store = open_store(dest)
    if Path(source).expanduser().is_dir():
        check_not_inside(Path(os.path.abspath(Path(source).expanduser())), store)
    notes: list[str] = []
    labels, items, what = source_items(source, data_root, skip_unreadable, notes)
    prepare_place(store)
    parent = newest(read_versions(store))
    sizes = _hash_all(items, progress)
    known = _intact(store, parent) if parent is not None and parent.labels == labels else {}
    new: dict[str, Item] = {}
    for item in items:
        if item.hash not in known and item.hash not in new:
            new[item.hash] = item
    shards, where = _kept(parent, known, items)
    written = _write_new(store, list(new.values()), sizes, shard_mb * 1e6, shards, where, progress)
    images = [Image(i.split, i.label, i.hash, where[i.hash][0], where[i.hash][1], i.name) for i in items]
    first = next((i for i in items if i.split == "train"), None)
    m = Manifest(labels, shards, images, datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                 parent.id if parent is not None else None, what, _first_shape(first))
    existed = store.size(m.key) is not None
    if existed:  # the same images: the version that holds them, as it was recorded (missing shards written again)
        from fcclass.data.shards.versions import read_version

        m = read_version(store, m.id)
        new = {} if written == 0 else new
    else:
        data = m.to_json()
        store.write(m.key, data)
        written += len(data)
    return PackResult(m.id, len(images), len(shards), written, m.nbytes, len(new), existed, m.parent, store.url, notes)


def _kept(parent: Manifest | None, known: dict[str, Image], items: list[Item]) -> tuple[list[Shard], dict[str, tuple[int, str]]]:
    """The parent's shards that hold some of ``items`` (in their order there), and where each image they hold is:
    {image hash: (shard index in the new version, extension)}."""
    if parent is None or not known:
        return [], {}
    used = sorted({known[i.hash].shard for i in items if i.hash in known})
    index = {old: k for k, old in enumerate(used)}
    return [parent.shards[old] for old in used], {h: (index[img.shard], img.ext) for h, img in known.items() if img.shard in index}


def _intact(store: FolderStore | S3Store, parent: Manifest) -> dict[str, Image]:
    """The parent's images whose shard is still there at its size: a missing or truncated shard's images are packed
    again (how a removed bad shard is repaired)."""
    whole = {k for k, shard in enumerate(parent.shards) if store.size(shard.file) == shard.bytes}
    return {i.hash: i for i in parent.images if i.shard in whole}


def _hash_all(items: list[Item], progress: Any) -> dict[str, int]:
    """Read and hash every image (on threads); {hash: encoded size}."""
    from concurrent.futures import ThreadPoolExecutor

    from fcclass.data.images import decode_threads

    def one(item: Item) -> int:
        data = item.read()
        item.hash = hashlib.sha256(data).hexdigest()[:IMAGE_HASH_HEX]
        return len(data)

    if progress is not None:
        progress.start(len(items), "Reading and hashing the images")
    sizes = {}
    try:
        with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
            for k, (item, n) in enumerate(zip(items, pool.map(one, items)), 1):
                sizes[item.hash] = n
                if progress is not None and (k % 256 == 0 or k == len(items)):
                    progress.advance(k)
    finally:
        if progress is not None:
            progress.end()
    return sizes


def _write_new(store: FolderStore | S3Store, new: list[Item], sizes: dict[str, int], shard_bytes: float, shards: list[Shard],
               where: dict[str, tuple[int, str]], progress: Any) -> int:
    """Pack the ``new`` images into shards appended to ``shards``; a shard already in the store (an interrupted pack
    wrote it) is not written again. Returns the bytes written."""
    written = 0
    if progress is not None and new:
        progress.start(len(new), f"Packing {len(new):,} new image(s) into shards")
    done = 0
    try:
        for group in _groups(new, sizes, shard_bytes):
            data = _write_tar(group)
            sha = hashlib.sha256(data).hexdigest()
            shard = Shard(f"shards/{sha}.tar", len(data), sha)
            if store.size(shard.file) != len(data):
                store.write(shard.file, data)
                written += len(data)
            for item in group:
                where[item.hash] = (len(shards), item.ext)
            shards.append(shard)
            done += len(group)
            if progress is not None:
                progress.advance(done)
    finally:
        if progress is not None and new:
            progress.end()
    return written


def _first_shape(item: Item | None) -> list[int]:
    """[channels, height, width] of the first training image (grayscale modes: 1 channel, others 3): the shape a
    run trains at unless data.channels / data.image_size say otherwise."""
    if item is None:
        return []
    try:
        from PIL import Image as PILImage

        with PILImage.open(io.BytesIO(item.read())) as img:
            return [1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3, int(img.size[1]), int(img.size[0])]
    except Exception:  # noqa: BLE001 - an unreadable first image: training names it; the shape is only a default
        return []
