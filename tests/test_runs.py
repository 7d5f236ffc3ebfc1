"""Run directories and checkpoints: safe loading of untrusted files, atomic writes, and runs that cannot pass for
something they are not (untrained weights, a folder given as a checkpoint, "the newest run")."""

from __future__ import annotations

import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, needs_fashion
from typer.testing import CliRunner

from fcclass.cli import app
from fcclass.errors import CheckpointError
from fcclass.files import atomic_write_bytes
from fcclass.runs.checkpoint import Checkpoint, newest_trained_run, resolve_checkpoint

runner = CliRunner(env={"COLUMNS": "200"})


class _Boom:
    def __reduce__(self):  # runs os.system at unpickling time if loading were unsafe
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    boom = _Boom()
    boom.marker = marker
    evil = tmp_path / "evil.pt"
    torch.save({"fcclass_checkpoint": 2, "payload": boom}, evil)
    with pytest.raises(CheckpointError, match="Refused to load"):
        Checkpoint.load(evil)
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(boom))
    with pytest.raises(CheckpointError):
        Checkpoint.load(plain)
    assert not marker.exists()


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        Checkpoint.load(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a fcclass checkpoint"):
        Checkpoint.load(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        Checkpoint.load(tmp_path / "missing.pt")


def _ckpt(epoch: int = 1) -> Checkpoint:
    return Checkpoint({"w": torch.ones(3)}, {"name": "x"}, ["a", "b"], [1, 2, 2], [0.5], [0.25], epoch)


def test_checkpoint_round_trips_and_saving_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    _ckpt().save(path)
    back = Checkpoint.load(path)
    assert back.model_state["w"].sum() == 3 and back.class_names == ["a", "b"] and back.epoch == 1 and not back.resumable
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]

    class Failing:
        def __bytes__(self):  # pragma: no cover - only used to make write fail
            raise RuntimeError

    with pytest.raises(TypeError):
        atomic_write_bytes(path, Failing())  # type: ignore[arg-type]
    assert Checkpoint.load(path).model_state["w"].sum() == 3  # the old file survives
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_checkpoints_of_fcclass_0_1_still_load_for_inference(tmp_path: Path) -> None:
    old = tmp_path / "old.pt"
    torch.save({"fcclass_checkpoint": 1, "model_state": {}, "config": {}, "class_names": ["a"], "input_shape": [1, 2, 2],
                "mean": [], "std": [], "epoch": 3, "rng": {"torch": torch.zeros(2)}, "optimizer_state": {}}, old)
    ckpt = Checkpoint.load(old)
    assert ckpt.format == 1 and ckpt.epoch == 3 and not ckpt.resumable


def test_missing_runs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="No trained runs found"):
        resolve_checkpoint(runs_dir=tmp_path / "runs")
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "nope")


# ----------------------------------------------------------------------------- untrained runs are never models
def _untrained_copy(trained_run: Path, runs: Path) -> Path:
    """What a run killed during its first epoch leaves: config, splits and an epoch-0 last.pt, no best.pt."""
    run = runs / "killed-in-epoch-1"
    run.mkdir(parents=True)
    for name in ("config.yaml", "classes.json", "splits.json"):
        shutil.copy(trained_run / name, run / name)
    ckpt = Checkpoint.load(trained_run / "last.pt")
    ckpt.epoch = 0
    ckpt.save(run / "last.pt")
    return run


@needs_fashion
def test_a_run_with_no_completed_epoch_is_refused_and_skipped(trained_run: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    copy = shutil.copytree(trained_run, runs / trained_run.name)
    for name in ("best.pt", "last.pt"):  # trained an hour ago: the killed run below is the newest
        os.utime(copy / name, (time.time() - 3600, time.time() - 3600))
    killed = _untrained_copy(trained_run, runs)  # the newest run, but with random weights
    for args in (["eval", str(killed)], ["predict", "x.png", "--run", str(killed)], ["export", str(killed)],
                 ["eval", "--checkpoint", str(killed / "last.pt")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 1, (args, res.output)
        text = " ".join(res.output.split())
        assert "no trained model" in text or "untrained" in text
        assert f"fcclass train --resume {killed}" in text or "Resume that run" in text
    # "the newest run" is the newest trained one, and the output says which was picked and what was passed over
    res = runner.invoke(app, ["eval", "--runs-dir", str(runs), "--json", "-"])
    assert res.exit_code == 0, res.output
    assert str(runs / trained_run.name) in res.stdout and killed.name in res.stdout  # the notes field names both
    picked, skipped = newest_trained_run(runs)
    assert picked.name == trained_run.name and [p.name for p in skipped] == [killed.name]


@needs_fashion
def test_a_run_directory_given_as_checkpoint_says_to_pass_it_as_the_run(trained_run: Path) -> None:
    for args in (["eval", "--checkpoint", str(trained_run)], ["predict", "x.png", "--checkpoint", str(trained_run)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 1
        text = " ".join(res.output.split())
        assert "is a folder" in text and f"fcclass predict --run {trained_run}" in text and f"fcclass eval {trained_run}" in text


@needs_fashion
def test_the_newest_run_means_the_last_one_trained(trained_run: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    a, b = runs / "a", runs / "b"
    shutil.copytree(trained_run, a)
    shutil.copytree(trained_run, b)
    now = time.time()

    def trained_at(run: Path, when: float) -> None:
        for f in (run / "best.pt", run / "last.pt"):
            os.utime(f, (when, when))

    trained_at(a, now - 100)
    trained_at(b, now - 50)
    assert newest_trained_run(runs)[0] == b
    trained_at(a, now - 10)  # a resumed and trained again
    assert newest_trained_run(runs)[0] == a


def test_a_checkpoint_whose_config_stores_every_optimizer_key_still_loads(tmp_path: Path) -> None:
    # fcclass versions before the optimizer/scheduler key checks stored every key, e.g. momentum: 0.0 under adam
    from fcclass.config.load import load_config
    from fcclass.config.sections import OptimizerConfig, SchedulerConfig
    from fcclass.inference.load import load_for_inference
    from fcclass.model.network import build_model

    cfg = load_config(ROOT / "configs" / "mlp.yaml")
    stored = {**cfg.to_dict(), "optimizer": {key: getattr(cfg.optimizer, key) for key in OptimizerConfig.model_fields},
              "scheduler": {key: getattr(cfg.scheduler, key) for key in SchedulerConfig.model_fields}}
    net = build_model(cfg.model, [1, 28, 28], 10)
    Checkpoint(net.state_dict(), stored, [str(i) for i in range(10)], [1, 28, 28], [0.5], [0.25], 1).save(tmp_path / "best.pt")
    model = load_for_inference(checkpoint=tmp_path / "best.pt", device="cpu")
    assert model.config == cfg
    assert all(torch.equal(a, b) for a, b in zip(model.model.state_dict().values(), net.state_dict().values()))
