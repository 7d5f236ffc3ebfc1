"""Running a sweep: K worker processes sharing the study, progress lines as trials finish, the leaderboard and the
best config as a YAML file that `fcclass train -c` reproduces."""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from fcclass.config.yaml_load import parse_yaml
from fcclass.errors import FcclassError
from fcclass.experiments.sweep import Sweep, counts, open_study, work


@dataclass
class Entry:
    number: int
    state: str  # complete, pruned, fail, running
    value: float | None
    params: dict[str, Any]
    epochs: int | None
    seconds: float | None
    run_dir: str | None
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def entry(t: Any) -> Entry:
    a = t.user_attrs
    return Entry(t.number, t.state.name.lower(), t.value, dict(t.params), a.get("epochs"), a.get("seconds"), a.get("run_dir"),
                 a.get("error"))


def leaderboard(study: Any, direction: str) -> list[Entry]:
    """The trials that count, the completed ones best first, then the pruned, failed and running ones."""
    rows = [entry(t) for t in study.get_trials(deepcopy=False) if counts(t)]
    sign = -1.0 if direction == "maximize" else 1.0
    order = {"complete": 0, "pruned": 1, "running": 2, "fail": 3}
    return sorted(rows, key=lambda e: (order.get(e.state, 4), sign * e.value if e.value is not None else 0.0, e.number))


def threads_per_worker(workers: int) -> int | None:
    """cores / K threads for each of K workers (more busy threads than cores spin against each other)."""
    if workers <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // workers)


def run(sweep: Sweep, on_trial: Callable[[Entry], None]) -> Any:
    """Run the study to N trials with sweep.opts.workers processes; returns the study."""
    workers = sweep.opts.workers
    if workers == 1:
        work(sweep, None, lambda t: on_trial(entry(t)))
        return open_study(sweep)
    threads = threads_per_worker(workers)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no OpenMP pool or torch state inherited
    env = {"OMP_NUM_THREADS": str(threads)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        procs = [ctx.Process(target=_worker, args=(sweep, threads), daemon=True) for _ in range(workers)]
        for p in procs:
            p.start()
        _follow(sweep, procs, on_trial)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    failed = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if failed:
        raise FcclassError(f"{len(failed)} of {workers} sweep worker(s) stopped with an error (exit status {failed[0]}); the "
                           "trials they finished are kept. Rerun the command to continue the study.")
    return open_study(sweep)


def _worker(sweep: Sweep, threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or 1)
    try:
        work(sweep, threads)
    except KeyboardInterrupt:
        pass


def _follow(sweep: Sweep, procs: list[Any], on_trial: Callable[[Entry], None]) -> None:
    """Print each trial as it finishes, until every worker is done."""
    study = open_study(sweep)
    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}  # a rerun: only the new ones
    try:
        while True:
            alive = any(p.is_alive() for p in procs)
            for t in study.get_trials(deepcopy=False):
                if t.number not in seen and counts(t) and t.state.is_finished():
                    seen.add(t.number)
                    on_trial(entry(t))
            if not alive:
                return
            time.sleep(1.0)
    except KeyboardInterrupt:
        for p in procs:
            p.join(30)
        raise


def write_best(sweep: Sweep, board: list[Entry]) -> Path | None:
    """The best trial's config (as it trained: its parameters, seed and threads) as SWEEP_DIR/best.yaml, named after
    the sweep and writing its runs where the original config does."""
    from fcclass.files import atomic_write_text

    best = next((e for e in board if e.state == "complete" and e.run_dir), None)
    if best is None:
        return None
    raw = parse_yaml((Path(best.run_dir) / "config.yaml").read_text(encoding="utf-8"), str(Path(best.run_dir) / "config.yaml"))
    raw["name"] = f"{sweep.base['name']}-best"
    raw["train"]["runs_dir"] = sweep.base["train"]["runs_dir"]
    raw.pop("sweep", None)
    path = sweep.folder / "best.yaml"
    header = (f"# The best trial ({best.number}) of sweep '{sweep.name}': {sweep.opts.metric} {best.value:.4f} with "
              + ", ".join(f"{k}={v}" for k, v in best.params.items()) + ".\n# Reproduce it with: fcclass train -c " + str(path) + "\n")
    atomic_write_text(path, header + yaml.safe_dump(raw, sort_keys=False))
    return path
