"""Where processes started by hand (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT set without torchrun) meet: within
``FCCLASS_RENDEZVOUS_TIMEOUT`` seconds (default 300), or an error that names the ranks that did not come and the
address, rather than waiting for ever."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from typing import Any

from fcclass.device import Dist
from fcclass.errors import FcclassError

ENV_TIMEOUT = "FCCLASS_RENDEZVOUS_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # seconds
AFTER = timedelta(minutes=30)  # the store's timeout once every rank is there (torch's default for a process group)


def rendezvous_timeout() -> float:
    raw = os.environ.get(ENV_TIMEOUT, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_TIMEOUT
    except ValueError:
        raise FcclassError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds.") from None
    if not value > 0:
        raise FcclassError(f"{ENV_TIMEOUT}={raw!r}: give a number of seconds above 0.")
    return value


def rendezvous(job: Dist) -> Any:
    """A TCPStore every rank of ``job`` has joined (rank 0 serves it at MASTER_ADDR:MASTER_PORT), for
    init_process_group."""
    from torch.distributed import TCPStore

    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not addr or not port.isdigit() or not 0 < int(port) < 65536:
        raise FcclassError(f"WORLD_SIZE={job.world} is set, but MASTER_ADDR={addr!r} and MASTER_PORT={port!r} do not say where rank 0 "
                           "listens: set both (a host every process reaches, a free port), or start the job with torchrun.")
    seconds = rendezvous_timeout()
    where, deadline = f"{addr}:{port}", time.monotonic() + seconds
    hint = (f"Start all {job.world} processes (ranks 0 to {job.world - 1}) with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE "
            f"within ${ENV_TIMEOUT} seconds ({seconds:g}), or use torchrun.")
    try:
        socket.getaddrinfo(addr, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise FcclassError(f"{job.label}: MASTER_ADDR {addr!r} does not resolve ({e}). Set it to rank 0's host name or address.") from None
    if job.rank != 0:
        _wait_for_rank0(job, addr, int(port), deadline, hint)
    try:
        store = TCPStore(addr, int(port), job.world, job.rank == 0, timedelta(seconds=max(1.0, deadline - time.monotonic())),
                         wait_for_workers=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        doing = f"listen on {where}" if job.rank == 0 else f"join rank 0 at {where}"
        raise FcclassError(f"{job.label}: cannot {doing} ({first[:200]}). Is the port taken? {hint}") from None
    store.set(f"fcclass/joined/{job.rank}", "1")
    keys = [f"fcclass/joined/{r}" for r in range(job.world)]
    while not store.check(keys):
        if time.monotonic() > deadline:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            raise FcclassError(f"{job.label}: {_ranks(missing)} of {job.world} did not join the job at {where} within "
                               f"{seconds:g} s. {hint}")
        time.sleep(0.1)
    store.set_timeout(AFTER)
    return store


def _wait_for_rank0(job: Dist, addr: str, port: int, deadline: float, hint: str) -> None:
    """Until rank 0's store accepts connections (torch's own client would log a C++ traceback per failed try)."""
    while True:
        try:
            socket.create_connection((addr, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise FcclassError(f"{job.label}: rank 0 did not open {addr}:{port} ({e.strerror or e}). {hint}") from None
            time.sleep(0.2)


def _ranks(missing: list[int]) -> str:
    shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    return f"rank{'s' if len(missing) > 1 else ''} {shown}"
