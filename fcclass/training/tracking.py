"""MLflow experiment tracking: a callback that logs a run's config, epochs, tags and files to an MLflow tracking store.

Enabled by the config's ``tracking.mlflow`` section or by MLflow's own ``MLFLOW_TRACKING_URI`` /
``MLFLOW_EXPERIMENT_NAME`` variables (the section's values win). MLflow is an optional dependency, imported only
when tracking is enabled. Tracking never stops training: the first failed call is reported once, no further call
is made for the rest of the run, and the end of training says what was not logged. The MLflow run's id is kept in
the run directory (``tracking.json``), so ``fcclass train --resume`` continues the same MLflow run.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

from fcclass.config.load import flatten
from fcclass.errors import FcclassError
from fcclass.runs.layout import TRACKING
from fcclass.runs.tracking import TrackingRecord, read_tracking, write_tracking
from fcclass.training.callbacks import Callback
from fcclass.training.tracking_calls import Abandoned, budget, run_bounded

if TYPE_CHECKING:  # pragma: no cover
    from fcclass.config.sections import Config, MlflowConfig
    from fcclass.training.trainer import Trainer, TrainResult

ENV_URI, ENV_EXPERIMENT = "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"
ARTIFACTS = ("config.yaml", "curves.png", "confusion_matrix.png", "eval.json")
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds")
# MLflow retries a failed HTTP request 7 times with growing waits and a 120 s timeout: minutes per call. Within
# fcclass's calls (and unless the user set them), a dead server costs a few seconds, once: no call follows a failure.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
QUIET = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def mlflow_tracker(cfg: "Config | None", resume: str | Path | None = None, overrides: Sequence[str] | None = None,
                   console: Any = None) -> "MlflowTracker | None":
    """The tracking callback for a run, or None when tracking is off. On for the config's ``tracking.mlflow`` section
    (a resumed run: its recorded config's, or ``--set tracking.mlflow.uri=...``), for the MLflow environment variables,
    and for a resumed run that was tracked. Raises FcclassError, before anything is trained, when tracking is on and
    MLflow is not installed."""
    if resume is not None:
        cfg = _recorded_config(Path(resume))
    in_config = (cfg is not None and cfg.tracking.mlflow is not None) or any(o.startswith("tracking.") for o in overrides or ())
    tracked_before = resume is not None and (Path(resume) / TRACKING).is_file()
    if not in_config and not tracked_before and not os.environ.get(ENV_URI) and not os.environ.get(ENV_EXPERIMENT):
        return None
    try:
        import mlflow.tracking  # noqa: F401
    except ImportError as e:
        why = ["tracking.mlflow is set in the config"] if in_config else []
        why += [f"{key} is set" for key in (ENV_URI, ENV_EXPERIMENT) if os.environ.get(key)]
        why += [f"the run was logged to MLflow before ({Path(str(resume)) / TRACKING})"] if tracked_before else []
        raise FcclassError(f"This run is to be logged to MLflow ({'; '.join(why)}), but MLflow cannot be imported ({e}). "
                           "Install it with: pip install 'fcclass[track]'") from None
    return MlflowTracker(console)


def _recorded_config(run_dir: Path) -> "Config | None":
    """A run's config for deciding about tracking; None when unreadable (resuming then fails with its own message)."""
    from fcclass.runs.checkpoint import run_config

    try:
        return run_config(run_dir)
    except FcclassError:
        return None


@dataclass
class Target:
    """Where a run is logged, as resolved (config section, then environment, then MLflow's defaults)."""

    uri: str
    experiment: str
    run_id: str | None = None  # of a run already logged there (resume)
    experiment_id: str | None = None

    def record(self) -> TrackingRecord:
        assert self.run_id is not None
        return TrackingRecord(tracking_uri=self.uri, experiment=self.experiment, experiment_id=self.experiment_id, run_id=self.run_id)


def resolve_target(section: "MlflowConfig | None", name: str, record: TrackingRecord | None = None) -> Target:
    """The config section's values, else the environment's, else those ``record``ed by the run's earlier sessions
    (tracking.json), else MLflow's default store and the config's name."""
    import mlflow

    recorded_uri, recorded_experiment = (record.tracking_uri, record.experiment) if record is not None else (None, None)
    if section is not None and section.uri:
        uri = section.uri
    elif os.environ.get(ENV_URI) or not recorded_uri:
        uri = mlflow.get_tracking_uri()  # the environment's, else MLflow's default
    else:
        uri = recorded_uri
    experiment = ((section.experiment if section is not None else None) or os.environ.get(ENV_EXPERIMENT)
                  or recorded_experiment or name)
    return Target(str(uri), experiment)


@contextmanager
def bounded_http() -> Iterator[None]:
    """For the calls inside: MLflow's HTTP retries and timeout of HTTP_LIMITS where the user has not set them, and no
    'View run' lines that MLflow would print on stdout (``--json -`` keeps stdout for the JSON)."""
    saved = {k: os.environ.get(k) for k in (*HTTP_LIMITS, QUIET)}
    os.environ.update({k: v for k, v in HTTP_LIMITS.items() if k not in os.environ})
    os.environ[QUIET] = "true"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_sqlite(uri: str) -> None:
    """A SQLite store that cannot be opened (no such folder, not writable) is refused at once: MLflow would retry
    creating it for minutes, with a warning each time."""
    if not uri.startswith("sqlite:///"):
        return
    import sqlite3

    path = uri[len("sqlite:///"):].split("?")[0]
    try:
        sqlite3.connect(f"file:{path}?mode=rwc", uri=True).close()
    except sqlite3.Error as e:
        raise RuntimeError(f"cannot open the SQLite store {path!r}: {e}; give a writable file, e.g. sqlite:///mlflow.db") from None


def without_password(uri: str) -> str:
    """A URI as it may be shown to a team: user:password@host loses the password."""
    try:
        parts = urlsplit(uri)
        if parts.password is None:
            return uri
    except ValueError:  # not a URL ('http://[::1'): shown as given, it has no password to hide
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def git_commit(folder: Path) -> str | None:
    """HEAD of the git repository ``folder`` is in, if any (a slow or missing git gives None)."""
    from fcclass.runs.summary import git_state

    state = git_state(folder)
    return state["commit"] if state else None


def reason(e: BaseException) -> str:
    """An MLflow or network error in one line: requests' innermost cause ('Failed to establish a new connection:
    [Errno 111] Connection refused', 'Read timed out. (read timeout=5)') rather than the whole retry story."""
    text = " ".join(str(e).split()) or type(e).__name__
    caused = text.rfind("(Caused by ")
    if caused >= 0:  # ... (Caused by ReadTimeoutError("HTTPConnectionPool(host=..., port=...): Read timed out. (...)"))
        rest = text[caused + len("(Caused by "):]
        wrappers = re.match(r"((?:\w+\()*)(['\"]?)", rest)
        assert wrappers is not None  # the pattern matches any string
        inner = rest[wrappers.end(): len(rest) - wrappers.group(1).count("(") - 1 - len(wrappers.group(2))]
        text = inner.rpartition("): ")[2] or inner
    text = text.split(" Response body: '<")[0]  # an HTML error page
    return text if len(text) <= 300 else text[:285] + "..."


def _metrics(values: dict[str, Any], step: int) -> list[Any]:
    """MLflow metrics at ``step`` (the epoch), leaving out values that are None (no validation split)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, int(step)) for k, v in values.items() if v is not None]


def _lost(key: str, n: int) -> str:
    """What the end note says was not logged, for a key that _call counted ``n`` times."""
    if key in ("epochs", "artifacts"):
        return f"{n} {'epoch' if key == 'epochs' else 'artifact'}{'s' if n > 1 else ''}{' of metrics' if key == 'epochs' else ''}"
    return {"params": "the params and tags", "test": "the test metrics", "status": "the run's end status"}[key]


class MlflowTracker(Callback):
    """Logs the resolved config as params, each epoch's metrics (step = epoch), tags, the test metrics and the run's
    files to one MLflow run. See the module docstring for what happens when the tracking store fails."""

    def __init__(self, console: Any = None) -> None:
        self.console = console
        self.client: Any = None
        self.target: Target | None = None
        self.failure: str | None = None  # why logging stopped
        self.skipped: dict[str, int] = {}  # what was not logged after the failure, by _lost's keys
        self.notes: list[str] = []  # for result.warnings
        self.left = budget()  # seconds the run's MLflow calls may still take (tracking_calls)

    # ------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: "Trainer") -> None:
        assert trainer.run_dir is not None
        logged: dict[str, str] = {}
        if not self._call("params", self._open_run, trainer, logged):
            return
        self._write_record(trainer.run_dir)
        self._say(f"MLflow: run {self.target.run_id} in experiment '{self.target.experiment}' at {self._where()}")
        if self._call("params", self._log_params, trainer, logged) and not logged and trainer.state.history:
            self._call("epochs", self._log_metrics, trainer.state.history)  # a resumed run tracked from now on

    def on_epoch_end(self, trainer: "Trainer", row: dict[str, Any], is_best: bool) -> None:
        self._call("epochs", self._log_metrics, [row])

    def on_fit_end(self, trainer: "Trainer", result: "TrainResult") -> None:
        test = getattr(result, "test", None)  # the held-out test metrics, where the trainer computes them
        if test:
            values = {f"test_{k}": test[k] for k in ("accuracy", "loss") if test.get(k) is not None}
            self._call("test", self._log_batch, _metrics(values, test.get("epoch") or result.best_epoch or 0))
        if not result.removed:
            for name in ARTIFACTS:
                if (result.run_dir / name).is_file():
                    self._call("artifacts", self._log_artifact, result.run_dir / name)
        self.finish("KILLED" if result.interrupted else "FINISHED")
        result.warnings.extend(self.notes)
        if self.failure is not None:
            result.warnings.append(self.end_note())

    def finish(self, status: str) -> None:
        """Mark the MLflow run ended (FINISHED, KILLED, FAILED); nothing when logging had stopped."""
        if self.target is not None and self.target.run_id is not None:
            self._call("status", lambda: self.client.set_terminated(self.target.run_id, status))

    def end_note(self) -> str:
        """'MLflow: 10 epochs of metrics, 4 artifacts were not logged: <reason>'."""
        parts = [_lost(key, n) for key, n in self.skipped.items()]
        single = len(parts) == 1 and (parts[0].startswith("1 ") or parts[0].endswith("status"))
        return f"MLflow: {', '.join(parts) or 'nothing'} {'was' if single else 'were'} not logged: {self.failure}"

    # ------------------------------------------------------------------------- MLflow calls
    def _call(self, what: str, fn: Any, *args: Any) -> bool:
        """``fn(*args)`` unless logging has stopped; the first exception stops it (one warning), and ``what`` (a key
        of _lost) is counted as not logged."""
        if self.failure is None:
            start = time.monotonic()
            try:
                with bounded_http():
                    run_bounded(fn, args, self.left)
                return True
            except Exception as e:  # any failure of the store (network, HTTP status, refusal) must not stop training
                self.failure = str(e) if isinstance(e, Abandoned) else reason(e)
                where = f" to {without_password(self.target.uri)}" if self.target is not None else ""
                self._say(f"MLflow: logging{where} failed ({self.failure}); training goes on without it.", "yellow")
            finally:
                self.left = max(0.0, self.left - (time.monotonic() - start))
        self.skipped[what] = self.skipped.get(what, 0) + 1
        return False

    def _open_run(self, trainer: "Trainer", logged: dict[str, str]) -> None:
        """A new MLflow run, or the one recorded in the run directory continued (its params go into ``logged``)."""
        from mlflow.tracking import MlflowClient
        from mlflow.tracking.context.registry import resolve_tags

        assert trainer.run_dir is not None
        record = read_tracking(trainer.run_dir) if trainer.resumed else None
        self.target = target = resolve_target(trainer.cfg.tracking.mlflow, trainer.cfg.name, record)
        check_sqlite(target.uri)
        self.client = client = MlflowClient(tracking_uri=target.uri)  # may refuse the URI
        if record is not None and record.tracking_uri == target.uri:  # another store: a new run there
            target.run_id, target.experiment_id = record.run_id, record.experiment_id
            target.experiment = record.experiment or target.experiment  # where the run is, whatever is set now
            client.update_run(target.run_id, status="RUNNING")
            logged.update(client.get_run(target.run_id).data.params)
            return
        experiment = client.get_experiment_by_name(target.experiment)
        target.experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(target.experiment)
        tags = {k: v for k, v in resolve_tags().items() if not k.startswith("mlflow.source.git.")}  # the script's repo
        target.run_id = client.create_run(target.experiment_id, tags=tags, run_name=trainer.run_dir.name).info.run_id

    def _log_params(self, trainer: "Trainer", logged: dict[str, str]) -> None:
        """The resolved config as params, and the tags. MLflow refuses to change a param: on resume a changed value
        (train.epochs) goes to a tag ``resumed.<key>`` instead."""
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        from fcclass.version import __version__

        assert self.target is not None
        config = trainer.cfg.to_dict()
        config["tracking"] = {"mlflow": {"uri": without_password(self.target.uri), "experiment": self.target.experiment}}
        params = {k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flatten(config).items()}  # MLflow refuses longer values
        tags = {"fcclass.run_dir": str(trainer.run_dir.absolute()), "fcclass.version": __version__}
        commit = git_commit(Path.cwd())
        if commit:
            tags["mlflow.source.git.commit"] = commit
        tags.update({f"resumed.{k}": v for k, v in params.items() if k in logged and logged[k] != v})
        self.client.log_batch(self.target.run_id, params=[Param(k, v) for k, v in params.items() if k not in logged],
                              tags=[RunTag(k, v) for k, v in tags.items()])

    def _log_metrics(self, rows: list[dict[str, Any]]) -> None:
        self._log_batch([m for row in rows for m in _metrics({k: row.get(k) for k in EPOCH_METRICS}, row["epoch"])])

    def _log_batch(self, metrics: list[Any]) -> None:
        assert self.target is not None
        self.client.log_batch(self.target.run_id, metrics=metrics)

    def _log_artifact(self, path: Path) -> None:
        assert self.target is not None
        self.client.log_artifact(self.target.run_id, str(path))

    # ------------------------------------------------------------------------- local
    def _write_record(self, run_dir: Path) -> None:
        from fcclass.files import os_error_reason

        assert self.target is not None
        try:
            write_tracking(run_dir, self.target.record())
        except OSError as e:
            self.notes.append(f"{TRACKING} was not written in {run_dir} ({os_error_reason(e)}): resuming the run will start a "
                              "new MLflow run.")

    def _where(self) -> str:
        """The run's page in the MLflow UI, for a tracking server; else the store's URI."""
        assert self.target is not None
        uri, t = without_password(self.target.uri), self.target
        if uri.startswith(("http://", "https://")) and t.run_id and t.experiment_id:
            return f"{uri.rstrip('/')}/#/experiments/{t.experiment_id}/runs/{t.run_id}"
        return uri

    def _say(self, text: str, style: str | None = None) -> None:
        if self.console is not None:
            from rich.markup import escape

            self.console.print(f"[{style}]{escape(text)}[/{style}]" if style else escape(text), highlight=False)
