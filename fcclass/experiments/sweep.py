"""`fcclass sweep`: hyperparameter search on Optuna. Optuna keeps the study (its storage: a SQLite file in the sweep
folder by default, any RDB URL or a journal file shared by several machines), proposes the trials (grid, random or
TPE sampler) and stops the bad ones (median or Hyperband pruner); fcclass turns each proposal into a config,
validates it, and trains it as a normal run in the sweep folder, reporting the metric after every epoch.

Reproducible: trial n's sampler is seeded from (seed, n), so the same command proposes the same trials, also when a
rerun continues a study. This module plans the sweep and makes its Optuna pieces (storage, samplers, pruner, study);
fcclass.experiments.sweep_run runs its workers (Optuna's optimize loop, with a heartbeat on RDB storages)."""

from __future__ import annotations

import copy
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fcclass.config.load import config_from_dict
from fcclass.config.sections import Config
from fcclass.config.sweep import MAX_GRID, Param, SweepConfig, parse_param
from fcclass.data.loaders import epoch_seed
from fcclass.errors import ConfigError, FcclassError
from fcclass.runs.metrics import monitor_value
from fcclass.training.callbacks import Callback


@dataclass
class Sweep:
    base: dict[str, Any]  # the resolved config, without its sweep section
    params: list[Param]
    opts: SweepConfig
    folder: Path
    notes: list[str] = field(default_factory=list)  # what the sweep changed in the config, and why

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
    if status:  # the recorded study, as it was recorded (its space and N): nothing is created
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
        points = math.prod(len(p.choices) for p in params)
        if points > MAX_GRID:  # Optuna's grid sampler lists every point in memory: a billion of them end in a MemoryError
            raise ConfigError(f"The grid has {points:,} points (" + " x ".join(f"{len(p.choices):,} values of {p.key}" for p in params)
                              + f"), more than the {MAX_GRID:,} a sweep can run. Give fewer values, or search with --sampler "
                              "random or tpe (a range such as loguniform(1e-4,1e-2) needs no list of values).")
        opts = opts.model_copy(update={"trials": min(opts.trials, points)})
    base = cfg.to_dict()
    base.pop("sweep", None)
    notes = _searched_batch(base, params)
    for p in params:
        for value in p.candidates():
            trial_config(base, {p.key: value}, "check", Path("runs"), None, where=f"{p.key}={value!r}")
    study = opts.study or base["name"]
    target = Path(folder) if folder is not None else Path(base["train"]["runs_dir"]) / f"sweep-{study}"
    return Sweep(base, params, opts, target.absolute(), notes)


def _searched_batch(base: dict[str, Any], params: list[Param]) -> list[str]:
    """A searched data.batch_size is the batch each trial trains with: the short-run plan (train.short_run_steps), which
    would make every short trial's batch the same, is turned off for the sweep, and the note says so."""
    steps = base["train"].get("short_run_steps")
    if not steps or not any(p.key == "data.batch_size" for p in params):
        return []
    base["train"]["short_run_steps"] = 0
    return [f"data.batch_size is searched, so each trial trains at the batch it draws: train.short_run_steps ({steps}) is "
            f"set to 0 for this sweep (otherwise a trial under {steps} optimizer steps would halve its batch, and short "
            "trials would all train at the same one)."]


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
HEARTBEAT = 60  # seconds between a running trial's heartbeats by default; Optuna fails it after twice that without one
MAX_RETRIES = 2  # a trial whose worker is lost that often (killed for lack of memory each time?) fails for good
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "ceph", "fuse.ceph-fuse",
                                 "glusterfs", "fuse.glusterfs", "lustre", "gpfs", "beegfs", "afs", "ocfs2", "gfs2"})


def storage_url(sweep: Sweep) -> str:
    """The study's storage as given: an RDB URL or a journal file path (default: sqlite:///SWEEP_DIR/study.db)."""
    return sweep.opts.storage or f"sqlite:///{sweep.folder / 'study.db'}"


def is_rdb(sweep: Sweep) -> bool:
    return "://" in storage_url(sweep)


def storage(sweep: Sweep, worker: bool = False) -> Any:
    """The study's storage. ``worker``: for a process that runs trials, on an RDB storage: each running trial sends a
    heartbeat every sweep.opts.heartbeat seconds, and before each new trial Optuna fails the running trials silent for
    twice that (its default grace period: their worker was lost, on any machine) and queues their parameters again
    (RetryHeartbeatStaleTrialCallback). Optuna's journal storage has no heartbeat."""
    import optuna

    url = storage_url(sweep)
    if sweep.opts.storage is None:
        sweep.folder.mkdir(parents=True, exist_ok=True)
    try:
        if "://" in url:
            return _rdb(url, sweep.opts.heartbeat if worker else None)
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(url)))
    except Exception as e:  # noqa: BLE001 - a wrong URL, a driver missing, a server down: all are the user's to fix
        raise FcclassError(f"Cannot open the sweep storage '{url}': {str(e).splitlines()[0][:300]}. Give an Optuna RDB URL "
                           "(sqlite:///path.db, postgresql://user@host/db) or a journal file path.") from None


def _rdb(url: str, heartbeat: int | None) -> Any:
    """An RDB storage. Workers started together race to create its tables; the losers find them made and retry."""
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():  # the heartbeat and its retry callback are 'experimental' in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        beat: dict[str, Any] = {}
        if heartbeat:  # grace_period None: Optuna's default, twice the interval
            beat = {"heartbeat_interval": heartbeat, "grace_period": None,
                    "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRIES)}
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **beat)
            except Exception:  # noqa: BLE001 - sqlalchemy's IntegrityError/OperationalError of the race; the last one is reported
                if attempt == 4:
                    raise
                time.sleep(0.5 + attempt)
    raise AssertionError  # pragma: no cover


def network_filesystem(folder: Path, mounts: str) -> str | None:
    """The type of the network filesystem that ``folder`` (absolute, symlinks resolved) lies on, read from the text
    of /proc/mounts: the deepest mount point above it, the last one mounted there; None for a local filesystem."""
    point: Path | None = None
    kind = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))  # \040 is a space
        if (mount == folder or mount in folder.parents) and (point is None or len(mount.parts) >= len(point.parts)):
            point, kind = mount, fields[2]
    return kind if kind in NETWORK_FILESYSTEMS else None


def read_mounts() -> str:
    """The text of /proc/mounts ("" where there is none: not Linux)."""
    try:
        return Path("/proc/mounts").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def storage_warnings(sweep: Sweep) -> list[str]:
    """What to warn about the storage: a SQLite file on a network filesystem, --heartbeat with a journal file."""
    notes = []
    db = storage_url(sweep).removeprefix("sqlite:///").split("?")[0] if storage_url(sweep).startswith("sqlite:///") else ""
    if db not in ("", ":memory:"):
        kind = network_filesystem(Path(db).absolute().parent.resolve(), read_mounts())
        if kind is not None:
            notes.append(f"The sweep's SQLite file {db} is on a network filesystem ({kind}), where SQLite's locking is "
                         "unreliable: workers on several machines can corrupt the study. Across machines use a journal file "
                         "on the shared disk (--storage /shared/study.log) or an RDB server (--storage "
                         "postgresql://user@host/db); on one machine, a SQLite file on a local disk.")
    if sweep.opts.heartbeat is not None and not is_rdb(sweep):
        notes.append("--heartbeat has no effect on a journal storage (Optuna's has no heartbeat): a trial whose worker is "
                     "lost stays 'running' and is not run again. An RDB storage (sqlite:///... on one machine, "
                     "postgresql://... across machines) retries it.")
    return notes


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


def seeded_sampler(sweep: Sweep) -> Any:
    """The sampler of a worker's optimize loop: it hands each trial to sampler(sweep, the trial's number), made afresh,
    so trial n's proposals depend on (seed, n) only: not on the worker that runs it, nor on what ran before in this
    process (a rerun that continues a study proposes what an uninterrupted one would). The storage hands each number
    out once, so two workers asking at the same moment never share a seed."""
    from optuna.samplers import BaseSampler

    class Seeded(BaseSampler):
        number, current = -1, None

        def _for(self, trial: Any) -> Any:
            if trial.number != self.number:
                self.number, self.current = trial.number, sampler(sweep, trial.number)
            return self.current

        def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
            return self._for(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
            return self._for(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> Any:
            return self._for(trial).sample_independent(study, trial, name, distribution)

        def before_trial(self, study: Any, trial: Any) -> None:
            self._for(trial).before_trial(study, trial)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            self._for(trial).after_trial(study, trial, state, values)  # the grid sampler's study.stop() at the grid's end

    return Seeded()


def pruner(sweep: Sweep) -> Any:
    import optuna

    if sweep.opts.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)  # every trial trains 2 epochs at least
    if sweep.opts.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=int(sweep.base["train"]["epochs"]))
    return optuna.pruners.NopPruner()


def open_study(sweep: Sweep) -> Any:
    """The study, created or continued; checks that it searches what this command searches, and settles the heartbeat
    interval all its workers use (sweep.opts.heartbeat: None on a journal storage)."""
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
    if is_rdb(sweep):
        _agree_heartbeat(sweep, study)
    return study


def _agree_heartbeat(sweep: Sweep, study: Any) -> None:
    """All workers of a study beat at one interval (a worker that judged with a shorter grace period would fail the
    live trials of slower-beating ones): the first command records it, the others take it or must give the same."""
    recorded, wanted = study.user_attrs.get("heartbeat"), sweep.opts.heartbeat
    if recorded is None:
        recorded = wanted or HEARTBEAT
        study.set_user_attr("heartbeat", recorded)
    elif wanted is not None and wanted != recorded:
        raise FcclassError(f"The study '{sweep.name}' runs with --heartbeat {recorded}: all its workers must beat at the same "
                           f"interval (a worker judging by {wanted} s would fail the others' live trials, or miss lost ones "
                           f"late). Leave --heartbeat out, or give {recorded}.")
    sweep.opts = sweep.opts.model_copy(update={"heartbeat": recorded})


def worker_study(sweep: Sweep) -> Any:
    """The study as a worker runs trials of it: the heartbeat storage, the per-trial seeded sampler, the pruner."""
    import optuna

    open_study(sweep)  # checks and records the space, metric, N and heartbeat
    return optuna.load_study(study_name=sweep.name, storage=storage(sweep, worker=True), sampler=seeded_sampler(sweep),
                             pruner=pruner(sweep))


def _recorded_study(sweep: Sweep) -> Any:
    import optuna

    url = storage_url(sweep)  # a file storage that is not there holds no study: do not create it by looking
    db = Path(url.split(":///", 1)[1].split("?")[0]) if url.startswith("sqlite:///") else None if "://" in url else Path(url)
    if db is not None and not db.is_file():
        raise FcclassError(f"No sweep '{sweep.name}' in {db.parent if sweep.opts.storage is None else db} (no {db.name}). Run it "
                           "first, or name it with --study / --sweep-dir / --storage.")
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
    """The trial's value of ``p``: proposed by the sampler, or the one it already has (a retried trial keeps the
    parameters of the trial it runs again: Optuna hands back a parameter the trial already holds)."""
    if p.kind == "choice":
        return trial.suggest_categorical(p.key, list(p.choices))
    if p.kind == "int":
        return trial.suggest_int(p.key, int(p.low), int(p.high))
    return trial.suggest_float(p.key, p.low, p.high, log=p.kind == "loguniform")


class ReportEpochs(Callback):
    """Reports the sweep's metric to Optuna after every epoch; ends the trial's training when the pruner says so."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def on_fit_start(self, trainer: Any) -> None:
        self.trial.set_user_attr("run_dir", str(trainer.run_dir))
        self.trial.set_user_attr("metric", trainer.monitor_name(self.metric))  # train_* without a validation split

    def on_epoch_end(self, trainer: Any, row: dict[str, Any], is_best: bool) -> None:
        self.trial.set_user_attr("epochs", row["epoch"])
        value = monitor_value(row, self.metric)
        if value is None:
            return
        self.trial.report(float(value), row["epoch"])
        if row["epoch"] < trainer.cfg.train.epochs and self.trial.should_prune():  # at the last epoch, nothing is saved
            trainer.stopped_by = "pruned"
