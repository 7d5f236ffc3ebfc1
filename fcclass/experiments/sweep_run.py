"""Running a sweep: worker processes that run the study's trials in Optuna's optimize loop, progress lines as trials
finish, the leaderboard and the best config as a YAML file that `fcclass train -c` reproduces.

Exactly N trials count: every trial but the surplus ones and those run again. A failed trial (it diverged, an error)
counts, with its reason. A trial whose worker was interrupted (Ctrl-C, SIGTERM) or lost (killed, its machine gone:
on an RDB storage its heartbeat stops) fails and is queued again with its parameters, and its retry counts in its
place. A worker stops when N trials are complete or pruned (Optuna's MaxTrialsCallback), or when every place is
taken and nothing runs any more: with a heartbeat it waits for the trials still running elsewhere first, so that it
runs again any whose worker is lost. A trial asked when every place was already taken is marked surplus, untrained."""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from fcclass.errors import FcclassError
from fcclass.experiments.sweep import ReportEpochs, Sweep, is_rdb, open_study, suggest, trial_config, worker_study
from fcclass.runs.metrics import monitor_value


@dataclass
class Entry:
    number: int
    state: str  # complete, pruned, fail, running, waiting
    value: float | None
    params: dict[str, Any]
    epochs: int | None
    seconds: float | None
    run_dir: str | None
    fail_reason: str | None
    metric: str | None  # what value is: the sweep's metric, or train_* standing in for it without a validation split
    retry_of: int | None  # the trial it runs again, with the same parameters

    def to_dict(self) -> dict[str, Any]:
        # "error": the key --json gave the reason under before fail_reason; kept so that scripts reading it still work
        return dict(self.__dict__) | {"error": self.fail_reason}


def entry(t: Any) -> Entry:
    a = t.user_attrs
    state = t.state.name.lower()
    reason = a.get("fail_reason") or a.get("error") or ("its worker stopped without finishing it (killed, or its machine lost)"
                                      if state == "fail" else None)
    return Entry(t.number, state, t.value, dict(t.params), a.get("epochs"), a.get("seconds"), a.get("run_dir"), reason,
                 a.get("metric"), t.system_attrs.get("failed_trial"))


def counting(trials: list[Any]) -> list[Any]:
    """The trials that count toward N: all but the surplus ones and those a retry runs again (the retry counts in
    their place, a queued one already)."""
    replaced = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return [t for t in trials if t.number not in replaced and not t.user_attrs.get("surplus")]


def leaderboard(study: Any, direction: str) -> list[Entry]:
    """The trials that count, the completed ones best first, then the pruned, running, queued and failed ones."""
    rows = [entry(t) for t in counting(study.get_trials(deepcopy=False))]
    sign = -1.0 if direction == "maximize" else 1.0
    order = {"complete": 0, "pruned": 1, "running": 2, "waiting": 3, "fail": 4}
    return sorted(rows, key=lambda e: (order.get(e.state, 5), sign * e.value if e.value is not None else 0.0, e.number))


# ----------------------------------------------------------------------------- a worker
class Surplus(Exception):
    """A trial asked when every place was taken: Optuna fails it, untrained, and it does not count."""


class Objective:
    """One trial, as Optuna's optimize loop calls it: a place among the N, the parameters, a training run."""

    def __init__(self, sweep: Sweep, threads: int | None) -> None:
        self.sweep, self.threads, self.number = sweep, threads, None

    def __call__(self, trial: Any) -> float:
        import optuna

        self.number = trial.number
        if "host" in trial.user_attrs:  # a retry: Optuna copied its original's attributes
            for key in ("run_dir", "epochs", "metric", "seconds"):
                trial.set_user_attr(key, None)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        ahead = [t for t in counting(trial.study.get_trials(deepcopy=False)) if t.number < trial.number]
        if len(ahead) >= self.sweep.opts.trials:  # another worker took the last place first
            trial.set_user_attr("surplus", True)
            raise Surplus(f"trial {trial.number}: all {self.sweep.opts.trials} places are taken")
        values = {p.key: suggest(trial, p) for p in self.sweep.params}
        started = time.monotonic()
        try:
            return self.train(trial, values)
        except optuna.TrialPruned:
            raise
        except Exception as e:
            trial.set_user_attr("fail_reason", str(e) if isinstance(e, FcclassError) else f"{type(e).__name__}: {e}")
            run_dir = trial.user_attrs.get("run_dir")
            if run_dir and not Path(run_dir).exists():  # failed before its first epoch: the trainer removed it
                trial.set_user_attr("run_dir", None)
            raise
        finally:
            trial.set_user_attr("seconds", round(time.monotonic() - started, 1))

    def train(self, trial: Any, values: dict[str, Any]) -> float:
        import optuna

        from fcclass.training.fit import fit

        metric = self.sweep.opts.metric
        cfg = trial_config(self.sweep.base, values, f"trial-{trial.number:04d}", self.sweep.folder, self.threads)
        result = fit(cfg, callbacks=[ReportEpochs(trial, metric)])
        if result.interrupted:
            raise KeyboardInterrupt
        if result.stopped_by == "pruned":
            raise optuna.TrialPruned()
        value = monitor_value(result.best or {}, metric)
        if value is None or not math.isfinite(value):
            raise FcclassError(f"The best epoch's {trial.user_attrs.get('metric') or metric} is {value}.")
        return float(value)


def work(sweep: Sweep, threads: int | None, on_trial: Callable[[Any], None] | None = None) -> None:
    """Run trials of the study in this process (Optuna's optimize loop) until N count; ``on_trial`` sees each one
    this process finished."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    study = worker_study(sweep)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial's reason is recorded (fail_reason) and shown
    objective = Objective(sweep, threads)

    def after(study: Any, trial: Any) -> None:
        if on_trial is not None and not trial.user_attrs.get("surplus"):
            on_trial(trial)
        if not has_work(study, sweep):
            study.stop()

    if not has_work(study, sweep):
        return
    try:  # catch: a trial's error fails that trial only (with its reason); the study goes on
        study.optimize(objective, catch=(Exception,), callbacks=[
            MaxTrialsCallback(sweep.opts.trials, states=(TrialState.COMPLETE, TrialState.PRUNED)), after])
    except KeyboardInterrupt:
        _run_again(study, objective.number)
        raise


def has_work(study: Any, sweep: Sweep) -> bool:
    """Whether a trial is left to run: a free place among the N, or a trial queued to run again. While every place
    is taken but trials still run (in any worker, on any machine), wait for them on a storage with a heartbeat: a
    trial whose worker is lost goes stale, Optuna fails it and queues it again, and this worker runs it."""
    import optuna
    from optuna.trial import TrialState

    beat = sweep.opts.heartbeat if is_rdb(sweep) else None
    while True:
        places = counting(study.get_trials(deepcopy=False))
        if len(places) < sweep.opts.trials or any(t.state == TrialState.WAITING for t in places):
            return True
        if not beat or not any(t.state == TrialState.RUNNING for t in places):
            return False
        time.sleep(min(1.0, beat))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def _run_again(study: Any, number: int | None) -> None:
    """The trial a Ctrl-C or SIGTERM interrupted (Optuna failed it) is queued to run again with its parameters, as
    the heartbeat does for a lost worker's trial; its retry counts in its place."""
    import optuna
    from optuna.trial import TrialState

    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is None or trial.state != TrialState.FAIL or trial.user_attrs.get("surplus") or trial.user_attrs.get("fail_reason"):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback()(study, copy.deepcopy(trial))


# ----------------------------------------------------------------------------- the command's processes
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
            for t in counting(study.get_trials(deepcopy=False)):
                if t.number not in seen and t.state.is_finished():
                    seen.add(t.number)
                    on_trial(entry(t))
            if not alive:
                return
            time.sleep(1.0)
    except KeyboardInterrupt:
        for p in procs:
            p.join(30)
        raise


def write_best(sweep: Sweep, board: list[Entry]) -> tuple[Path | None, str | None]:
    """The best trial's config (as it trained: its parameters, seed and threads) as SWEEP_DIR/best.yaml, named after
    the sweep and writing its runs where the original config does; or None and why not, where the best trial's run
    was deleted or damaged since, or the file cannot be written (the leaderboard does not need it)."""
    from fcclass.files import atomic_write_text, os_error_reason
    from fcclass.runs.checkpoint import run_config

    best = next((e for e in board if e.state == "complete" and e.run_dir), None)
    if best is None:
        return None, None
    try:
        raw = run_config(best.run_dir).to_dict()  # the run's config.yaml, read and validated by the run directory's owner
    except FcclassError as e:
        return None, (f"The best trial ({best.number})'s run cannot give its config, so best.yaml is not written: {e} "
                      "(Its parameters are in the leaderboard.)")
    raw["name"] = f"{sweep.base['name']}-best"
    raw["train"]["runs_dir"] = sweep.base["train"]["runs_dir"]
    raw.pop("sweep", None)
    path = sweep.folder / "best.yaml"
    header = (f"# The best trial ({best.number}) of sweep '{sweep.name}': {best.metric or sweep.opts.metric} {best.value:.4f} "
              "with " + ", ".join(f"{k}={v}" for k, v in best.params.items()) + ".\n# Reproduce it with: fcclass train -c "
              + str(path) + "\n")
    try:
        atomic_write_text(path, header + yaml.safe_dump(raw, sort_keys=False))
    except (OSError, FcclassError) as e:
        reason = os_error_reason(e) if isinstance(e, OSError) else str(e)
        return None, f"The best config could not be written to {path}: {reason}."
    return path, None
