"""Image folders decoded once: the decoded, resized uint8 images of a *pool* (every image of an image folder's
train/, val/ or test/ part, in the pool's sorted order) kept in one memory-mapped file in a cache folder, and read
by every later epoch, run, sweep trial, resume and evaluation of those files at that size.

A split is row indices into its pool (``Split.rows``), so runs with other seeds (other train/val draws of the same
folder) share one cache. The file is keyed by the pool's folder, every file's path, size and mtime, the image size,
the channels and the format: a file added, removed or modified gives another key, hence a rebuild (and the stale
file of that folder is removed). A file changed in place with its size and mtime restored keeps the key, so the
content hash of every file a run reads (which its splits.json records anyway) is checked against the hash the cache
decoded; a difference rebuilds too. The file's layout and checks: fcclass.data.cache_file.

Files that cannot be decoded are kept as zeros, never served: a run that reads such a row stops with
data.on_unreadable: error, or leaves it out with skip. A build writes a temp file and renames it
(files.atomic_write_chunks) under an flock on a lock file beside it: of two processes building one cache (two DDP
ranks, parallel sweep workers), one builds, the other waits and reuses it. A lock path that is not a regular file
(a FIFO) is never opened for reading: the pool streams, with a note.

When a pool cannot be cached, its splits stream from the files (loaders.FileLoader) as before, with a note saying
why: over data.cache_max_gb or the free disk space, a cache folder that cannot be written or a full disk, or a run
that reads under MIN_SHARE of the pool (a limit_train quick run, the eval of a small test split: decoding those
files costs less than decoding the whole pool), when no cache of it exists yet. data.cache: off streams silently."""

from __future__ import annotations

import errno
import fcntl
import math
import os
import re
import shutil
import stat
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch

from fcclass.data.cache_file import CHUNK, Cached, Entry, header, open_cached, pool_entry, trailer
from fcclass.data.images import decode_threads, load_resized, unreadable_error
from fcclass.data.splits import Facts, file_digest, file_facts
from fcclass.errors import DataError
from fcclass.files import atomic_write_chunks, os_error_reason, shown
from fcclass.memory import human

MIN_SHARE = 0.5  # a run that reads less of a pool than this streams its files rather than build the pool's cache
DISK_RESERVE = 1 << 30  # free space a new cache must leave on its disk


class Progress(Protocol):
    """What a build reports (fcclass.callbacks.DecodeProgress draws it with Rich); ``end`` comes even after a failure."""

    def start(self, total: int, what: str) -> None: ...

    def advance(self, done: int) -> None: ...

    def end(self) -> None: ...


def cache_folder(configured: str | None) -> Path:
    """data.cache_dir, else $FCCLASS_CACHE_DIR, else $XDG_CACHE_HOME/fcclass, else ~/.cache/fcclass (a relative
    XDG_CACHE_HOME is ignored, as the XDG spec says)."""
    chosen = configured or os.environ.get("FCCLASS_CACHE_DIR")
    if chosen:
        return Path(chosen).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "fcclass"


# ----------------------------------------------------------------------------- building
def _decoded(files: Sequence[Path], channels: int, size: Sequence[int], bad: list[tuple[int, str]], digests: list[str],
             progress: Progress | None) -> Iterator[bytes]:
    """The pool's images through load_resized (its bomb guard and errors included), in order, CHUNK at a time as
    bytes; on threads (Pillow and torch release the GIL), a bounded window ahead so memory stays flat. A file that
    fails is recorded in ``bad`` (position, why) and left as zeros. ``digests`` gets each file's content hash, read
    before it is decoded (a file changed in between fails the next run's check, which rebuilds)."""
    blank = torch.zeros(channels, *size, dtype=torch.uint8)

    def one(i: int) -> torch.Tensor:
        try:
            digests[i] = file_digest(files[i])
        except OSError:
            pass  # load_resized says why
        try:
            return load_resized(files[i], channels, size)
        except DataError as e:
            bad.append((i, str(e).removeprefix(f"{files[i]}: ")))
            return blank

    threads = decode_threads()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        ahead = deque(pool.submit(one, i) for i in range(min(len(files), 4 * threads)))
        batch: list[torch.Tensor] = []
        done = 0
        while ahead:
            batch.append(ahead.popleft().result())
            if done + len(batch) + len(ahead) < len(files):
                ahead.append(pool.submit(one, done + len(batch) + len(ahead)))
            if len(batch) == CHUNK or not ahead:
                yield torch.stack(batch).numpy().tobytes()
                done += len(batch)
                batch = []
                if progress is not None:
                    progress.advance(done)


def _build(entry: Entry, files: Sequence[Path], channels: int, size: Sequence[int], progress: Progress | None) -> None:
    """Decode the pool into its cache file (atomically), the files that cannot be decoded as zero rows listed in the
    trailer. Raises OSError when the file cannot be written (a full disk...)."""
    bad: list[tuple[int, str]] = []
    digests = [""] * len(files)
    crcs: list[int] = []

    def chunks() -> Iterator[bytes]:
        yield header(entry)
        for chunk in _decoded(files, channels, size, bad, digests, progress):
            crcs.append(zlib.crc32(chunk))
            yield chunk
        yield trailer(bad, digests, crcs)

    if progress is not None:
        progress.start(len(files), f"Decoding {entry.pool_dir.name} into the image cache")
    try:
        atomic_write_chunks(entry.path, chunks())
    finally:
        if progress is not None:
            progress.end()


class NotRegularError(OSError):
    """A path the cache owns (its file, its lock file) holds something else: a folder, a FIFO, a device."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.EINVAL, "not a regular file", str(path))
        self.path = path


@contextmanager
def _locked(entry: Entry) -> Iterator[bool]:
    """Hold the cache's lock file (released when the process ends, kill -9 included); yields whether another process
    held it first. A file system without flock gets no lock: the atomic rename still keeps the file whole."""
    try:
        fd = os.open(entry.lock_path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        if e.errno in (errno.EISDIR, errno.ELOOP):  # a folder, a link
            raise NotRegularError(entry.lock_path) from e
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO planted there would block a plain open
            raise NotRegularError(entry.lock_path)
        waited = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield waited
    finally:
        os.close(fd)


def _remove_stale(entry: Entry) -> bool:
    """Remove what an interrupted build left (temp files) and this folder's older caches (files changed since);
    a process still reading one keeps its mapping. Returns whether an older cache was removed. Under the lock."""
    slot = re.sub(r"([*?\[])", r"[\1]", entry.slot)  # a literal in a glob pattern
    old = [p for p in entry.path.parent.glob(f"{slot}-*.u8") if p != entry.path]
    for path in [*old, *entry.path.parent.glob(f".{slot}-*.u8.*.tmp")]:
        try:
            path.unlink(missing_ok=True)
        except OSError:  # another user's file in a shared folder: left alone
            pass
    return bool(old)


# ----------------------------------------------------------------------------- deciding
def cached_pools(cfg: Any, root: Path, pools: dict[str, Sequence[Path]], wanted: dict[str, tuple[str, torch.Tensor]],
                 channels: int, size: Sequence[int], progress: Progress | None = None, facts: dict[Path, Facts] | None = None,
                 pool_dirs: dict[str, Path] | None = None) -> tuple[dict[str, torch.Tensor], list[str], dict[str, dict[int, str]]]:
    """The memory-mapped images of each pool (image files under ``root``) that the ``wanted`` splits ({split: (pool,
    rows)}) read, reused or built as ``cfg`` (a DataConfig) says; a pool left out streams from its files, and the
    notes say why. Files the run reads that cannot be decoded are a DataError, as streaming gives, or with
    data.on_unreadable: skip returned as {pool: {row: why}} for the caller to leave out. The files the run reads are
    hashed (a cache is served only if it decoded that content); ``facts`` gets {file: (size, mtime_ns, hash)}, for
    the run's splits.json to reuse rather than hash them again. ``pool_dirs``: the folder that names each pool's
    cache, where it is not root/<pool> (a packed dataset's version)."""
    if cfg.cache == "off":
        return {}, [], {}
    folder = cache_folder(cfg.cache_dir)
    out: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    skipped: dict[str, dict[int, str]] = {}
    for name, files in pools.items():
        rows = [idx for pool, idx in wanted.values() if pool == name]
        if not rows or not files:
            continue
        pool_dir = (pool_dirs or {}).get(name) or (root / name if (root / name).is_dir() else root)  # train/, test/, val/; or the folder
        needed = torch.cat(rows).unique()
        pixels, bad, note = _pool_pixels(cfg, folder, root, pool_dir, list(files), needed, channels, size, progress,
                                         facts if facts is not None else {})
        if pixels is not None:
            out[name] = pixels
            skipped[name] = _unreadable_rows(cfg, list(files), bad, needed)
        if note:
            notes.append(note)
    return out, notes, {name: rows for name, rows in skipped.items() if rows}


def _pool_pixels(cfg: Any, folder: Path, root: Path, pool_dir: Path, files: list[Path], needed: torch.Tensor, channels: int,
                 size: Sequence[int], progress: Progress | None, facts: dict[Path, Facts]) -> Cached:
    try:
        entry = pool_entry(folder, root, pool_dir, files, channels, size)
        rows = needed.tolist()
        found = file_facts([files[i] for i in rows])
    except OSError:
        return None, {}, None  # a file vanished since the folder was read: streaming names it
    facts.update((files[i], fact) for i, fact in zip(rows, found))
    expected = {i: digest for i, (_, _, digest) in zip(rows, found)}
    pixels, bad, damaged = open_cached(entry, expected)
    if pixels is not None:
        return pixels, bad, _reused(entry)
    what = f"the {len(files):,} images of '{pool_dir}'"
    if damaged == "a folder, not a file":
        return None, {}, (f"Decoded images: not cached, since '{entry.path}' is a folder where the cache file of {what} goes; "
                          "they are decoded from the files every epoch instead. Remove that folder to let fcclass cache them.")
    if len(needed) < MIN_SHARE * len(files):
        return None, {}, (f"Decoded images: not cached, since this run reads {len(needed):,} of {what} (a cache is built for "
                          f"runs that read at least {MIN_SHARE:.0%} of them); they are decoded from the files"
                          + (f" (the cache there is unusable: {damaged})." if damaged else "."))
    refusal = _no_room(cfg, folder, entry, what)
    if refusal is not None:
        return None, {}, refusal
    try:
        with _locked(entry) as waited:
            pixels, bad, _ = open_cached(entry, expected)
            if pixels is not None:  # built by the process that held the lock
                return pixels, bad, _reused(entry, waited)
            replaced = _remove_stale(entry)
            start = time.monotonic()
            _build(entry, files, channels, size, progress)
            seconds = time.monotonic() - start
    except NotRegularError as e:
        return None, {}, (f"Decoded images: not cached, since the cache's lock file '{e.path}' is not a regular file (a FIFO, a "
                          "folder, a link...); the images are decoded from the files every epoch instead. Remove it to let fcclass cache them.")
    except OSError as e:
        return None, {}, (f"Decoded images: not cached, since the cache folder '{folder}' cannot be written ({os_error_reason(e)}); "
                      "the images are decoded from the files every epoch instead. Point data.cache_dir (or $FCCLASS_CACHE_DIR) "
                      "at a writable folder with room, or set data.cache: off to go without this note.")
    pixels, bad, why = open_cached(entry, expected)
    if pixels is None:
        return None, {}, f"Decoded images: the cache just built at {entry.path} cannot be read back ({why}); decoding from the files."
    return pixels, bad, _built(entry, seconds, damaged, replaced)


def _unusable_folder(folder: Path) -> str | None:
    """Why the cache folder cannot hold a cache (a file in its place, a folder that cannot be created), or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "is a file, not a folder" if folder.exists() and not folder.is_dir() else f"cannot be written ({os_error_reason(e)})"
        return (f"Decoded images: not cached, since the cache folder '{folder}' {why}; the images are decoded "
                "from the files every epoch instead. Point data.cache_dir (or $FCCLASS_CACHE_DIR) at a writable folder, or "
                "set data.cache: off to go without this note.")
    return None


def _no_room(cfg: Any, folder: Path, entry: Entry, what: str) -> str | None:
    """Why a cache of ``entry``'s size is not built (data.cache_max_gb, the free disk space), or None."""
    shape = "x".join(str(v) for v in entry.shape[1:])
    if entry.nbytes > cfg.cache_max_gb * 1e9:
        return (f"Decoded images: not cached, since {what} take {human(entry.nbytes)} decoded at {shape}, over data.cache_max_gb "
                f"({cfg.cache_max_gb:g}); they are decoded from the files every epoch instead (slower). To cache them, raise "
                f"the limit: --set data.cache_max_gb={math.ceil(entry.nbytes / 1e8) / 10:g} (or lower data.image_size).")
    unusable = _unusable_folder(folder)
    if unusable is not None:
        return unusable
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), None)
    try:
        free = shutil.disk_usage(existing).free if existing is not None else None
    except OSError:
        free = None
    if free is not None and entry.nbytes + DISK_RESERVE > free:
        return (f"Decoded images: not cached, since {what} take {human(entry.nbytes)} decoded at {shape} and '{existing}' has "
                f"{human(free)} free (a cache must leave at least 1 GiB free); they are decoded from the files every epoch "
                "instead. Free some space, or point data.cache_dir (or $FCCLASS_CACHE_DIR) at a disk with room.")
    return None


def _unreadable_rows(cfg: Any, files: list[Path], bad: dict[int, str], needed: torch.Tensor) -> dict[int, str]:
    """The rows the run reads whose file cannot be decoded: the error streaming gives (every such file listed), or
    with data.on_unreadable: skip the rows to leave out. Rows the run does not read are never served."""
    read = set(needed.tolist())
    used = {i: why for i, why in sorted(bad.items()) if i in read}
    if used and cfg.on_unreadable != "skip":
        raise unreadable_error([(files[i], why) for i, why in used.items()])
    return used


def _reused(entry: Entry, waited: bool = False) -> str:
    by = "; built by another process while this one waited" if waited else ""
    return f"Decoded images: reused {shown(entry.path)} ({entry.shape[0]:,} images, {human(entry.nbytes)}{by})."


def _built(entry: Entry, seconds: float, damaged: str | None, replaced: bool) -> str:
    why = (f"; the cache there was unusable ({damaged}) and is replaced" if damaged else
           "; it replaces this folder's older cache (files changed since)" if replaced else "")
    took = f"{seconds:.1f}" if seconds < 10 else f"{seconds:,.0f}"
    return (f"Decoded images: cached in {shown(entry.path)} ({entry.shape[0]:,} images, {human(entry.nbytes)}, built in "
            f"{took} s{why}). Later runs on these files reuse it.")
