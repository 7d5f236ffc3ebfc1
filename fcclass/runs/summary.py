"""The run record: RUN_DIR/summary.json, one small machine-readable file with everything about a run — what was
trained, where, with which code and versions, how long, how far it got and how well it did. Written atomically by a
trainer callback at the start, after every epoch and at the end; `fcclass runs` lists runs from these files alone.

A run whose process was killed cannot say so: its record still reads "running". Readers tell it apart by the run's
lock (RUN_DIR/.lock, held by the training process for as long as it lives): a "running" run whose lock is free was
killed, and is shown as interrupted."""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Mapping, Sequence

from pydantic import Field

from fcclass.runs.layout import LOCK, SUMMARY
from fcclass.runs.records import DamagedRecord, Record, read_record, write_record

FORMAT = 1
LAUNCH_COMMAND = "FCCLASS_LAUNCH_COMMAND"  # `train --nproc-per-node`'s command line, for the processes torchrun starts
STATES = ("running", "finished", "interrupted", "failed", "pruned")
LIMIT = 16 << 20  # bytes; a record is a few KB
# What the figures of a record can be: a value outside these makes the record damaged (listed as such), never a crash
# in a table, an overflow in a plot or NaN in --json output.
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Loss = Annotated[float, Field(ge=0, le=3.4028234663852886e38, allow_inf_nan=False)]  # any finite float32: a poor model's loss is large, not damaged
Seconds = Annotated[float, Field(ge=0, le=1e10, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=10**15)]


class GitState(Record):
    commit: str
    dirty: bool
    root: str


class Epochs(Record):
    planned: Count | None = None
    done: Count = 0


class Best(Record):
    """The best epoch's metrics row (rounded as shown), with its number."""

    epoch: Count | None = None
    val_accuracy: Fraction | None = None
    val_loss: Loss | None = None


class TestFigures(Record):
    """The test split's figures for the run's model: the trainer's end-of-training pass, or compress's measurement."""

    epoch: Count | None = None
    accuracy: Fraction | None = None
    loss: Loss | None = None
    images: Count | None = None
    top5_accuracy: Fraction | None = None


class SkippedFile(Record):
    """An image file left out as unreadable (data.on_unreadable: skip)."""

    path: str
    reason: str


class InitFromRecord(Record):
    """Where a run's starting weights came from (model.init_from) and what became of each layer."""

    path: str  # model.init_from.path: the source run directory or checkpoint file
    checkpoint: str | None = None  # the file read
    epoch: Count | None = None  # the source checkpoint's completed epochs
    loaded: list[str] = []
    skipped: list[str] = []  # matched, but the shapes differ
    new: list[str] = []
    frozen: list[str] = []  # fixed by init_from.freeze (until train.unfreeze)


class Summary(Record):
    """RUN_DIR/summary.json. Every key is optional on read: runs of earlier versions lack some, and `fcclass runs`
    lists whatever a record holds; the keys are written in this order."""

    format: int = FORMAT
    name: str | None = None
    run_dir: str | None = None
    state: str | None = None  # one of STATES; another value reads as failed
    started: str | None = None
    ended: str | None = None
    wall_seconds: Seconds | None = None  # over all sessions
    sessions: Count | None = None
    git: GitState | None = None
    versions: dict[str, str] | None = None
    host: str | None = None
    platform: str | None = None
    device: str | None = None
    precision: str | None = None
    threads: Count | None = None
    batch_size: Count | None = None  # the (global) batch trained with: data.batch_size, or smaller for a short run
    distributed: dict[str, Any] | None = None  # torchrun's processes, nodes, backend
    command: str | None = None
    dataset: str | None = None
    data: str | None = None  # the data's root or folder
    data_version: str | None = None  # a packed dataset's version (data.dataset: shards), as resolved when the run started
    skipped: list[SkippedFile] | None = None  # files left out as unreadable (data.on_unreadable: skip), every one
    init_from: InitFromRecord | None = None  # model.init_from: the weights the run started from
    pretrained: list[str] | None = None  # its pretrained backbones' weights: which, from which file
    params: Count | None = None
    trainable_params: Count | None = None
    epochs: Epochs | None = None
    best: Best | None = None
    last: dict[str, Any] | None = None  # the last epoch's metrics row
    test: TestFigures | None = None
    stopped_early: bool | None = None
    error: str | None = None
    compressed: dict[str, Any] | None = None  # made by fcclass compress: from which run, and the change


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def git_state(folder: Path | None = None) -> dict[str, Any] | None:
    """The commit and dirty flag of the git working tree around ``folder`` (default: the current one), or None
    outside a repository or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=folder or Path.cwd(), capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        root = git("rev-parse", "--show-toplevel")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty, "root": root}


# ----------------------------------------------------------------------------- reading and writing
def read_summary(run_dir: str | Path | None) -> Summary | None:
    """A run's summary.json, or None when it has none (runs from before fcclass wrote it) or it is damaged (not JSON,
    a key of the wrong type, not a regular file, huge): such a run is described as if it had none."""
    if run_dir is None:
        return None
    try:
        return read_record(Path(run_dir) / SUMMARY, Summary, LIMIT)
    except DamagedRecord:
        return None


def write_summary(run_dir: str | Path, summary: Summary) -> None:
    """Atomically; raises OSError (or ValueError for a value JSON cannot hold)."""
    write_record(Path(run_dir) / SUMMARY, summary)


def lock_is_held(run_dir: Path) -> bool:
    """Whether a process holds the run's lock right now (it is training the run). A lock path that is not a regular
    file (a FIFO, a folder) is not opened as one: no process can hold it, so the answer is no, at once."""
    import fcntl

    from fcclass.files import open_regular

    try:
        fd = open_regular(Path(run_dir) / LOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases the lock if it was taken
    return False


def live_state(run_dir: Path, summary: Summary) -> str:
    """The state a run is in now: a record that says running, of a run whose lock is free, was killed."""
    state = summary.state if summary.state in STATES else "failed"
    if state == "running" and not lock_is_held(run_dir):
        return "interrupted"
    return state


def program_name(argv0: str) -> str:
    """How the command was started, as the user would type it (``python -m fcclass`` and torchrun's processes show
    the package's __main__.py)."""
    name = os.path.basename(argv0)
    return "fcclass" if name == "__main__.py" else name


def command_line(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The command as the user typed it, for the run record (at most 500 characters): ``fcclass`` and its arguments,
    quoted as a shell needs them. The processes that ``train --nproc-per-node N`` starts through torchrun get the
    arguments rebuilt, without that option: they record the launching command, which it leaves in LAUNCH_COMMAND."""
    launched = (os.environ if environ is None else environ).get(LAUNCH_COMMAND)
    if launched:
        return launched[:500]
    argv = sys.argv if argv is None else argv
    return shlex.join([program_name(argv[0]), *argv[1:]])[:500]
