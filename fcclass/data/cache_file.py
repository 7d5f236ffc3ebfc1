"""The decode cache's file (fcclass.data.cache decides when to build and reuse one): its name, its layout and the
checks that make sure it is never read unless it holds what the run needs.

Layout: HEADER_BYTES of header (MAGIC, then JSON: format, shape, key digest, folder), then the N*C*H*W pixels, so
np.memmap maps them at a page-aligned offset, then a JSON trailer line: the rows whose file cannot be decoded (kept as
zeros, never served), each row's file content hash (blake2b, as splits.json records it) and a crc32 of every CHUNK
rows of pixels. A file whose header, trailer, key, size or owner does not check out, whose pixels fail their
checksums, or that decoded other content than the files the run reads now hold, is rebuilt, never read."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from fcclass.data.images import decode_threads
from fcclass.files import os_error_reason

FORMAT = 3  # 2: the trailer of unreadable rows; 3: each file's content hash and the pixels' checksums in the trailer
MAGIC = b"fcclass decoded images\n"
HEADER_BYTES = 4096  # a page: the pixels start page-aligned, as mmap wants
CHUNK = 256  # images decoded per write
TRAILER_LIMIT = 64 << 20  # bytes of the trailer: 36 a row for its hash, up to about 100 more for each bad file


@dataclass
class Entry:
    """One pool's cache file: where it is, what it must hold, and what it is for."""

    path: Path
    digest: str  # of the key: format, folder, channels, size, and every file's path, size and mtime
    shape: tuple[int, int, int, int]  # N, C, H, W
    pool_dir: Path
    slot: str  # the file name's part shared by every version of this folder's cache at this shape

    @property
    def nbytes(self) -> int:
        return HEADER_BYTES + math.prod(self.shape)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(f".{self.slot}.lock")


def pool_entry(folder: Path, root: Path, pool_dir: Path, files: Sequence[Path], channels: int, size: Sequence[int]) -> Entry:
    """The cache entry of ``files`` (a pool under ``root``) at this size; stats every file (on threads: a network
    file system answers slowly). Raises OSError when a file cannot be stat'ed."""
    place = json.dumps([FORMAT, str(pool_dir), channels, list(size)])
    h = hashlib.blake2b(place.encode("utf-8", "surrogateescape"), digest_size=16)
    with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
        for f, st in zip(files, pool.map(os.stat, files)):
            h.update(f"\0{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    label = root.name if pool_dir == root else f"{root.name}-{pool_dir.name}"
    place_digest = hashlib.blake2b(place.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
    slot = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', label)[:40] or 'images'}-{channels}x{size[0]}x{size[1]}-{place_digest}"
    digest = h.hexdigest()
    return Entry(folder / f"{slot}-{digest[:16]}.u8", digest, (len(files), channels, int(size[0]), int(size[1])), pool_dir, slot)


def header(entry: Entry) -> bytes:
    meta = {"format": FORMAT, "shape": list(entry.shape), "key": entry.digest, "folder": str(entry.pool_dir)[-2000:]}
    return (MAGIC + json.dumps(meta).encode("ascii")).ljust(HEADER_BYTES, b" ")


def _header_problem(head: bytes, entry: Entry) -> str | None:
    if not head.startswith(MAGIC):
        return "not an fcclass image cache"
    try:
        meta = json.loads(head[len(MAGIC):].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return "its header is damaged"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return f"format {meta.get('format') if isinstance(meta, dict) else '?'}, not {FORMAT}"
    if meta.get("key") != entry.digest or meta.get("shape") != list(entry.shape):
        return "its header names other files or another shape"
    return None


def trailer(bad: list[tuple[int, str]], digests: list[str], crcs: list[int]) -> bytes:
    return json.dumps({"unreadable": [[i, why] for i, why in sorted(bad)], "blake2b": digests, "crc32": crcs}).encode("ascii") + b"\n"


def _trailer_meta(data: bytes, n: int) -> tuple[dict[int, str], list[str], list[int]] | None:
    """What a trailer lists: the unreadable rows ({row: why}), each row's file content hash (as the run's splits.json
    records it) and the crc32 of every CHUNK rows of pixels; or None when it is damaged."""
    try:
        meta = json.loads(data.decode("ascii")) if data.endswith(b"\n") else None
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    rows, digests, crcs = meta.get("unreadable"), meta.get("blake2b"), meta.get("crc32")
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 2 and type(r[0]) is int and 0 <= r[0] < n
                                             and isinstance(r[1], str) for r in rows):
        return None
    if not isinstance(digests, list) or len(digests) != n or not all(isinstance(d, str) for d in digests):
        return None
    if not isinstance(crcs, list) or len(crcs) != -(-n // CHUNK) or not all(type(c) is int for c in crcs):
        return None
    return {i: why for i, why in rows}, digests, crcs


def _damaged_chunks(pixels: Any, crcs: list[int]) -> int:
    """How many CHUNK-row blocks of the mapped pixels fail their crc32 (about 4 GB/s, on threads)."""
    with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
        found = pool.map(lambda k: zlib.crc32(pixels[k * CHUNK : (k + 1) * CHUNK]), range(len(crcs)))
        return sum(a != b for a, b in zip(found, crcs))


Cached = tuple[torch.Tensor | None, dict[int, str], str | None]


def open_cached(entry: Entry, expected: dict[int, str] | None = None) -> Cached:
    """The cached pixels (N, C, H, W), memory-mapped, and the rows whose file cannot be decoded ({row: why}); or None
    and why the file is unusable (None: there is none). ``expected``: {row: content hash} of the files the run reads
    now; a row whose file's content differs from the one decoded (changed in place, its size and mtime restored)
    makes the cache stale. The pixels are checked against their checksums, so damaged bytes are never served.
    Copy-on-write mapping: the file is never written through it, and torch gets a writable array (no warning).
    O_NOFOLLOW and the checks on the open file refuse what was planted in a shared folder: a link, a FIFO, another
    user's file."""
    import numpy as np

    try:
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, {}, None
    except OSError as e:
        return None, {}, "a link" if e.errno == errno.ELOOP else os_error_reason(e)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid not in (os.getuid(), 0):
        os.close(fd)  # before fdopen, which refuses a folder
        return None, {}, "a folder, not a file" if stat.S_ISDIR(st.st_mode) else "not a regular file of this user"
    with os.fdopen(fd, "rb") as f:
        if not entry.nbytes < st.st_size <= entry.nbytes + TRAILER_LIMIT:
            return None, {}, f"{st.st_size:,} bytes for {entry.nbytes:,} of pixels: truncated or damaged"
        why = _header_problem(os.pread(fd, HEADER_BYTES, 0), entry)
        meta = _trailer_meta(os.pread(fd, st.st_size - entry.nbytes, entry.nbytes), entry.shape[0]) if why is None else None
        if why is not None or meta is None:
            return None, {}, why or "its trailer (unreadable files, hashes, checksums) is damaged"
        bad, digests, crcs = meta
        changed = sum(digests[i] != d for i, d in (expected or {}).items())
        if changed:
            return None, {}, f"{changed:,} of its images' files changed since it was built, though their size and time did not"
        pixels = np.memmap(f, dtype=np.uint8, mode="c", offset=HEADER_BYTES, shape=entry.shape)
    damaged = _damaged_chunks(pixels, crcs)
    if damaged:
        return None, {}, f"{damaged:,} of its {len(crcs):,} blocks of pixels fail their checksum: damaged"
    return torch.from_numpy(pixels), bad, None
