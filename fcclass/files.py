"""Every file fcclass writes goes through here: atomically for regular files, and never over what is not one.

A regular file (or a missing one) is replaced atomically: a temp file in the same folder, fsync, rename, so a crash
or a full disk leaves the old file or the new one, never a mix. A symlink to a file is followed and its target
replaced, so the link stays a link. What is not a regular file is never replaced by one: a FIFO, a character
device (``/dev/null``, a terminal) or ``/dev/stdout`` is written into, as ``cp`` would; a folder, a block device
(a disk) or a socket is refused with a message. Writing into a FIFO that nothing reads from fails at once instead
of waiting forever."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable

from fcclass.errors import FcclassError

_UMASK = os.umask(0)
os.umask(_UMASK)


class RunWriteError(FcclassError):
    """A file of a run (or another output) could not be written: full disk, read-only folder, no permission."""


def os_error_reason(e: OSError) -> str:
    reasons = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.ENOTDIR: "a part of the path is a file, not a folder", errno.ENXIO: "nothing is reading from the pipe",
               errno.EISDIR: "it is a folder", errno.ENAMETOOLONG: "the name is too long"}
    return reasons.get(e.errno or 0, e.strerror or str(e))


def _kind(path: Path) -> str | None:
    """What ``path`` is, following symlinks: None (nothing there yet), 'file', 'folder', 'stream' (written into:
    FIFO, character device) or a refusal reason. Raises OSError when a part of the path is a file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return "stream"
    return "a block device (a disk)" if stat.S_ISBLK(mode) else "a socket or other special file"


def is_stream(path: str | Path) -> bool:
    """Whether writing to ``path`` goes into a stream (a FIFO, a device, /dev/stdout) rather than a file."""
    path = Path(path)
    try:
        return _kind(path) == "stream" or _is_magic(path)
    except OSError:
        return False


def is_stdout(path: str | Path) -> bool:
    """Whether ``path`` is this process's standard output (``-o -``, ``/dev/stdout``, or the file or pipe it goes to):
    then nothing else may be printed there."""
    if str(path) == "-":
        return True
    try:
        return os.path.samestat(os.stat(path), os.fstat(1))
    except (OSError, ValueError):
        return False


def check_output(path: str | Path, what: str = "the output") -> None:
    """Fail before the work, not after it, when ``path`` cannot be written: a folder, a special file that is
    refused, or a folder on the way that is a file."""
    path = Path(path)
    for parent in path.absolute().parents:  # the nearest existing folder above must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise RunWriteError(f"Cannot write {what} to '{path}': '{parent}' is a file, not a folder. Choose another path.")
            break
    try:
        kind = _kind(path)
    except OSError as e:
        raise RunWriteError(f"Cannot write {what} to '{path}': {os_error_reason(e)}. Choose another path.") from None
    if kind == "folder":
        raise RunWriteError(f"Cannot write {what} to '{path}': it is a folder. Give a file name inside it, e.g. '{path / 'out'}'.")
    if kind not in (None, "file", "stream"):
        raise RunWriteError(f"Cannot write {what} to '{path}': it is {kind}, which fcclass never writes to. Choose a regular file.")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` by the rules in the module docstring. Raises OSError (the temp file is removed) or
    RunWriteError for a target that is refused."""
    path = Path(path)
    kind = _kind(path)
    if kind == "stream" or (kind == "file" and _is_magic(path)):
        _write_into(path, data)
        return
    check_output(path)
    if path.is_symlink():  # replace the link's target, keep the link
        path = Path(os.path.realpath(path))
    _replace(path, (data,))


def atomic_write_chunks(path: str | Path, chunks: Iterable[bytes]) -> None:
    """Write a large file that fcclass owns (the decoded-image cache) from ``chunks``, never all in memory at once:
    atomically, as above, but a symlink at ``path`` is replaced rather than followed (a link planted in a shared
    cache folder must not make fcclass write elsewhere). An exception from ``chunks`` removes the temp file too."""
    _replace(Path(path), chunks)


def _replace(path: Path, chunks: Iterable[bytes]) -> None:
    """Temp file in the same folder, fsync, rename over ``path``: a crash or a full disk leaves the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the user's usual permissions
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _is_magic(path: Path) -> bool:
    """/dev/stdout, /dev/fd/N, /proc/self/fd/N: names for an open file that must be written through, not replaced."""
    return re.match(r"/dev/(stdout|stderr|fd/)|/proc/[^/]+/fd/", str(path.absolute())) is not None


def _write_into(path: Path, data: bytes) -> None:
    """Append to a FIFO, device or /dev/stdout. O_NONBLOCK makes opening a FIFO with no reader fail (ENXIO) rather
    than wait; the writes themselves then block as usual."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def write_output(path: str | Path, data: bytes | str, what: str) -> None:
    """An output the user named (--json FILE, --csv, -o): created with its missing folders, and every failure
    turned into a message that names the file and the cause."""
    path = Path(path)
    check_output(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # surrogateescape: a file name that is not valid UTF-8 goes out as the bytes it is on disk
        atomic_write_bytes(path, data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data)
    except OSError as e:
        raise RunWriteError(f"Cannot write {what} to '{path}': {os_error_reason(e)}.{_fix(e)}") from None


def _fix(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return " Free some space on that disk, or write somewhere else."
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return " Write to a folder you can write to."
    return ""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RefusedFile(OSError):
    """A file fcclass will not read back: not a regular file (a FIFO would block forever, a device never ends), or
    larger than such a file can be. Its ``strerror`` (and str) is the reason, in a few words."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _what(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    return "a block device (a disk)" if stat.S_ISBLK(mode) else "a socket or other special file"


def open_regular(path: str | Path, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """A file descriptor of ``path`` opened with ``flags``, only when it is a regular file (symlinks followed; ``mode``
    for one that O_CREAT makes): a FIFO is opened without waiting (O_NONBLOCK) and refused, as are folders and devices, by RefusedFile. Other errors
    (FileNotFoundError, PermissionError) are raised as they are."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY, mode)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise RefusedFile(errno.EINVAL, f"it is {_what(mode)}, not a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | Path, limit: int) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes: the one reader of what fcclass reads back from
    its own files (a run's records, metrics, config), so that a FIFO, a device or a huge (sparse) file put there is a
    RefusedFile at once, never a hang or a MemoryError. FileNotFoundError and other OSErrors are raised as they are."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > limit:
            raise RefusedFile(errno.EFBIG, f"it is {size:,} bytes, more than the {limit:,} bytes such a file can take")
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew since fstat
        raise RefusedFile(errno.EFBIG, f"it is more than the {limit:,} bytes such a file can take")
    return data


def shown(path: str | Path) -> str:
    """A path as messages show it: relative to the current folder when it lies inside it (runs/x), else absolute."""
    path = Path(path)
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
