"""The local shard cache: a version's shards fetched on demand into ``<cache folder>/shards`` and read from there.

    shards/blobs/<sha256>/<image hash>.<ext>   a shard's images, extracted (fixed mtime), once its bytes matched its hash
    shards/blobs/<sha256>.lock                 its lock file (holds its size); its mtime is when it was last used
    shards/manifests/<place>/<id>.json.gz      manifests read before (versions are immutable: no network needed again)
    shards/pools/<id>/<split>/                 the folder the decode cache names a version's split by

A shard is fetched (hash checked; fetched once more when it does not match, then named), extracted into a temp
folder and renamed into place, so a reader never sees half of one and two processes fetching it never clash. A
process that uses a shard holds a shared flock on its lock file until it exits; eviction takes the lock exclusively
without waiting, so it never removes a shard in use and never blocks. Before fetching, the least recently used
shards and decode-cache files are removed until the whole cache folder fits data.cache_max_gb (the shards a run
uses stay, so a dataset larger than the limit still trains, and the notes say the cache is over its limit)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fcclass.data.shards.manifest import FIXED_MTIME, IMAGE_HASH_HEX, SUFFIX, Manifest, parse
from fcclass.data.shards.store import FolderStore, S3Store
from fcclass.data.shards.versions import shard_problem
from fcclass.errors import DataError
from fcclass.files import atomic_write_bytes, os_error_reason, shown
from fcclass.memory import human

FETCH_THREADS = 4
_HELD: dict[Path, int] = {}  # a shard's lock file -> its fd, held (shared) while this process lives
_MEMBER = re.compile(r"^([0-9a-f]{%d})\.([a-z0-9]{1,8})$" % IMAGE_HASH_HEX)


def place_key(url: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/").rsplit("/", 1)[-1])[:40] or "dataset"
    return f"{slug}-{hashlib.blake2b(url.encode('utf-8', 'surrogateescape'), digest_size=6).hexdigest()}"


def cached_manifest(root: Path, url: str, vid: str | None) -> Manifest | None:
    """A manifest of ``url`` read before: version ``vid`` (a prefix is enough), or with None the newest one."""
    folder = root / "manifests" / place_key(url)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.glob(f"*{SUFFIX}"):
        name = path.name[: -len(SUFFIX)]
        if vid is None or name.startswith(vid):
            try:
                found.append(parse(path.read_bytes(), str(path), expected_id=name))
            except (OSError, DataError):
                continue
    found.sort(key=lambda m: (m.created, m.id))
    return found[-1] if found and (vid is None or len(found) == 1) else None


def keep_manifest(root: Path, url: str, m: Manifest) -> None:
    path = root / "manifests" / place_key(url) / f"{m.id}{SUFFIX}"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, m.to_json())
        except OSError:
            pass  # the next run reads it from the store again


def _hold(root: Path, sha: str) -> None:
    """Mark shard ``sha`` in use by this process (a shared lock, kept) and as just used."""
    lock = root / "blobs" / f"{sha}.lock"
    if lock in _HELD:
        if lock.exists():
            return
        os.close(_HELD.pop(lock))  # the cache folder was deleted under this process: hold the new lock file
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        pass  # a file system without flock: no protection from eviction by another process
    os.utime(fd)
    _HELD[lock] = fd


def release_all() -> None:
    """Let this process's shards be evicted (tests; a process that exits releases them anyway)."""
    for fd in _HELD.values():
        os.close(fd)
    _HELD.clear()


def ensure(m: Manifest, root: Path, store: Any, limit_bytes: float, progress: Any = None) -> list[str]:
    """Every shard of version ``m`` extracted under ``root``/blobs and held in use; those missing are fetched from
    ``store()`` (called only when one is missing: a cached version needs no network). Returns notes."""
    notes: list[str] = []
    for shard in m.shards:
        _hold(root, shard.sha256)
    missing = [s for s in m.shards if not (root / "blobs" / s.sha256).is_dir()]
    if not missing:
        return notes
    need = sum(s.bytes for s in missing)
    make_room(root.parent, limit_bytes, need)  # the caller trims again once the decode cache is built, and says if over
    opened = store()
    if progress is not None:
        progress.start(len(missing), f"Fetching {len(missing)} shard(s) ({human(need)}) of version {m.id} from {opened.url}")
    try:  # on threads: an object store answers each request after a round trip
        with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
            for k, _ in enumerate(pool.map(lambda s: _fetch(opened, s, root), missing), 1):
                if progress is not None:
                    progress.advance(k)
    finally:
        if progress is not None:
            progress.end()
    make_room(root.parent, limit_bytes)  # with the shards' real space on disk (the estimate above was their bytes)
    notes.append(f"Shards: fetched {len(missing)} of the {len(m.shards)} of version {m.id} ({human(need)}) into {shown(root)}; "
                 "later runs of this version read them from there.")
    return notes


def _fetch(store: FolderStore | S3Store, shard: Any, root: Path) -> None:
    """Fetch one shard, check it (once more when its bytes do not match), extract it into place."""
    problem = None
    for _ in range(2):
        try:
            data = store.read(shard.file)
        except FileNotFoundError:
            raise DataError(f"The shard {store.where(shard.file)} is missing from the packed dataset. Pack the source images again "
                            "into the same place: the shards the newest version lacks are written again.") from None
        problem = shard_problem(store, shard.file, shard.bytes, shard.sha256, data)
        if problem is None:
            break
    if problem is not None:
        raise DataError(f"The shard {store.where(shard.file)} is bad ({problem}; fetched twice). Run `fcclass data verify "
                        f"{store.url}` to find every bad one; delete them, then pack the source images again into the same place "
                        "(the shards the newest version lacks are written again).")
    _extract(data, shard.sha256, root, store.where(shard.file))


def _extract(data: bytes, sha: str, root: Path, where: str) -> None:
    from webdataset.tariterators import tar_file_iterator

    blobs = root / "blobs"
    final = blobs / sha
    tmp = blobs / f".{sha}.{os.getpid()}.tmp"
    used = 2 * 4096  # the folder and the lock file; then each file's space on disk (as `du` counts it: a small file takes a block)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for sample in tar_file_iterator(io.BytesIO(data)):
            name = sample["fname"]
            hit = _MEMBER.match(name)
            if hit is None or hashlib.sha256(sample["data"]).hexdigest()[:IMAGE_HASH_HEX] != hit.group(1):
                raise DataError(f"The shard {where} holds '{name[:80]}', not an image named by its hash: it was not written by "
                                "`fcclass data pack`. Pack the images again into a new place.")
            path = tmp / name
            path.write_bytes(sample["data"])
            os.utime(path, (FIXED_MTIME, FIXED_MTIME))
            st = path.stat()
            used += max(st.st_size, st.st_blocks * 512)
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process extracted it first: the same bytes
        fd = os.open(blobs / f"{sha}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(used).encode())
        finally:
            os.close(fd)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"Cannot write the shard cache '{blobs}': {os_error_reason(e)}. Free some space, or point data.cache_dir "
                        "(or $FCCLASS_CACHE_DIR) at a disk with room.") from None


def _entries(folder: Path) -> list[tuple[float, int, str, Path]]:
    """(last use, bytes, kind, path) of everything the cache folder holds: shards and decode-cache files."""
    out = []
    blobs = folder / "shards" / "blobs"
    if blobs.is_dir():
        for lock in blobs.glob("*.lock"):
            try:
                size = int(lock.read_text() or 0) if (blobs / lock.stem).is_dir() else 0
                out.append((lock.stat().st_mtime, size, "shard", lock))
            except (OSError, ValueError):
                continue
    if folder.is_dir():
        for path in folder.iterdir():
            try:
                if path.is_file() and not path.name.startswith("."):
                    st = path.stat()
                    out.append((st.st_mtime, st.st_size, "file", path))
            except OSError:
                continue
    return out


def cache_bytes(folder: Path) -> int:
    return sum(size for _, size, _, _ in _entries(folder))


def make_room(folder: Path, limit_bytes: float, incoming: int = 0) -> str | None:
    """Remove the least recently used shards not in use and decode-cache files until the cache folder plus
    ``incoming`` bytes fits ``limit_bytes``; a note when it cannot (what is in use is over the limit), else None."""
    entries = sorted(_entries(folder))
    total = sum(e[1] for e in entries) + incoming
    for _, size, kind, path in entries:
        if total <= limit_bytes:
            break
        if size and (_evict_shard(path) if kind == "shard" else _remove(path)):
            total -= size
    if total > limit_bytes:
        return (f"Shard cache: {folder} needs {human(total)}, over data.cache_max_gb ({limit_bytes / 1e9:g}), because the shards "
                "in use (by this run or another) cannot be removed; it shrinks back when they are no longer used. Raise "
                "data.cache_max_gb to keep more.")
    return None


def _remove(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except OSError:
        return False


def _evict_shard(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # in use
        folder = lock.with_suffix("")
        trash = folder.with_name(f".{folder.name}.{os.getpid()}.{time.monotonic_ns()}.gone")
        try:
            os.rename(folder, trash)
        except OSError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        os.ftruncate(fd, 0)
        return True
    finally:
        os.close(fd)
