"""The run directory's files, owned by fcclass.runs: runs of earlier (and later) versions still read, damaged records
are treated as damaged (never a crash, never a hang), and every way of making a run writes the same first files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fcclass.cli import app
from fcclass.runs.layout import is_run_dir
from fcclass.runs.summary import read_summary, write_summary
from fcclass.runs.tracking import read_tracking

runner = CliRunner(env={"COLUMNS": "250"})


def _listed(runs: Path) -> dict[str, dict]:
    res = runner.invoke(app, ["runs", "--runs-dir", str(runs), "--json", "-"])
    assert res.exit_code == 0, res.output
    return {r["name"]: r for r in json.loads(res.stdout)}


def _copy(trained_run: Path, runs: Path, name: str) -> Path:
    run = runs / name
    shutil.copytree(trained_run, run)
    return run


# ----------------------------------------------------------------------------- summary.json
def test_a_summary_of_another_version_lists_and_keeps_its_unknown_keys(trained_run: Path, tmp_path: Path) -> None:
    run = _copy(trained_run, tmp_path / "runs", "other-version")
    data = json.loads((run / "summary.json").read_text())
    for key in ("precision", "distributed", "trainable_params"):  # keys earlier versions did not write
        data.pop(key)
    data["energy"] = {"joules": 1234.5}  # a key a later version may write
    (run / "summary.json").write_text(json.dumps(data, indent=2))
    row = _listed(tmp_path / "runs")["other-version"]
    assert row["params"] == data["params"] and row["epochs_done"] == 3 and row["state"] == "finished"
    assert row["val_accuracy"] == data["best"]["val_accuracy"] and row["started"] == data["started"]
    # written back (as compress does with its source's record): the unknown key kept, the missing ones still missing
    summary = read_summary(run)
    assert summary is not None and summary.best is not None and summary.best.val_accuracy == data["best"]["val_accuracy"]
    write_summary(run, summary)
    assert json.loads((run / "summary.json").read_text()) == data


@pytest.mark.parametrize("damage", [
    {"params": "615690"},  # a number as text
    {"epochs": [3, 3]},  # crashed `fcclass runs` before records were validated
    {"best": {"epoch": "last", "val_accuracy": 0.8}},
    {"state": 1},
])
def test_a_summary_with_a_wrong_type_is_damaged_and_the_run_listed_from_its_other_files(
        trained_run: Path, tmp_path: Path, damage: dict) -> None:
    runs = tmp_path / "runs"
    run = _copy(trained_run, runs, "damaged")
    data = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**data, **damage}))
    assert read_summary(run) is None
    row = _listed(runs)["damaged"]  # as for a run whose summary.json is not JSON: from config.yaml and metrics.csv
    assert row["params"] is None and row["epochs_done"] == 3 and row["epochs_planned"] == 3 and row["state"] == "finished"
    assert row["val_accuracy"] == pytest.approx(data["best"]["val_accuracy"], abs=1e-4)
    assert row["damaged"].startswith("summary.json: ") and next(iter(damage)) in row["damaged"]  # and why it is


def test_a_summary_that_is_a_fifo_or_huge_is_not_read(trained_run: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fifo = _copy(trained_run, runs, "fifo")
    (fifo / "summary.json").unlink()
    os.mkfifo(fifo / "summary.json")  # opening it would wait forever for a writer
    huge = _copy(trained_run, runs, "huge")
    with open(huge / "summary.json", "r+b") as f:
        f.truncate(64 << 20)  # sparse: a 64 MB record, far more than any run writes
    listed = _listed(runs)
    assert listed["fifo"]["epochs_done"] == listed["huge"]["epochs_done"] == 3 and listed["fifo"]["params"] is None


# ----------------------------------------------------------------------------- splits.json and tracking.json
@pytest.mark.parametrize(("edit", "why"), [
    (lambda s: {**s, "channels": "1"}, "channels"),
    (lambda s: {**s, "format": 2}, "format"),
    (lambda s: {k: v for k, v in s.items() if k != "dataset"}, "dataset"),
    (lambda s: {**s, "splits": {k: v for k, v in s["splits"].items() if k != "val"}}, "split val is missing"),
    (lambda s: {**s, "splits": {**s["splits"], "test": {**s["splits"]["test"], "indices": [-1]}}}, "indices"),
])
def test_a_damaged_splits_json_is_a_message_naming_the_problem(trained_run: Path, tmp_path: Path, edit, why: str) -> None:
    run = _copy(trained_run, tmp_path, "run")
    (run / "splits.json").write_text(json.dumps(edit(json.loads((run / "splits.json").read_text()))))
    res = runner.invoke(app, ["eval", str(run), "--no-save"])
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and "splits.json is damaged" in text and why in text and "Restore it from a copy of the run" in text


def test_a_splits_json_that_is_a_fifo_is_damaged_not_waited_on(trained_run: Path, tmp_path: Path) -> None:
    run = _copy(trained_run, tmp_path, "run")
    (run / "splits.json").unlink()
    os.mkfifo(run / "splits.json")
    res = runner.invoke(app, ["eval", str(run), "--no-save"])
    assert res.exit_code == 1 and "splits.json is damaged (it is a FIFO (named pipe), not a regular file)" in " ".join(res.output.split())


def test_tracking_json_reads_back_and_a_damaged_one_is_none(tmp_path: Path) -> None:
    record = {"tracking_uri": "http://mlflow:5000", "experiment": "fc", "experiment_id": "3", "run_id": "abc"}
    (tmp_path / "tracking.json").write_text(json.dumps(record))
    tracked = read_tracking(tmp_path)
    assert tracked is not None and (tracked.tracking_uri, tracked.run_id) == ("http://mlflow:5000", "abc")
    for damaged in ({**record, "run_id": 7}, {"tracking_uri": "x"}, [record]):
        (tmp_path / "tracking.json").write_text(json.dumps(damaged))
        assert read_tracking(tmp_path) is None  # a resume then logs to a new MLflow run, as for a missing record


# ----------------------------------------------------------------------------- making runs
def test_what_is_a_run_directory(trained_run: Path, tmp_path: Path) -> None:
    for name in ("config.yaml", "summary.json", "best.pt", "last.pt"):  # any of a run's own files, whatever else is missing
        (tmp_path / name.split(".")[0]).mkdir()
        shutil.copy(trained_run / name, tmp_path / name.split(".")[0] / name)
        assert is_run_dir(tmp_path / name.split(".")[0])
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG")
    assert not is_run_dir(tmp_path / "images") and not is_run_dir(tmp_path / "config" / "config.yaml")
    res = runner.invoke(app, ["predict", str(tmp_path / "best"), "--run", str(trained_run)])
    assert res.exit_code == 1 and "is a run directory, not a folder of images" in " ".join(res.output.split())


def test_compress_and_train_make_runs_of_the_same_files(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "compressed"
    res = runner.invoke(app, ["compress", str(trained_run), "--prune", "0.3", "--out", str(out), "--rounds", "1", "--json", "-"])
    assert res.exit_code == 0, res.output
    first = {"config.yaml", "classes.json", "splits.json", "best.pt", "summary.json"}
    assert first <= {p.name for p in trained_run.iterdir()} and first <= {p.name for p in out.iterdir()}
    assert (out / "classes.json").read_bytes() == (trained_run / "classes.json").read_bytes()
    assert (out / "splits.json").read_bytes() == (trained_run / "splits.json").read_bytes()  # the same recorded data
    source, made = json.loads((trained_run / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
    assert made["compressed"]["from"] == str(trained_run) and made["name"] == "test-compressed" and made["best"] is None
    assert set(source) | {"compressed"} == set(made) and made["test"]["accuracy"] == json.loads(res.stdout)["rows"][-1]["test_accuracy"]
    row = _listed(tmp_path)["compressed"]
    assert row["state"] == "finished" and row["test_accuracy"] == made["test"]["accuracy"]
