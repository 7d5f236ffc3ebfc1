"""MLflow tracking: real trainings logged to a real `mlflow server` on localhost and read back with MlflowClient,
a dead server that must not stop training, the environment variables, and fcclass without MLflow installed."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import DATA_ROOT, ROOT, needs_fashion, small_config
from rich.console import Console
from typer.testing import CliRunner

from fcclass.cli import app
from fcclass.config.load import flatten
from fcclass.errors import FcclassError
from fcclass.training.fit import fit
from fcclass.training.tracking import ENV_EXPERIMENT, ENV_URI, MlflowTracker, git_commit, mlflow_tracker, reason, without_password

TINY = {"train.epochs": 2, "data.limit_train": 500, "data.limit_test": 100}


@pytest.fixture(autouse=True)
def _no_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the machine's environment says, each test sets the MLflow variables it needs."""
    for key in (ENV_URI, ENV_EXPERIMENT, "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite store, proxied artifacts) on a free localhost port; its URL."""
    pytest.importorskip("mlflow")
    tmp = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db", "--artifacts-destination", str(tmp / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: uvicorn is a child
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job workers: starts in half the time
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@needs_fashion
def test_a_run_and_its_resume_are_one_mlflow_run_on_a_real_server(tmp_path: Path, server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(ROOT)  # the git commit tag is the current folder's repository's
    runs = tmp_path / "runs"
    sets = {**TINY, "data.root": DATA_ROOT, "data.download": "false", "train.runs_dir": runs, "tracking.mlflow.uri": server,
            "tracking.mlflow.experiment": "fcclass-tests", "optimizer.lr": 0.004}
    res = CliRunner().invoke(app, ["train", "--json", "-", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)  # MLflow printed nothing on stdout: it is the JSON alone
    run_dir = Path(summary["run_dir"])
    record = json.loads((run_dir / "tracking.json").read_text())
    assert record["tracking_uri"] == server and record["experiment"] == "fcclass-tests"
    assert f"MLflow: run {record['run_id']} in experiment 'fcclass-tests'" in res.stderr and "Warning" not in res.stderr

    client = MlflowClient(server)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert client.get_experiment(run.info.experiment_id).name == "fcclass-tests"
    params = run.data.params
    assert params["optimizer.lr"] == "0.004" and params["model.layers.0.filters"] == "24" and params["train.epochs"] == "2"
    assert params["tracking.mlflow.uri"] == server and params["data.limit_train"] == "500"
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"):
        assert [s for s, _ in _history(client, run.info.run_id, key)] == [1, 2], key
    assert [v for _, v in _history(client, run.info.run_id, "val_accuracy")] == pytest.approx([r["val_accuracy"] for r in summary["history"]], abs=1e-4)
    tags = run.data.tags
    assert tags["fcclass.run_dir"] == str(run_dir) and tags["fcclass.version"]
    assert tags.get("mlflow.source.git.commit") == git_commit(ROOT)  # None outside a git checkout: no tag
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "curves.png", "eval.json", "confusion_matrix.png"}
    first_test = summary["test"]  # the trainer's end-of-training pass over the test split
    assert _history(client, run.info.run_id, "test_accuracy") == [(first_test["epoch"], pytest.approx(first_test["accuracy"]))]

    result = fit(resume=run_dir, overrides=["train.epochs=3", "train.test_at_end=true"])
    assert not result.warnings
    assert json.loads((run_dir / "tracking.json").read_text())["run_id"] == record["run_id"]
    run = client.get_run(record["run_id"])
    assert [s for s, _ in _history(client, run.info.run_id, "val_accuracy")] == [1, 2, 3]
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "2"  # MLflow params never change...
    assert run.data.tags["resumed.train.epochs"] == "3"  # ...so the resume's value is a tag
    assert _history(client, run.info.run_id, "test_accuracy")[-1] == (result.best_epoch, pytest.approx(result.test["accuracy"]))
    assert _history(client, run.info.run_id, "test_loss")[-1] == (result.best_epoch, pytest.approx(result.test["loss"]))


@needs_fashion
def test_the_environment_variables_turn_tracking_on(tmp_path: Path, server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv(ENV_URI, server)
    monkeypatch.setenv(ENV_EXPERIMENT, "from-the-environment")
    result = fit(small_config(tmp_path, **{**TINY, "train.epochs": 1, "data.limit_train": 300}))  # no tracking section
    record = json.loads((result.run_dir / "tracking.json").read_text())
    run = MlflowClient(server).get_run(record["run_id"])
    assert record["experiment"] == "from-the-environment" and run.data.params["tracking.mlflow.uri"] == server
    assert run.data.params["tracking.mlflow.experiment"] == "from-the-environment"  # the resolved values are recorded
    assert run.info.status == "FINISHED" and set(run.data.metrics) >= {"train_loss", "val_accuracy"}

    monkeypatch.delenv(ENV_URI)  # a resume without the variables continues the run where tracking.json says
    monkeypatch.delenv(ENV_EXPERIMENT)
    fit(resume=result.run_dir, overrides=["train.epochs=2"])
    assert json.loads((result.run_dir / "tracking.json").read_text()) == record
    assert [s for s, _ in _history(MlflowClient(server), record["run_id"], "train_loss")] == [1, 2]


@needs_fashion
def test_a_dead_tracking_server_costs_one_warning_not_the_training(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    runs = tmp_path / "runs"
    started = time.monotonic()
    res = CliRunner().invoke(app, ["train", "--set", "train.epochs=2", "--set", "data.limit_train=300", "--set", f"data.root={DATA_ROOT}",
                                   "--set", "data.download=false", "--set", f"train.runs_dir={runs}", "--set", "tracking.mlflow.uri=http://127.0.0.1:9"])
    seconds = time.monotonic() - started
    assert res.exit_code == 0, res.output
    assert "epoch 2/2" in res.stdout and "Best epoch" in res.stdout
    failed = [line for line in res.output.splitlines() if "MLflow: logging to http://127.0.0.1:9 failed" in line]
    assert len(failed) == 1 and "Connection refused" in failed[0] and "training goes on without it" in failed[0]
    assert ("Warning: MLflow: the params and tags, 2 epochs of metrics, the test metrics, 4 artifacts were not logged: Failed to establish a new "
            "connection: [Errno 111] Connection refused") in res.stderr
    assert seconds < 40, f"{seconds:.0f} s"  # MLflow's own retries would take minutes per call
    (run_dir,) = runs.iterdir()
    assert not (run_dir / "tracking.json").exists()  # no MLflow run exists to continue


def test_tracking_is_off_without_the_section_or_the_environment(tmp_path: Path) -> None:
    assert mlflow_tracker(small_config(tmp_path)) is None


def test_without_mlflow_installed_the_error_says_how_to_install_it_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(FcclassError, match=r"pip install 'fcclass\[track\]'"):
        fit(small_config(tmp_path, **{"tracking.mlflow.experiment": "x"}))
    assert not (tmp_path / "runs").exists()  # refused before a run directory was made
    monkeypatch.setenv(ENV_URI, "http://127.0.0.1:9")
    with pytest.raises(FcclassError, match=ENV_URI):
        mlflow_tracker(small_config(tmp_path))


def test_the_config_section_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from fcclass.config.sections import MlflowConfig
    from fcclass.training.tracking import resolve_target

    monkeypatch.setenv(ENV_URI, "http://env:5000")
    monkeypatch.setenv(ENV_EXPERIMENT, "env-exp")
    from_config = resolve_target(MlflowConfig(uri="http://cfg:5000", experiment="cfg-exp"), "name")
    assert (from_config.uri, from_config.experiment) == ("http://cfg:5000", "cfg-exp")
    from_env = resolve_target(MlflowConfig(), "name")
    assert (from_env.uri, from_env.experiment) == ("http://env:5000", "env-exp")
    monkeypatch.delenv(ENV_EXPERIMENT)
    assert resolve_target(None, "name").experiment == "name"  # the config's name by default


def test_params_are_dotted_keys_and_passwords_stay_out() -> None:
    flat = flatten({"optimizer": {"lr": 0.001, "betas": [0.9, 0.999]}, "model": {"layers": [{"type": "Conv2D", "filters": 24}]}})
    assert flat == {"optimizer.lr": 0.001, "optimizer.betas": [0.9, 0.999], "model.layers.0.type": "Conv2D", "model.layers.0.filters": 24}
    assert without_password("https://ann:s3cret@mlflow.example.com/") == "https://ann:***@mlflow.example.com/"
    assert without_password("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_a_network_error_is_told_by_its_innermost_cause() -> None:
    refused = ("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch failed with exception HTTPConnectionPool(host='127.0.0.1', "
               "port=9): Max retries exceeded with url: /api/2.0/mlflow/runs/log-batch (Caused by NewConnectionError(\"HTTPConnection("
               "host='127.0.0.1', port=9): Failed to establish a new connection: [Errno 111] Connection refused\"))")
    assert reason(Exception(refused)) == "Failed to establish a new connection: [Errno 111] Connection refused"
    hung = refused.replace("NewConnectionError", "ReadTimeoutError").replace(
        "Failed to establish a new connection: [Errno 111] Connection refused", "Read timed out. (read timeout=5)")
    assert reason(Exception(hung)) == "Read timed out. (read timeout=5)"
    assert reason(Exception("RESOURCE_DOES_NOT_EXIST: Run with id=abc not found")) == "RESOURCE_DOES_NOT_EXIST: Run with id=abc not found"


def test_the_end_note_counts_what_was_not_logged() -> None:
    tracker = MlflowTracker(Console(file=io.StringIO()))
    tracker.failure, tracker.skipped = "[Errno 111] Connection refused", {"epochs": 10, "artifacts": 4}
    assert tracker.end_note() == "MLflow: 10 epochs of metrics, 4 artifacts were not logged: [Errno 111] Connection refused"
    tracker.skipped = {"epochs": 1}
    assert tracker.end_note().startswith("MLflow: 1 epoch of metrics was not logged")


def _hostile_server(send: Any) -> Iterator[str]:
    """A localhost 'tracking server' in a thread: ``send(conn)`` answers each connection, whatever it is asked."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=lambda c=conn: _answer(c, send, stop), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()


def _answer(conn: socket.socket, send: Any, stop: Any) -> None:
    with conn:
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000000000\r\n\r\n")
            while not stop.is_set():
                send(conn)
        except OSError:
            pass


def _open_run(tmp_path: Path, uri: str) -> tuple[MlflowTracker, float]:
    """The tracker's first call (opening the MLflow run) against ``uri``; the tracker and the seconds it took."""
    from types import SimpleNamespace

    cfg = small_config(tmp_path, **{"tracking.mlflow.uri": uri})
    trainer = SimpleNamespace(run_dir=tmp_path, resumed=False, cfg=cfg)
    tracker = MlflowTracker(Console(file=io.StringIO()))
    started = time.monotonic()
    assert not tracker._call("params", tracker._open_run, trainer, {})
    return tracker, time.monotonic() - started


@pytest.mark.parametrize("kind", ["drip", "endless"])
def test_a_server_that_drips_or_streams_forever_is_given_up_on_in_bounded_time_and_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """One byte every 0.5 s never trips a read timeout, and an endless body would fill the memory: the whole call has a
    deadline (FCCLASS_TRACKING_TIMEOUT, for all of a run's calls) and a size bound."""
    pytest.importorskip("mlflow")
    from fcclass.training import tracking_calls

    monkeypatch.setenv(tracking_calls.ENV_BUDGET, "4")
    if kind == "drip":
        send = lambda conn: (conn.sendall(b" "), time.sleep(0.5))  # noqa: E731
    else:
        chunk = b" " * (1 << 16)
        send = lambda conn: conn.sendall(chunk)  # noqa: E731
    before = tracking_calls._rss()
    for uri in _hostile_server(send):
        tracker, seconds = _open_run(tmp_path, uri)
    assert seconds < 10, f"{seconds:.0f} s"
    assert tracker.failure is not None, tracker.failure
    assert ("no complete answer in 4 s" if kind == "drip" else "the answer grew past 256 MB") in tracker.failure, tracker.failure
    if kind == "endless":
        grown = (tracking_calls._rss() or 0) - (before or 0)
        assert grown < 3 * tracking_calls.MAX_GROWTH, f"{grown >> 20} MB"
    assert tracker.left == 0.0 or kind == "endless"  # the run's budget is spent: later calls are skipped anyway
    assert not tracker._call("epochs", lambda: None)  # no call follows a failure
    assert tracker.skipped == {"params": 1, "epochs": 1}


@pytest.mark.parametrize("uri, why", [("http://[::1", "Invalid IPv6 URL"), ("sqlite:////proc/x.db", "cannot open the SQLite store '/proc/x.db'")])
def test_a_tracking_uri_that_cannot_be_used_is_one_warning_at_once(tmp_path: Path, uri: str, why: str) -> None:
    """A malformed URI used to raise out of the warning itself (training aborted, summary.json left 'running'); a
    SQLite store that cannot be created made MLflow retry for 109 s with 9 warnings."""
    pytest.importorskip("mlflow")
    tracker, seconds = _open_run(tmp_path, uri)
    assert seconds < 5, f"{seconds:.0f} s"
    assert tracker.failure is not None and why in tracker.failure, tracker.failure
    assert tracker.console.file.getvalue().count("MLflow: logging to") == 1


@needs_fashion
def test_a_malformed_tracking_uri_is_a_warning_and_the_run_finishes(tmp_path: Path) -> None:
    """'http://[::1' raised ValueError out of the failure warning itself: training aborted, summary.json stayed 'running'."""
    pytest.importorskip("mlflow")
    result = fit(small_config(tmp_path, **{**TINY, "train.epochs": 1, "tracking.mlflow.uri": "http://[::1"}))
    assert len(result.history) == 1
    assert any("MLflow:" in w and "Invalid IPv6 URL" in w for w in result.warnings), result.warnings
    assert json.loads((result.run_dir / "summary.json").read_text())["state"] == "finished"


def test_the_budget_is_for_all_of_a_runs_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls that each answer, but slowly, stop being made once they took FCCLASS_TRACKING_TIMEOUT seconds in all."""
    from fcclass.training import tracking_calls

    monkeypatch.setenv(tracking_calls.ENV_BUDGET, "1.5")
    tracker = MlflowTracker(Console(file=io.StringIO()))
    started = time.monotonic()
    assert tracker._call("epochs", time.sleep, 0.6) and tracker._call("epochs", time.sleep, 0.6)
    assert not tracker._call("epochs", time.sleep, 5)
    assert time.monotonic() - started < 3
    assert tracker.failure is not None and "left of the 1.5 s that FCCLASS_TRACKING_TIMEOUT allows" in tracker.failure, tracker.failure
    assert tracker.skipped == {"epochs": 1}
