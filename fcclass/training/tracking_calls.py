"""Bounds on MLflow calls, whatever the tracking store does: each call runs in a daemon thread and is given up on at a
deadline for the whole call (not per read: a server that sends one byte every 2 s never trips a read timeout) taken
from one budget for the whole run, ``FCCLASS_TRACKING_TIMEOUT`` seconds (default 60); and when the process grows by
more than MAX_GROWTH bytes during a call (a server streaming an endless answer). A call given up on has its sockets
shut down, which ends the thread's read; the training never waits longer than the budget in all."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any, Callable

ENV_BUDGET = "FCCLASS_TRACKING_TIMEOUT"
DEFAULT_BUDGET = 60.0  # seconds, for all of a run's MLflow calls together
MAX_GROWTH = 256 << 20  # bytes the process may grow by during one call
POLL = 0.05


class Abandoned(Exception):
    """A call given up on (too slow, or its answer too large); its message says which."""


def budget() -> float:
    """The seconds all of a run's MLflow calls may take together: $FCCLASS_TRACKING_TIMEOUT, else DEFAULT_BUDGET."""
    raw = os.environ.get(ENV_BUDGET, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_BUDGET
    except ValueError:
        return DEFAULT_BUDGET
    return value if value > 0 and value == value else DEFAULT_BUDGET


class _Worker(threading.Thread):
    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        super().__init__(name="fcclass-mlflow", daemon=True)
        self.fn, self.args = fn, args
        self.sockets: list[socket.socket] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.fn(*self.args)
        except BaseException as e:  # handed to the caller
            self.error = e
        finally:
            self.fn = self.args = None  # type: ignore[assignment]


_hooked = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """Records the sockets a tracking thread connects (audit hooks see every socket.connect)."""
    if event == "socket.connect":
        thread = threading.current_thread()
        if isinstance(thread, _Worker):
            thread.sockets.append(args[0])


def _rss() -> int | None:
    """This process's resident memory in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def run_bounded(fn: Callable[..., Any], args: tuple[Any, ...], seconds: float) -> None:
    """``fn(*args)`` in a daemon thread; its exception re-raised; Abandoned after ``seconds`` or when the process grew
    by over MAX_GROWTH meanwhile (the thread's sockets are then shut down, so it stops reading)."""
    global _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True
    worker = _Worker(fn, args)
    start, base = time.monotonic(), _rss()
    worker.start()
    while True:
        worker.join(POLL)
        if not worker.is_alive():
            break
        now = _rss()
        if base is not None and now is not None and now - base > MAX_GROWTH:
            _abandon(worker)
            raise Abandoned(f"the answer grew past {MAX_GROWTH >> 20} MB during one call, given up")
        if time.monotonic() - start > seconds:
            _abandon(worker)
            total = budget()
            if seconds < total - 1:  # earlier calls took the rest
                raise Abandoned(f"no complete answer in the {seconds:.0f} s left of the {total:g} s that {ENV_BUDGET} allows "
                                "all of a run's MLflow calls")
            raise Abandoned(f"no complete answer in {seconds:.0f} s, the bound for all of a run's MLflow calls set by "
                            f"{ENV_BUDGET}")
    if worker.error is not None:
        raise worker.error


def _abandon(worker: _Worker) -> None:
    for sock in list(worker.sockets):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    worker.join(1.0)  # the read ends with the socket; a thread that does not end stays behind, a daemon
