"""Run records (summary.json) and `fcclass runs`: every run a complete, machine-readable record; lists and
comparisons read from those records alone."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import SignalAt, needs_fashion, small_config
from typer.testing import CliRunner

from fcclass.cli import app
from fcclass.training.fit import fit
from fcclass.training.state import TrainingDiverged

runner = CliRunner(env={"COLUMNS": "250"})
SMALL = {"data.limit_train": 400, "data.limit_test": 300, "train.epochs": 2, "train.test_at_end": True}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@needs_fashion
def test_a_run_records_everything_in_summary_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "project"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "notes.txt").write_text("v1")
    subprocess.run([*git, "-C", str(repo), "add", "."], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "first"], check=True)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (repo / "notes.txt").write_text("v2")  # uncommitted change: dirty
    monkeypatch.chdir(repo)
    result = fit(small_config(tmp_path, **SMALL))
    s = summary(result.run_dir)
    assert s["state"] == "finished" and s["name"] == "test" and s["run_dir"] == str(result.run_dir.absolute())
    assert s["git"] == {"commit": commit, "dirty": True, "root": str(repo)}
    import torch
    import torchvision

    from fcclass import __version__

    assert s["versions"] == {"python": s["versions"]["python"], "torch": torch.__version__, "torchvision": torchvision.__version__,
                             "fcclass": __version__}
    assert s["host"] and s["device"] == "cpu" and s["threads"] == torch.get_num_threads()
    assert s["started"] <= s["ended"] and s["wall_seconds"] > 0
    assert s["params"] == 615_786  # the default model, as `fcclass summary` counts it (BatchNorm's 96 statistics included)
    assert s["epochs"] == {"planned": 2, "done": 2} and s["best"]["epoch"] == result.best_epoch
    # the test figures are those `fcclass eval` gives for the same checkpoint and split
    ev = runner.invoke(app, ["eval", str(result.run_dir), "--json", "-", "--no-save"])
    report = json.loads(ev.stdout)
    assert s["test"]["accuracy"] == report["accuracy"] and s["test"]["loss"] == report["loss"] and s["test"]["images"] == 300
    assert result.test == s["test"] and (result.run_dir / "eval.json").is_file()


@needs_fashion
def test_no_test_and_the_test_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(small_config(tmp_path, **SMALL).to_yaml())
    res = runner.invoke(app, ["train", "-c", str(cfg), "--no-test"])
    assert res.exit_code == 0 and "Test split" not in res.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert summary(run_dir)["test"] is None and not (run_dir / "eval.json").exists()
    res = runner.invoke(app, ["train", "-c", str(cfg), "--json", "-"])
    out = json.loads(res.stdout)
    assert out["test"]["accuracy"] > 0.3 and out["test"]["images"] == 300  # chance: 0.1


@needs_fashion
def test_interrupted_resumed_failed_and_killed_runs_say_so(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, **{**SMALL, "train.epochs": 3})
    result = fit(cfg, callbacks=[SignalAt(2, 2, signal.SIGINT)])
    s = summary(result.run_dir)
    assert s["state"] == "interrupted" and s["epochs"]["done"] == 1 and s["test"] is None and "SIGINT in epoch 2" in s["error"]
    first_wall = s["wall_seconds"]
    fit(resume=result.run_dir)
    s = summary(result.run_dir)
    assert s["state"] == "finished" and s["sessions"] == 2 and s["epochs"]["done"] == 3 and s["wall_seconds"] > first_wall
    assert s["test"] is not None
    # a run whose loss diverges after its first epoch: failed, with the reason
    bad = small_config(tmp_path / "bad", **{**SMALL, "train.epochs": 4, "optimizer.name": "sgd", "optimizer.lr": 0.01,
                                             "scheduler": {"name": "exponential", "gamma": 1.0e7}})
    with pytest.raises(TrainingDiverged):
        fit(bad)
    (failed,) = (tmp_path / "bad" / "runs").iterdir()
    assert summary(failed)["state"] == "failed" and "became nan" in summary(failed)["error"]
    # a run killed mid-training still reads "running"; its lock is free, so it is listed as interrupted
    killed = tmp_path / "runs" / "killed"
    shutil.copytree(result.run_dir, killed)
    data = summary(killed)
    data["state"] = "running"
    (killed / "summary.json").write_text(json.dumps(data))
    from fcclass.runs.checkpoint import lock_run

    listed = {r["name"]: r["state"] for r in json.loads(runner.invoke(app, ["runs", "--runs-dir", str(tmp_path / "runs"), "--json", "-"]).stdout)}
    assert listed["killed"] == "interrupted"
    with lock_run(killed):  # while a process trains it, it is running
        listed = {r["name"]: r["state"] for r in json.loads(runner.invoke(app, ["runs", "--runs-dir", str(tmp_path / "runs"), "--json", "-"]).stdout)}
    assert listed["killed"] == "running"


@needs_fashion
def test_runs_lists_sorts_filters_and_compares(tmp_path: Path, trained_run: Path) -> None:
    runs = tmp_path / "runs"
    a = fit(small_config(tmp_path, **{**SMALL, "name": "cnn-a"})).run_dir
    b = fit(small_config(tmp_path, **{**SMALL, "name": "cnn-b", "optimizer.lr": 0.0042, "train.epochs": 3})).run_dir
    legacy = runs / trained_run.name  # a run from before summary.json: described from its config and metrics
    shutil.copytree(trained_run, legacy)
    (legacy / "summary.json").unlink(missing_ok=True)
    (runs / "not-a-run").mkdir()
    res = runner.invoke(app, ["runs", "--runs-dir", str(runs)])
    assert res.exit_code == 0, res.output
    assert f"Runs in {runs}: 3" in res.output and a.name in res.output and "615,786" in res.output and "finished" in res.output
    rows = json.loads(runner.invoke(app, ["runs", "--runs-dir", str(runs), "--json", "-", "--sort", "val_accuracy", "--desc"]).stdout)
    assert [r["val_accuracy"] for r in rows] == sorted((r["val_accuracy"] for r in rows), reverse=True)
    assert {r["name"]: r["epochs_done"] for r in rows} == {a.name: 2, b.name: 3, legacy.name: 3}
    only = json.loads(runner.invoke(app, ["runs", "--runs-dir", str(runs), "--json", "-", "--filter", "name=cnn-*",
                                          "--filter", "state=finished"]).stdout)
    assert sorted(r["name"] for r in only) == sorted([a.name, b.name])
    assert runner.invoke(app, ["runs", "--runs-dir", str(runs), "--filter", "colour=red"]).exit_code == 1
    assert runner.invoke(app, ["runs", "--runs-dir", str(runs), "--sort", "colour"]).exit_code == 1
    png = tmp_path / "cmp.png"
    res = runner.invoke(app, ["runs", "compare", a.name, str(b), "--runs-dir", str(runs), "-o", str(png), "--json", "-"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    diffs = out["config_differences"]
    assert diffs["optimizer.lr"] == [0.003, 0.0042] and diffs["train.epochs"] == [2, 3] and diffs["name"] == ["cnn-a", "cnn-b"]
    assert "data.limit_train" not in diffs and png.stat().st_size > 10_000
    assert [r["test_accuracy"] for r in out["runs"]] == [summary(a)["test"]["accuracy"], summary(b)["test"]["accuracy"]]
    res = runner.invoke(app, ["runs", "compare", a.name, "--runs-dir", str(runs)])
    assert res.exit_code == 1 and "at least two runs" in res.output


def test_a_thousand_runs_are_listed_from_their_summaries(tmp_path: Path) -> None:
    """Listing reads only summary.json (checked here with no checkpoints at all); its speed is in RESULTS.md."""
    base = {"format": 1, "state": "finished", "dataset": "fashion_mnist", "params": 313274, "epochs": {"planned": 10, "done": 10},
            "wall_seconds": 91.0, "test": {"accuracy": 0.9}}
    for i in range(1000):
        run = tmp_path / f"run-{i:04d}"
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({**base, "name": "run", "started": f"2026-11-{1 + i % 28:02d}T10:00:00",
                                                       "best": {"epoch": 5, "val_accuracy": i / 1000}}))
    rows = json.loads(runner.invoke(app, ["runs", "--runs-dir", str(tmp_path), "--json", "-", "--sort", "val_accuracy"]).stdout)
    assert len(rows) == 1000 and rows[0]["val_accuracy"] == 0.0 and rows[-1]["val_accuracy"] == 0.999
