"""What `fcclass sweep` checks before it writes or trains anything: that the sweep folder can be made, that the
storage is one a study can live in (a file on disk, not a database in memory that ends with the process; an Optuna
SQLite file or journal, never a file of something else, which it would write into; never a FIFO or a device, which
it would block on), and that the workers fit this machine's cores and memory."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from pathlib import Path

from fcclass import memory
from fcclass.errors import FcclassError, ModelError
from fcclass.experiments.sweep import Sweep, storage_url, trial_config
from fcclass.files import RunWriteError, open_regular
from fcclass.memory import human, model_bytes, network_sizes

WORKER_BYTES = 800_000_000  # a worker process before its model: Python, PyTorch, Optuna, a small dataset (measured ~0.9 GB)
SQLITE_MAGIC = b"SQLite format 3\x00"
OPTUNA_TABLES = frozenset({"studies", "trials", "version_info"})


def check_storage(sweep: Sweep) -> None:
    """Raise FcclassError, before anything is written, when the sweep's folder or storage cannot hold the study."""
    check_folder(sweep.folder)
    url = storage_url(sweep)
    if "://" not in url:
        _check_journal(Path(url))
    elif url.split(":", 1)[0].split("+")[0] == "sqlite":
        _check_sqlite(url)


def check_folder(folder: Path) -> None:
    """The sweep folder (the trials' runs, study.db by default): a folder, or one that can be made where it is asked."""
    for place in (folder, *folder.parents):
        try:
            mode = os.stat(place).st_mode
        except (FileNotFoundError, NotADirectoryError):  # not there yet, or under a file (found as the walk goes up)
            continue
        except OSError as e:
            raise RunWriteError(f"Cannot make the sweep folder '{folder}': {place}: {e.strerror}. Give another --sweep-dir.") from None
        if not stat.S_ISDIR(mode):
            raise RunWriteError(f"Cannot make the sweep folder '{folder}': '{place}' is a file, not a folder. Give another "
                                "--sweep-dir (or train.runs_dir).")
        if not os.access(place, os.W_OK | os.X_OK):
            raise RunWriteError(f"Cannot make the sweep folder '{folder}': '{place}' is not writable (read-only, or not yours). "
                                "Run from a folder you can write to, or give --sweep-dir (or train.runs_dir) somewhere writable.")
        return


def _head(path: Path, what: str, size: int) -> bytes | None:
    """The first ``size`` bytes of the storage file at ``path``; None when there is none yet (or it is empty)."""
    kind = _kind(path)
    if kind is not None:
        raise _not_storage(path, f"is {kind}, not {what}")
    if not path.exists() or path.stat().st_size == 0:
        return None
    with os.fdopen(open_regular(path), "rb") as f:  # a regular file only: never waits on a FIFO swapped in meanwhile
        return f.read(size)


def _kind(path: Path) -> str | None:
    """None for a missing path or a regular file (symlinks followed), else what it is."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"unreachable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    return "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or other special file"


def _not_storage(path: Path, what: str) -> FcclassError:
    return FcclassError(f"The sweep storage '{path}' {what}; fcclass never writes into a file that is not a study storage. "
                        "Give a new file (sqlite:///path/study.db, or a journal file path) or an existing study's.")


def _check_sqlite(url: str) -> None:
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception as e:  # noqa: BLE001 - sqlalchemy's ArgumentError: the URL's own fault
        raise FcclassError(f"The sweep storage '{url}' is not a valid URL: {e}. Give sqlite:///path/study.db.") from None
    db = parsed.database or ""
    if db in ("", ":memory:") or parsed.query.get("mode") == "memory" or db.startswith("file::memory:"):
        raise FcclassError(f"The sweep storage '{url}' is a database in memory, which ends with the process: no trial "
                           "would be kept. Give a file: --storage sqlite:///path/study.db (or leave --storage out: "
                           "SWEEP_DIR/study.db).")
    path = Path(db.removeprefix("file:").split("?")[0])
    head = _head(path, "an SQLite file", len(SQLITE_MAGIC))
    if head is None:
        return
    if head != SQLITE_MAGIC:
        raise _not_storage(path, "is not an SQLite database")
    tables = _tables(path)
    deadline = time.monotonic() + 3
    while tables & OPTUNA_TABLES and not OPTUNA_TABLES <= tables and time.monotonic() < deadline:
        time.sleep(0.2)  # another worker is creating the study's tables right now (seen half made in CI)
        tables = _tables(path)
    if tables and not OPTUNA_TABLES <= tables:
        raise _not_storage(path, "is an SQLite database of something else (tables: " + ", ".join(sorted(tables)[:8]) + ")")


def _tables(path: Path) -> set[str]:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            return {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as e:
        raise _not_storage(path, f"cannot be read as an SQLite database ({e})") from None


def _check_journal(path: Path) -> None:
    head = _head(path, "a journal file", 1 << 16)
    if head is None:
        return
    first = head.split(b"\n", 1)[0]
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if not isinstance(record, dict) or "op_code" not in record:
        raise _not_storage(path, "is not an Optuna journal file (its first line is not a journal record)")


# ----------------------------------------------------------------------------- workers
def check_workers(sweep: Sweep) -> None:
    """More workers than cores spin against each other and each holds a whole process's memory: refused unless
    --oversubscribe; and the workers' memory, planned from the largest trial, must fit in what is free."""
    workers, cores = sweep.opts.workers, memory.cores()
    if workers <= 1:
        return
    if workers > cores and not sweep.opts.oversubscribe:
        raise FcclassError(f"--workers {workers} runs {workers} trials at once, but this machine gives fcclass {cores} core(s): "
                           f"they would slow each other down, and each holds a process's memory. Give --workers {cores} or "
                           "fewer, or add --oversubscribe to run them anyway.")
    per = WORKER_BYTES + largest_trial_bytes(sweep)
    free, how = memory.available()
    if workers * per > free * memory.HEADROOM:
        fits = int(free * memory.HEADROOM // per)
        fix = f"Give --workers {fits} or fewer." if fits >= 1 else "Lower data.batch_size or the model's size."
        raise ModelError(f"{workers} sweep workers need about {human(workers * per)} ({human(per)} each: the process, PyTorch, "
                         f"the data and the largest trial's model at its batch size), but {human(free)} is {how}. {fix}")


def largest_trial_bytes(sweep: Sweep) -> int:
    """What training the hungriest trial's model needs (memory.model_bytes): each searched value on the base config,
    as the plan checked them. 0 for datasets whose shape needs reading the images (an image folder)."""
    from fcclass.config.registries import DATASETS, TorchvisionSet
    from fcclass.data import describe
    from fcclass.model.network import build_model

    largest = 0
    values = [{}] + [{p.key: v} for p in sweep.params for v in p.candidates()]
    for value in values:
        cfg = trial_config(sweep.base, value, "check", sweep.folder, None)
        if not isinstance(DATASETS[cfg.data.dataset], TorchvisionSet):
            return 0
        shape, classes = describe(cfg.data)
        try:
            params, total, _ = network_sizes(build_model(cfg.model, list(shape), classes, device="meta"))
        except FcclassError:  # a model whose shapes do not fit: that trial fails with its own message, as with one worker
            continue
        largest = max(largest, model_bytes(params, total, cfg.data.batch_size, training=True))
    return largest
