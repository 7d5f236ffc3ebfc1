"""`fcclass sweep`: hyperparameter search on Optuna. Optuna keeps the study (its storage: a SQLite file in the sweep
folder by default, any RDB URL or a journal file shared by several machines), proposes the trials (grid, random or
TPE sampler) and stops the bad ones (median or Hyperband pruner); fcclass turns each proposal into a config,
validates it, and trains it as a normal run in the sweep folder, reporting the metric after every epoch.

Reproducible: trial n's sampler is seeded from (seed, n), so the same command proposes the same trials, also when a
rerun continues a study. Resumable: a rerun continues to N trials; a trial whose process died (same host, its pid
gone) is marked failed and its parameters queued again. Parallel: K worker processes share the study, each with
cores/K threads; several machines share it through --storage. Exactly N trials count: a worker whose trial number
lands past N marks that trial surplus without training it."""

from __future__ import annotations

import copy
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from fcclass.config.load import config_from_dict
from fcclass.config.sections import Config
from fcclass.config.sweep import Param, SweepConfig, parse_param
from fcclass.data.loaders import epoch_seed
from fcclass.errors import ConfigError, FcclassError
from fcclass.training.callbacks import Callback


@dataclass
class Sweep:
    base: dict[str, Any]  # the resolved config, without its sweep section
    params: list[Param]
    opts: SweepConfig
    folder: Path

    @property
    def name(self) -> str:
        return self.opts.study or self.base["name"]

    @property
    def direction(self) -> str:
        return "minimize" if self.opts.metric.endswith("loss") else "maximize"


def plan(cfg: Config, cli_params: list[str], cli: dict[str, Any], folder: str | Path | None, status: bool = False) -> Sweep:
    """The sweep a command describes: the config's sweep section with the command line's values on top, every
    trial config it can produce checked before any training starts. ``status``: only to look at an existing study,
    whose search space and trial count it recorded (no parameters needed)."""
    section = cfg.sweep.model_dump() if cfg.sweep is not None else {}
    for item in cli_params:
        key, sep, spec = item.partition("=")
        if not sep:
            raise ConfigError(f"--param '{item}' must look like KEY=SPEC, e.g. --param optimizer.lr=loguniform(1e-4,1e-2).")
        section.setdefault("params", {})[key.strip()] = spec
    section.update({k: v for k, v in cli.items() if v is not None})
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise FcclassError("fcclass sweep needs Optuna: pip install 'fcclass[sweep]'.") from None
    try:
        opts = SweepConfig.model_validate(section)
    except ValidationError as e:
        raise ConfigError("The sweep settings are invalid: " + "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors())) from None
    params = [parse_param(k, v) for k, v in opts.params.items()]
    if not params and status:
        study = opts.study or cfg.name
        target = Path(folder) if folder is not None else Path(cfg.train.runs_dir) / f"sweep-{study}"
        base = cfg.to_dict()
        base.pop("sweep", None)
        return Sweep(base, [], opts, target.absolute())
    if not params:
        raise ConfigError("Nothing to sweep: give --param KEY=SPEC (e.g. --param optimizer.lr=loguniform(1e-4,1e-2)) or a "
                          "sweep: {params: ...} section in the config.")
    if opts.sampler == "grid" and any(p.kind != "choice" for p in params):
        raise ConfigError("--sampler grid needs every parameter as a list of values (e.g. 0.1,0.01), not a range.")
    if opts.sampler == "grid":  # a grid has as many trials as points; more would repeat them
        opts = opts.model_copy(update={"trials": min(opts.trials, math.prod(len(p.choices) for p in params))})
    base = cfg.to_dict()
    base.pop("sweep", None)
    for p in params:
        for value in p.candidates():
            trial_config(base, {p.key: value}, "check", Path("runs"), None, where=f"{p.key}={value!r}")
    study = opts.study or base["name"]
    target = Path(folder) if folder is not None else Path(base["train"]["runs_dir"]) / f"sweep-{study}"
    return Sweep(base, params, opts, target.absolute())


def trial_config(base: dict[str, Any], values: dict[str, Any], name: str, folder: Path, threads: int | None,
                 where: str | None = None) -> Config:
    from fcclass.config.sweep import _yaml

    raw = copy.deepcopy(base)
    items = [f"{key}={_yaml(value)}" for key, value in values.items()] + [f"name={name}", f"train.runs_dir={_yaml(str(folder))}"]
    if threads:
        items.append(f"train.threads={threads}")
    try:
        return config_from_dict(raw, source="the sweep's config", overrides=items)
    except ConfigError as e:
        raise ConfigError(f"Sweep parameter {where or values}: {e}") from None


# ----------------------------------------------------------------------------- Optuna pieces
def storage(sweep: Sweep) -> Any:
    import optuna

    url = sweep.opts.storage
    if url is None:
        sweep.folder.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{sweep.folder / 'study.db'}"
    try:
        if "://" in url:
            return _rdb(url)
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(url)))
    except Exception as e:  # noqa: BLE001 - a wrong URL, a driver missing, a server down: all are the user's to fix
        raise FcclassError(f"Cannot open the sweep storage '{url}': {str(e).splitlines()[0][:300]}. Give an Optuna RDB URL "
                           "(sqlite:///path.db, postgresql://user@host/db) or a journal file path.") from None


def _rdb(url: str) -> Any:
    """An RDB storage. Workers started together race to create its tables; the losers find them made and retry."""
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception:  # noqa: BLE001 - sqlalchemy's IntegrityError/OperationalError of the race; the last one is reported
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError  # pragma: no cover


def sampler(sweep: Sweep, number: int) -> Any:
    import optuna

    if sweep.opts.sampler == "grid":  # one seed for the whole study: it fixes which grid point each grid_id is
        return optuna.samplers.GridSampler({p.key: list(p.choices) for p in sweep.params},
                                           seed=epoch_seed(sweep.opts.seed, 0, "grid") % 2**32)
    seed = epoch_seed(sweep.opts.seed, number, "sweep") % 2**32
    if sweep.opts.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: trials still running count as bad results, so parallel workers do not all propose the same point
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, sweep.opts.trials // 4)), constant_liar=True)


def pruner(sweep: Sweep) -> Any:
    import optuna

    if sweep.opts.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)  # every trial trains 2 epochs at least
    if sweep.opts.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=int(sweep.base["train"]["epochs"]))
    return optuna.pruners.NopPruner()


def open_study(sweep: Sweep) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not sweep.params:  # --status alone: the study as it was recorded
        return _recorded_study(sweep)
    study = optuna.create_study(storage=storage(sweep), study_name=sweep.name, direction=sweep.direction,
                                pruner=pruner(sweep), load_if_exists=True)
    study.set_user_attr("trials", sweep.opts.trials)
    space = {p.key: p.describe() for p in sweep.params}
    recorded = study.user_attrs.get("space")
    if recorded is None:
        study.set_user_attr("space", space)
        study.set_user_attr("metric", sweep.opts.metric)
    elif recorded != space or study.user_attrs.get("metric") != sweep.opts.metric:
        raise FcclassError(f"The study '{sweep.name}' in this storage searched {recorded} for {study.user_attrs.get('metric')}; "
                           f"this command searches {space} for {sweep.opts.metric}. Name a new study with --study NAME "
                           "(or another --sweep-dir) to search something else.")
    return study


def _recorded_study(sweep: Sweep) -> Any:
    import optuna

    if sweep.opts.storage is None and not (sweep.folder / "study.db").is_file():
        raise FcclassError(f"No sweep '{sweep.name}' in {sweep.folder} (no study.db). Run it first, or name it with --study / "
                           "--sweep-dir / --storage.")
    try:
        study = optuna.load_study(study_name=sweep.name, storage=storage(sweep))
    except KeyError:
        raise FcclassError(f"No sweep '{sweep.name}' in {sweep.opts.storage or sweep.folder / 'study.db'}. Run it first, or name "
                           "it with --study / --sweep-dir / --storage.") from None
    attrs = study.user_attrs
    sweep.params = [Param(key, "choice", choices=(spec,)) for key, spec in (attrs.get("space") or {}).items()]
    sweep.opts = sweep.opts.model_copy(update={"metric": attrs.get("metric", sweep.opts.metric),
                                               "trials": attrs.get("trials", sweep.opts.trials)})
    return study


def suggest(trial: Any, p: Param) -> Any:
    if p.kind == "choice":
        return trial.suggest_categorical(p.key, list(p.choices))
    if p.kind == "int":
        return trial.suggest_int(p.key, int(p.low), int(p.high))
    return trial.suggest_float(p.key, p.low, p.high, log=p.kind == "loguniform")


# ----------------------------------------------------------------------------- which trials count
def counts(trial: Any) -> bool:
    """A trial that counts toward N: not surplus, not replaced by a retry, and asked already."""
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    return trial.state != TrialState.WAITING and not attrs.get("surplus") and not attrs.get("retried")


def recover_dead(study: Any) -> int:
    """Trials left running by a process of this host that no longer exists: marked failed and queued again."""
    from optuna.trial import TrialState

    host, recovered = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None or _alive(int(pid)):
            continue
        study._storage.set_trial_user_attr(t._trial_id, "retried", True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        recovered += 1
    return recovered


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ReportEpochs(Callback):
    """Reports the sweep's metric to Optuna after every epoch; ends the trial's training when the pruner says so."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def on_fit_start(self, trainer: Any) -> None:
        self.trial.set_user_attr("run_dir", str(trainer.run_dir))

    def on_epoch_end(self, trainer: Any, row: dict[str, Any], is_best: bool) -> None:
        value = row.get(self.metric, row.get(self.metric.replace("val_", "train_")))
        if value is None:
            return
        self.trial.report(float(value), row["epoch"])
        if row["epoch"] < trainer.cfg.train.epochs and self.trial.should_prune():  # at the last epoch, nothing is saved
            trainer.stopped_by = "pruned"


# ----------------------------------------------------------------------------- the worker loop
def work(sweep: Sweep, threads: int | None, on_trial: Callable[[Any], None] | None = None) -> None:
    """Run trials of the study until N count, in this process."""
    from optuna.trial import TrialState

    study = open_study(sweep)
    recover_dead(study)
    while True:
        if sum(counts(t) for t in study.get_trials(deepcopy=False)) >= sweep.opts.trials:
            return
        study.sampler = sampler(sweep, len(study.get_trials(deepcopy=False)))
        trial = study.ask()
        study.sampler = sampler(sweep, trial.number)  # the suggestions below: seeded by the trial's own number, which
        # the storage hands out once, so two workers asking at the same moment never share a seed
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        ahead = sum(counts(t) for t in study.get_trials(deepcopy=False) if t.number < trial.number)
        if ahead >= sweep.opts.trials:  # another worker took the last place first
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            return
        values = {p.key: suggest(trial, p) for p in sweep.params}
        state, value = _train(sweep, trial, values, threads)
        try:
            study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        except RuntimeError as e:  # the grid sampler calls study.stop() when the grid is done, which only works inside
            if "Study.stop" not in str(e):  # study.optimize; the trial's state is stored before that (optuna's tell)
                raise
        if on_trial is not None:
            on_trial(study.trials[trial.number])


def _train(sweep: Sweep, trial: Any, values: dict[str, Any], threads: int | None) -> tuple[Any, float | None]:
    from optuna.trial import TrialState

    from fcclass.training.fit import fit

    started = time.monotonic()
    try:
        cfg = trial_config(sweep.base, values, f"trial-{trial.number:04d}", sweep.folder, threads)
        result = fit(cfg, callbacks=[ReportEpochs(trial, sweep.opts.metric)])
    except FcclassError as e:
        trial.set_user_attr("error", str(e)[:500])
        return TrialState.FAIL, None
    finally:
        trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
    if result.interrupted:
        raise KeyboardInterrupt
    best = result.best or {}
    value = best.get(sweep.opts.metric, best.get(sweep.opts.metric.replace("val_", "train_")))
    trial.set_user_attr("epochs", len(result.history))
    if result.stopped_by == "pruned":
        return TrialState.PRUNED, None
    return (TrialState.COMPLETE, float(value)) if value is not None else (TrialState.FAIL, None)
