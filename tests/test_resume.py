"""Runs that survive: signals, SIGKILL, a full or read-only disk; resume that does exactly what it says."""

from __future__ import annotations

import csv
import errno
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SignalAt, folder_config, needs_fashion, small_config
from typer.testing import CliRunner

from fcclass.cli import app
from fcclass.config.load import load_config
from fcclass.files import RunWriteError
from fcclass.runs.checkpoint import Checkpoint
from fcclass.runs.resume import RunFinished
from fcclass.training.callbacks import Callback, Curves
from fcclass.training.fit import fit

runner = CliRunner(env={"COLUMNS": "300"})
TESTS = Path(__file__).resolve().parent


def metrics(run_dir: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader((run_dir / "metrics.csv").open())]


IN_MEMORY = {"data.limit_train": 1000, "train.epochs": 3, "data.augment.horizontal_flip": True}


@needs_fashion
def test_ctrl_c_stops_saves_the_last_epoch_and_says_how_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = fit(small_config(tmp_path / "straight", **IN_MEMORY))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(small_config(tmp_path, **IN_MEMORY).to_yaml())
    at = SignalAt(2, 3, signal.SIGINT)  # the CLI takes no callbacks: ride on one it always installs
    monkeypatch.setattr(Curves, "on_batch_end", lambda self, trainer, info: at.on_batch_end(trainer, info))
    res = runner.invoke(app, ["train", "-c", str(cfg)])
    assert res.exit_code == 130, res.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    text = " ".join(res.output.split())
    assert "SIGINT: stopped in epoch 2; the last completed epoch (1) is saved" in text
    assert f"Continue with: fcclass train --resume {run_dir}" in text
    assert Checkpoint.load(run_dir / "last.pt").epoch == 1
    monkeypatch.undo()
    res = runner.invoke(app, ["train", "--resume", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert metrics(run_dir) == metrics(straight.run_dir)  # model, optimizer, schedule and data order all restored


@needs_fashion
def test_ctrl_c_in_the_first_epoch_leaves_nothing(tmp_path: Path) -> None:
    result = fit(small_config(tmp_path, **IN_MEMORY), callbacks=[SignalAt(1, 2, signal.SIGTERM)])
    assert result.interrupted == "SIGTERM" and result.removed
    assert not any((tmp_path / "runs").iterdir())


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from conftest import small_config
from fcclass.training.callbacks import Callback
from fcclass.config import load_config
from fcclass.training.fit import fit

class Kill(Callback):
    def on_batch_end(self, trainer, info):
        if (info.epoch, info.batch) == (2, 3):
            os.kill(os.getpid(), signal.SIGKILL)

cfg = load_config(sys.argv[1])
fit(cfg, callbacks=[Kill()])
"""


def _config_file(tmp_path: Path, kind: str, clothes_folder: Path | None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    if kind == "imagefolder":
        return folder_config(tmp_path, clothes_folder, epochs=3, workers=2, cache="off")  # DataLoader workers, as the README says
    path = tmp_path / "c.yaml"
    path.write_text(small_config(tmp_path, **IN_MEMORY).to_yaml())
    return path


@pytest.mark.slow  # 15-20 s each (three trainings, two of them in fresh processes); Ctrl-C and full-disk resumes stay fast
@needs_fashion
@pytest.mark.parametrize("kind", ["in-memory", "imagefolder"])
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue("clothes_folder") if kind == "imagefolder" else None
    straight = fit(load_config(_config_file(tmp_path / "straight", kind, folder)))
    cfg = _config_file(tmp_path, kind, folder)
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(tests=str(TESTS)), str(cfg)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert Checkpoint.load(run_dir / "last.pt").epoch == 1  # the last completed epoch, intact
    resumed = subprocess.run([sys.executable, "-m", "fcclass.cli", "train", "--resume", str(run_dir)],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1" in resumed.stdout
    rows = metrics(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]  # exactly train.epochs epochs, none twice
    # each epoch's order, augmentation and dropout come from (seed, epoch): DataLoader workers change nothing
    assert rows == metrics(straight.run_dir)


@needs_fashion
def test_resume_refuses_what_it_cannot_do_and_re_plans_more_epochs(tmp_path: Path) -> None:
    over = {"data.limit_train": 600, "train.epochs": 2, "scheduler.name": "onecycle"}
    run_dir = fit(small_config(tmp_path, **over)).run_dir
    other = tmp_path / "other.yaml"
    other.write_text("model: {layers: [{type: Flatten}, {type: Dense}]}\n")

    def train(*args: str):
        res = runner.invoke(app, ["train", "--resume", str(run_dir), *args])
        return res.exit_code, " ".join(res.output.split())

    code, text = train("-c", str(other))
    assert code == 1 and "-c/--config cannot be combined with it" in text
    code, text = train()
    assert code == 0 and "already finished: it completed all 2 epochs" in text and "--set train.epochs=N" in text
    code, text = train("--set", "optimizer.lr=0.1")
    assert code == 1 and "--set optimizer.lr cannot change when resuming" in text and "train.epochs" in text
    code, text = train("--set", "train.epochs=1")
    assert code == 1 and "below the 2 epochs" in text
    res = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", "train.epochs=4", "--print-config"])
    assert res.exit_code == 0 and yaml.safe_load(res.stdout)["train"]["epochs"] == 4
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 2  # printing changed nothing
    code, text = train("--set", "train.epochs=4")
    assert code == 0 and "the LR schedule is re-planned" in text
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 4
    fresh = fit(small_config(tmp_path / "fresh", **{**over, "train.epochs": 4})).run_dir
    lrs = [float(r["lr"]) for r in metrics(run_dir)]
    assert lrs[2:] == pytest.approx([float(r["lr"]) for r in metrics(fresh)][2:], rel=1e-5)  # the 4-epoch one-cycle plan
    assert lrs[3] > 1e-4  # not the old plan's ~0 tail


@needs_fashion
def test_early_stopped_run_says_so_on_resume(tmp_path: Path) -> None:
    result = fit(small_config(tmp_path, **{"data.limit_train": 600, "train.epochs": 5, "train.early_stopping.monitor": "val_accuracy",
                                           "train.early_stopping.patience": 1, "train.early_stopping.min_delta": 1.0}))
    assert result.stopped_early
    res = runner.invoke(app, ["train", "--resume", str(result.run_dir)])
    assert res.exit_code == 0 and "early stopping ended it after epoch 2" in " ".join(res.output.split())
    res = runner.invoke(app, ["train", "--resume", str(result.run_dir), "--set", "train.early_stopping.patience=3"])
    assert res.exit_code == 0, res.output
    assert len(metrics(result.run_dir)) == 4  # on until the new patience ran out


# ----------------------------------------------------------------------------- full disk, read-only folder
@pytest.fixture()
def small_disk(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


class SpoilDisk(Callback):
    def __init__(self, mnt: Path, how: str) -> None:
        self.mnt, self.how = mnt, how

    def on_epoch_end(self, trainer, row, is_best) -> None:
        if row["epoch"] != 1:
            return
        if self.how == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(self.mnt)], check=True)
            return
        with open(self.mnt / "filler", "wb") as f:  # use up every free byte
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass


@needs_fashion
@pytest.mark.parametrize("how", ["full", "read-only"])
def test_a_full_or_read_only_disk_stops_cleanly_and_the_run_resumes(small_disk: Path, tmp_path: Path, how: str) -> None:
    over = {**IN_MEMORY, "train.runs_dir": str(small_disk / "runs")}
    with pytest.raises(RunWriteError) as e:
        fit(small_config(tmp_path, **over), callbacks=[SpoilDisk(small_disk, how)])
    (run_dir,) = (small_disk / "runs").iterdir()
    message = str(e.value)
    reason = "no space left on the device" if how == "full" else "the file system is read-only"
    assert f"Cannot write last.pt in '{run_dir}': {reason}" in message
    assert "the last good checkpoint (epoch 1) is kept" in message and f"fcclass train --resume {run_dir}" in message
    assert Checkpoint.load(run_dir / "last.pt").epoch == 1 and not list(run_dir.glob(".*.tmp"))
    if how == "full":
        (small_disk / "filler").unlink()
    else:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    resumed = fit(resume=run_dir)
    straight = fit(small_config(tmp_path / "straight", **IN_MEMORY))
    assert metrics(resumed.run_dir) == metrics(straight.run_dir)


@needs_fashion
def test_a_failed_best_checkpoint_write_is_repaired_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcclass.runs.checkpoint

    real = fcclass.runs.checkpoint.atomic_write_bytes
    writes = {"best.pt": 0}

    def flaky(path: Path, data: bytes) -> None:
        if Path(path).name == "best.pt":
            writes["best.pt"] += 1
            if writes["best.pt"] == 2:  # the second best.pt (of whichever epoch improved next)
                raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(fcclass.runs.checkpoint, "atomic_write_bytes", flaky)
    with pytest.raises(RunWriteError, match=r"Cannot write best.pt .* no space left on the device") as e:
        fit(small_config(tmp_path, **{**IN_MEMORY, "train.epochs": 5}))  # the 2nd improvement comes before the last epoch
    monkeypatch.undo()
    stopped = re.search(r"Training stopped in epoch (\d+); the last good checkpoint \(epoch (\d+)\) is kept", str(e.value))
    assert stopped is not None and stopped[1] == stopped[2]  # last.pt of that epoch was written before best.pt failed
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert Checkpoint.load(run_dir / "best.pt").epoch < int(stopped[1]) == Checkpoint.load(run_dir / "last.pt").epoch
    result = fit(resume=run_dir)
    assert Checkpoint.load(run_dir / "best.pt").epoch == result.best_epoch
    assert len(metrics(run_dir)) == 5


@needs_fashion
def test_a_best_checkpoint_lost_in_the_last_epoch_is_repaired_even_though_the_run_is_finished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcclass.runs.checkpoint

    real = fcclass.runs.checkpoint.atomic_write_bytes
    writes = {"best.pt": 0}

    def flaky(path: Path, data: bytes) -> None:
        if Path(path).name == "best.pt":
            writes["best.pt"] += 1
            if writes["best.pt"] == 2:  # epoch 2's best.pt: the last epoch, which improves on the first
                raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(fcclass.runs.checkpoint, "atomic_write_bytes", flaky)
    with pytest.raises(RunWriteError, match="Cannot write best.pt"):
        fit(small_config(tmp_path, **{"data.limit_train": 1000, "train.epochs": 2}))
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert Checkpoint.load(run_dir / "best.pt").epoch == 1 and Checkpoint.load(run_dir / "last.pt").epoch == 2
    with pytest.raises(RunFinished):
        fit(resume=run_dir)
    assert Checkpoint.load(run_dir / "best.pt").epoch == 2  # the finished run has its best model back


@needs_fashion
def test_resume_after_the_data_moved_keeps_working_from_anywhere(clothes_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(clothes_folder, work / "imgs")
    monkeypatch.chdir(work)
    result = fit(load_config(folder_config(work, "imgs", epochs=1, runs="runs")))
    run_dir = work / "runs" / result.run_dir.name
    shutil.move("imgs", "imgs_moved")
    res = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", "train.epochs=2", "--data-root", "imgs_moved"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["path"] == str(work / "imgs_moved")  # absolute
    monkeypatch.chdir(tmp_path)  # elsewhere: the run knows where its data is now, for resume and for eval
    res = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", "train.epochs=3"])
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["eval", str(run_dir), "--no-save"]).exit_code == 0
    res = runner.invoke(app, ["train", "--data-root", "x"])
    assert res.exit_code == 1 and "--data-root goes with --resume" in res.output


@needs_fashion
def test_a_run_being_trained_cannot_be_resumed_by_a_second_process(tmp_path: Path) -> None:
    from fcclass.errors import CheckpointError
    from fcclass.runs.checkpoint import lock_run

    run_dir = fit(small_config(tmp_path, **{"data.limit_train": 500, "train.epochs": 1})).run_dir
    held = lock_run(run_dir)  # what the first process holds while it trains (released if it is killed)
    try:
        with pytest.raises(CheckpointError, match="is being trained by another process right now"):
            fit(resume=run_dir, overrides=["train.epochs=2"])
    finally:
        held.close()
    assert len(fit(resume=run_dir, overrides=["train.epochs=2"]).history) == 2
