"""`fcclass sweep` on Optuna: real studies in real storage, real (tiny) trainings on Fashion-MNIST."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA_ROOT, ROOT, needs_fashion, small_config
from typer.testing import CliRunner

from fcclass.cli import app

pytest.importorskip("optuna")
runner = CliRunner(env={"COLUMNS": "250"})
TINY = ["--set", f"data.root={DATA_ROOT}", "--set", "data.download=false", "--set", "data.limit_train=400",
        "--set", "data.limit_test=100", "--set", "train.epochs=1", "--set", "train.test_at_end=false"]


def sweep(tmp_path: Path, *args: str) -> dict:
    res = runner.invoke(app, ["sweep", *TINY, "--set", f"train.runs_dir={tmp_path / 'runs'}", "--json", "-", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@needs_fashion
def test_a_sweep_trains_normal_runs_and_writes_a_best_config_that_reproduces(tmp_path: Path) -> None:
    out = sweep(tmp_path, "-p", "optimizer.lr=loguniform(1e-4,1e-2)", "-p", "model.layers.-3.units=16,64", "-n", "3",
                "--sampler", "random", "--pruner", "none")
    trials = out["trials"]
    assert len(trials) == 3 and all(t["state"] == "complete" for t in trials)
    assert out["sweep_dir"] == str(tmp_path / "runs" / "sweep-fashion-cnn")
    values = [t["value"] for t in trials]
    assert values == sorted(values, reverse=True)  # the leaderboard: best first
    assert all(v == round(v, 4) and t["seconds"] == round(t["seconds"], 1) for v, t in zip(values, trials))  # as train --json
    for t in trials:  # each trial is a normal run, with the parameters it was given
        run = Path(t["run_dir"])
        assert json.loads((run / "summary.json").read_text())["state"] == "finished"
        assert f"units: {t['params']['model.layers.-3.units']}" in (run / "config.yaml").read_text()
    listed = runner.invoke(app, ["runs", "--runs-dir", out["sweep_dir"], "--json", "-"])
    assert len(json.loads(listed.stdout)) == 3
    from fcclass.config.load import load_config
    from fcclass.training.fit import fit

    again = fit(load_config(out["best_config"]))
    assert again.best["val_accuracy"] == pytest.approx(trials[0]["value"], abs=1e-6)
    assert again.run_dir.parent == tmp_path / "runs"


@needs_fashion
def test_the_same_seed_proposes_the_same_trials_and_a_rerun_continues(tmp_path: Path) -> None:
    spec = ["-p", "optimizer.lr=loguniform(1e-4,1e-2)", "--sampler", "tpe", "--pruner", "none", "--seed", "7"]
    first = sweep(tmp_path, *spec, "-n", "2", "--sweep-dir", str(tmp_path / "a"))
    more = sweep(tmp_path, *spec, "-n", "3", "--sweep-dir", str(tmp_path / "a"))
    other = sweep(tmp_path, *spec, "-n", "2", "--sweep-dir", str(tmp_path / "b"))
    by_number = lambda out: {t["number"]: t["params"] for t in out["trials"]}  # noqa: E731
    assert len(more["trials"]) == 3 and {k: by_number(more)[k] for k in (0, 1)} == by_number(first)
    assert by_number(other) == by_number(first)  # another folder, the same seed: the same trials
    status = runner.invoke(app, ["sweep", "--sweep-dir", str(tmp_path / "a"), "--status"])  # the study knows its space and N
    assert status.exit_code == 0 and "3 of 3 trials" in status.output and "optimizer.lr" in status.output
    missing = runner.invoke(app, ["sweep", "--sweep-dir", str(tmp_path / "nope"), "--status"])
    assert missing.exit_code == 1 and "No sweep" in missing.output and not (tmp_path / "nope").exists()


@pytest.mark.parametrize("args, message", [
    (["-p", "model.layers.3.unitz=8,16"], "model.layers[3].unitz: unknown key"),
    (["-p", "data.batch_size=0,32"], "Sweep parameter data.batch_size=0"),
    (["-p", "optimizer.lr=uniform(0.1,0.01)"], "uniform(0.1,0.01) needs a < b"),
    (["-p", "optimizer.lr=loguniform(0,1)"], "needs 0 < a < b"),
    (["-p", "optimizer.lr=uniform(1e-4,1e-2)", "--sampler", "grid"], "--sampler grid needs every parameter as a list"),
    (["-p", "optimizer.lr"], "must look like KEY=SPEC"),
    ([], "Nothing to sweep"),
    (["-p", "optimizer.lr=0.1", "--sampler", "bayes"], "sampler"),
    (["-p", "optimizer.lr=" + ",".join(str(i / 1e4) for i in range(1, 1001)), "-p", "data.batch_size=" + ",".join(map(str, range(1, 1001))),
      "-p", "train.epochs=" + ",".join(map(str, range(1, 1001))), "--sampler", "grid"],
     "The grid has 1,000,000,000 points (1,000 values of optimizer.lr x 1,000 values of data.batch_size x 1,000 values of "
     "train.epochs), more than the 100,000 a sweep can run"),
    (["-p", "optimizer.lr=0.1", "--study", "\udcff"], "the study name '\\xff' is not valid UTF-8 text"),
    (["-p", "optimizer.lr=0.1", "--study", "../../x"], "the study name '../../x' is not a plain name"),
    (["-p", "optimizer.lr=0.1", "--study", ".."], "is not a plain name"),
    (["-p", "optimizer.lr=0.1", "--study", "a\nb"], "is not a plain name"),
    (["-p", "optimizer.lr=0.1,\udcff"], "sweep parameter optimizer.lr=0.1,\\xff: not valid UTF-8 text"),
    (["-p", "optimizer.l\udcff=0.1"], "sweep parameter optimizer.l\\xff=0.1: not valid UTF-8 text"),
])
def test_every_trial_config_is_checked_before_training(tmp_path: Path, args: list[str], message: str) -> None:
    res = runner.invoke(app, ["sweep", *TINY, "--set", f"train.runs_dir={tmp_path / 'runs'}", *args])
    assert res.exit_code == 1 and message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "runs").exists() and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()


@needs_fashion
def test_a_pruned_trial_stops_training_and_its_run_says_pruned(tmp_path: Path) -> None:
    from fcclass.experiments.sweep import ReportEpochs
    from fcclass.training.fit import fit

    class Trial:  # what ReportEpochs needs of an Optuna trial: the pruner says stop after the first report
        reports: list = []
        attrs: dict = {}

        def report(self, value: float, step: int) -> None:
            self.reports.append((step, value))

        def should_prune(self) -> bool:
            return True

        def set_user_attr(self, key: str, value: object) -> None:
            self.attrs[key] = value

    trial = Trial()
    result = fit(small_config(tmp_path, **{"train.epochs": 3, "data.limit_train": 400}), callbacks=[ReportEpochs(trial, "val_accuracy")])
    assert result.stopped_by == "pruned" and len(result.history) == 1 and [s for s, _ in trial.reports] == [1]
    assert json.loads((result.run_dir / "summary.json").read_text())["state"] == "pruned"
    assert trial.attrs["run_dir"] == str(result.run_dir)
    last = fit(small_config(tmp_path / "last", **{"train.epochs": 1, "data.limit_train": 400}), callbacks=[ReportEpochs(trial, "val_accuracy")])
    assert last.stopped_by is None  # judged at its last epoch, a trial has nothing left to save: it completes


@needs_fashion
def test_a_trial_whose_worker_died_is_failed_by_its_heartbeat_and_run_again(tmp_path: Path) -> None:
    """A grid trial left running by a worker that died (on this machine: SQLite): its heartbeat stops, the next
    worker fails it and runs its grid point again; the grid is run once, exactly N trials count."""
    import optuna

    folder = tmp_path / "sw"
    folder.mkdir()
    url = f"sqlite:///{folder / 'study.db'}"
    study = optuna.create_study(storage=optuna.storages.RDBStorage(url), study_name="fashion-cnn", direction="maximize")
    study.set_user_attr("space", {"optimizer.lr": "0.001, 0.002"})
    study.set_user_attr("metric", "val_accuracy")
    from fcclass.config.load import load_config
    from fcclass.experiments.sweep import plan, sampler

    made = plan(load_config(None, TINY[1::2]), ["optimizer.lr=0.001,0.002"], {"sampler": "grid"}, folder)
    study.sampler = sampler(made, 0)  # a grid trial, as fcclass makes them
    ghost = study.ask({"optimizer.lr": optuna.distributions.CategoricalDistribution([0.001, 0.002])})
    study._storage.record_heartbeat(ghost._trial_id)  # its worker's last sign of life, then it was killed
    out = sweep(tmp_path, "-p", "optimizer.lr=0.001,0.002", "--sampler", "grid", "--pruner", "none", "-n", "2", "--heartbeat", "1",
                "--sweep-dir", str(folder))
    assert len(out["trials"]) == 2 and all(t["state"] == "complete" for t in out["trials"])
    assert sorted(t["params"]["optimizer.lr"] for t in out["trials"]) == [0.001, 0.002]  # the grid, each point once
    trials = optuna.load_study(study_name="fashion-cnn", storage=url).trials
    assert trials[0].state.name == "FAIL"
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].params == trials[0].params and retry[0].state.name == "COMPLETE"
    assert [t["retry_of"] for t in out["trials"] if t["number"] == retry[0].number] == [0]


@needs_fashion
def test_a_trial_interrupted_by_ctrl_c_runs_again_with_its_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fcclass.experiments import sweep_run

    def interrupted(self: object, trial: object, values: object) -> float:
        raise KeyboardInterrupt

    spec = ["-p", "optimizer.lr=loguniform(1e-4,1e-2)", "--sampler", "random", "-n", "1"]
    with monkeypatch.context() as m:
        m.setattr(sweep_run.Objective, "train", interrupted)
        res = runner.invoke(app, ["sweep", *TINY, "--set", f"train.runs_dir={tmp_path / 'runs'}", *spec])
    assert res.exit_code == 130 and "Interrupted" in res.output
    out = sweep(tmp_path, *spec)  # the rerun runs it, with the same parameters
    import optuna

    trials = optuna.load_study(study_name="fashion-cnn", storage=f"sqlite:///{out['sweep_dir']}/study.db").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"] and trials[1].params == trials[0].params
    assert len(out["trials"]) == 1 and out["trials"][0]["retry_of"] == 0 and out["trials"][0]["state"] == "complete"


@pytest.mark.slow  # 25 s: the heartbeat test in test_sweep_storage.py also ends with exactly N trials from two workers
@needs_fashion
def test_two_workers_on_one_storage_finish_exactly_n_trials(tmp_path: Path) -> None:
    """Two processes (as on two machines) share one study through --storage; then --workers 2 in one command."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    cmd = [sys.executable, "-m", "fcclass.cli", "sweep", *TINY, "--set", "train.threads=1", "--set", f"train.runs_dir={tmp_path / 'runs'}",
           "-p", "optimizer.lr=loguniform(1e-4,1e-2)", "--sampler", "random", "--pruner", "none", "-n", "4", "--storage", storage,
           "--sweep-dir", str(tmp_path / "shared")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    import optuna

    trials = optuna.load_study(study_name="fashion-cnn", storage=storage).trials
    ran = [t for t in trials if not t.user_attrs.get("surplus")]
    assert len(ran) == 4 and all(t.state.name == "COMPLETE" for t in ran)
    dirs = [t.user_attrs["run_dir"] for t in ran]
    assert len(set(dirs)) == 4 and sorted(p.name for p in (tmp_path / "shared").iterdir() if p.is_dir()) == sorted(Path(d).name for d in dirs)
    assert {t.user_attrs["pid"] for t in ran} == {p.pid for p in procs}  # both did some of the work
    assert all("run_dir" not in t.user_attrs for t in trials if t.user_attrs.get("surplus"))  # surplus: never trained
    out = sweep(tmp_path, "-p", "optimizer.lr=loguniform(1e-4,1e-2)", "--sampler", "random", "--pruner", "none", "-n", "2",
                "--workers", "2", "--oversubscribe", "--sweep-dir", str(tmp_path / "local"))  # also on a 1-core machine
    assert len(out["trials"]) == 2 and all(t["state"] == "complete" for t in out["trials"])


@needs_fashion
def test_without_a_validation_split_trials_complete_ranked_by_the_training_metric(tmp_path: Path) -> None:
    args = ["--set", "data.val_split=0", "-p", "optimizer.lr=loguniform(1e-4,1e-2)", "--sampler", "random", "--pruner", "median",
            "-n", "2", "--sweep-dir", str(tmp_path / "sw")]
    res = runner.invoke(app, ["sweep", *TINY, "--set", f"train.runs_dir={tmp_path / 'runs'}", *args])
    assert res.exit_code == 0, res.output
    assert "2 of 2 trials, by train_accuracy" in res.output and "complete  train_accuracy 0." in res.output
    out = json.loads(runner.invoke(app, ["sweep", "--sweep-dir", str(tmp_path / "sw"), "--status", "--json", "-"]).stdout)
    trials = out["trials"]
    assert [t["state"] for t in trials] == ["complete", "complete"] and {t["metric"] for t in trials} == {"train_accuracy"}
    assert trials[0]["value"] >= trials[1]["value"]  # ranked best first
    for t in trials:  # the value is the best epoch's training accuracy, as its run recorded it
        row = json.loads((Path(t["run_dir"]) / "summary.json").read_text())
        assert t["value"] == pytest.approx(row["best"]["train_accuracy"], abs=1e-4)


@needs_fashion
def test_a_diverging_trial_fails_and_says_why(tmp_path: Path) -> None:
    args = ["-p", "optimizer.lr=0.003,1.0e+20", "--sampler", "grid", "--pruner", "none", "-n", "2", "--sweep-dir", str(tmp_path / "sw")]
    res = runner.invoke(app, ["sweep", *TINY, "--set", f"train.runs_dir={tmp_path / 'runs'}", *args])
    assert res.exit_code == 0, res.output
    assert "fail  The training loss became nan in epoch 1" in res.output  # its progress line
    table = res.output[res.output.index("2 of 2 trials"):]
    assert "Note" in table and "The training loss became nan" in table and "optimizer.lr is 1e+20" in " ".join(table.split())
    trials = json.loads(runner.invoke(app, ["sweep", "--sweep-dir", str(tmp_path / "sw"), "--status", "--json", "-"]).stdout)["trials"]
    assert [(t["params"]["optimizer.lr"], t["state"]) for t in trials] == [(0.003, "complete"), (1e20, "fail")]
    assert trials[1]["fail_reason"].startswith("The training loss became nan in epoch 1") and trials[1]["run_dir"] is None
    assert trials[0]["fail_reason"] is None


def test_a_searched_batch_size_turns_the_short_run_plan_off(tmp_path: Path) -> None:
    """Otherwise every short trial would halve its batch to the same one and the search would compare nothing."""
    from fcclass.config.load import load_config
    from fcclass.experiments.sweep import plan

    made = plan(load_config("fashion_mnist"), ["data.batch_size=32,128,256"], {"sampler": "grid"}, tmp_path)
    assert made.base["train"]["short_run_steps"] == 0
    assert len(made.notes) == 1 and "data.batch_size is searched" in made.notes[0] and "(300)" in made.notes[0]
    kept = plan(load_config("fashion_mnist"), ["optimizer.lr=0.1,0.3"], {"sampler": "grid"}, tmp_path)
    assert kept.base["train"]["short_run_steps"] == 300 and kept.notes == []  # the plan scales a searched lr alike


def test_a_sweep_whose_every_trial_fails_exits_1_with_the_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from fcclass.errors import DataError

    fit_module = importlib.import_module("fcclass.training.fit")  # the module (fcclass.training.fit is also the function)

    def failing(cfg: object, **kwargs: object) -> None:
        raise DataError("The training data is gone.")

    monkeypatch.setattr(fit_module, "fit", failing)
    args = ["sweep", *TINY, "--set", f"train.runs_dir={tmp_path / 'runs'}", "-p", "optimizer.lr=0.1,0.01", "--sampler", "grid"]
    res = runner.invoke(app, [*args, "--json", "-"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "All 2 trials of the sweep failed, none gave a result. Trials 0, 1: The training data is gone. Fix" in " ".join(res.stderr.split())
    assert [t["state"] for t in json.loads(res.stdout)["trials"]] == ["fail", "fail"]  # the leaderboard still comes out
    status = runner.invoke(app, ["sweep", "--sweep-dir", str(tmp_path / "runs" / "sweep-fashion-cnn"), "--status"])
    assert status.exit_code == 0 and "The training data is gone." in status.output  # --status reports, it does not fail


@pytest.mark.parametrize("damage", ["deleted", "damaged"])
def test_status_shows_the_leaderboard_when_the_best_run_is_gone(tmp_path: Path, damage: str) -> None:
    import optuna

    folder = tmp_path / "sw"
    folder.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{folder / 'study.db'}", study_name="fashion-cnn", direction="maximize")
    for key, value in {"space": {"optimizer.lr": "0.1, 0.01"}, "metric": "val_accuracy", "trials": 2}.items():
        study.set_user_attr(key, value)
    run = folder / "trial-0000"
    if damage == "damaged":
        run.mkdir()
        (run / "config.yaml").write_text("model: [unclosed\n")
    dist = {"optimizer.lr": optuna.distributions.CategoricalDistribution([0.1, 0.01])}
    for lr, value in ((0.1, 0.8), (0.01, 0.5)):
        study.add_trial(optuna.trial.create_trial(params={"optimizer.lr": lr}, distributions=dist, value=value,
                                                  user_attrs={"run_dir": str(run), "epochs": 1, "metric": "val_accuracy"}))
    res = runner.invoke(app, ["sweep", "--sweep-dir", str(folder), "--status"])
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "2 of 2 trials" in text and "0.8000" in text and "0.5000" in text, res.output
    assert "Note: The best trial (0)'s run cannot give its config, so best.yaml is not written" in text
    assert ("is not a run directory" if damage == "deleted" else "config.yaml") in text and "Traceback" not in text
    assert not (folder / "best.yaml").exists()
    res = runner.invoke(app, ["sweep", "--sweep-dir", str(folder), "--status", "--json", "-"])
    assert res.exit_code == 0 and json.loads(res.stdout)["best_config"] is None
