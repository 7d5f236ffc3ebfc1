"""The run record: RUN_DIR/summary.json, one small machine-readable file with everything about a run — what was
trained, where, with which code and versions, how long, how far it got and how well it did. Written atomically by a
trainer callback at the start, after every epoch and at the end; `fcclass runs` lists runs from these files alone.

A run whose process was killed cannot say so: its record still reads "running". Readers tell it apart by the run's
lock (RUN_DIR/.lock, held by the training process for as long as it lives): a "running" run whose lock is free was
killed, and is shown as interrupted."""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    pass

SUMMARY = "summary.json"
FORMAT = 1
STATES = ("running", "finished", "interrupted", "failed", "pruned")


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


# ----------------------------------------------------------------------------- reading
def read_summary(run_dir: str | Path | None) -> dict[str, Any] | None:
    """A run's summary.json, or None when it has none (runs from before fcclass wrote it) or it is unreadable."""
    if run_dir is None:
        return None
    try:
        data = json.loads((Path(run_dir) / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def lock_is_held(run_dir: Path) -> bool:
    """Whether a process holds the run's lock right now (it is training the run)."""
    import fcntl

    try:
        with open(Path(run_dir) / ".lock") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def live_state(run_dir: Path, summary: dict[str, Any]) -> str:
    """The state a run is in now: a record that says running, of a run whose lock is free, was killed."""
    state = summary.get("state") if summary.get("state") in STATES else "failed"
    if state == "running" and not lock_is_held(run_dir):
        return "interrupted"
    return state


def _program(argv0: str) -> str:
    """How the command was started, as the user would type it (``python -m fcclass`` and torchrun's processes show
    the package's __main__.py)."""
    name = os.path.basename(argv0)
    return "fcclass" if name == "__main__.py" else name
