"""`fcclass sweep`'s storage: a worker lost on another machine (heartbeat and retry), the heartbeat all workers
share, the warning for a SQLite file on a network filesystem."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, needs_fashion
from test_sweep import TINY, sweep
from typer.testing import CliRunner

from fcclass.cli import app

pytest.importorskip("optuna")
runner = CliRunner(env={"COLUMNS": "250"})


def _running_trial(url: str) -> object | None:
    """The study's trial that is training (running, its run folder made), if it has one yet."""
    import optuna

    try:
        trials = optuna.load_study(study_name="fashion-cnn", storage=url).get_trials(deepcopy=False)
    except Exception:  # noqa: BLE001 - the worker has not created the study (or its tables) yet
        return None
    return next((t for t in trials if t.state.name == "RUNNING" and t.user_attrs.get("run_dir")), None)


@pytest.mark.skipif(not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("unshare")),
                    reason="a host of its own (a UTS namespace) needs root and unshare")
@needs_fashion
def test_a_worker_killed_on_another_host_has_its_trial_failed_by_heartbeat_and_run_again(tmp_path: Path) -> None:
    import optuna

    folder = tmp_path / "sw"
    url = f"sqlite:///{folder / 'study.db'}"
    spec = ["-p", "optimizer.lr=0.001,0.002", "--sampler", "grid", "--pruner", "none", "-n", "2", "--sweep-dir", str(folder)]
    # The lost worker: a host name of its own, a 1 s heartbeat, and trials long enough to be killed in the middle of one.
    cmd = [sys.executable, "-m", "fcclass", "sweep", *TINY, "--set", "train.epochs=200", "--set", "train.threads=1",
           "--set", f"train.runs_dir={tmp_path / 'runs'}", "--heartbeat", "1", *spec]
    lost = subprocess.Popen(["unshare", "--uts", "sh", "-c", 'hostname other-host && exec "$@"', "sh", *cmd], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (trial := _running_trial(url)) is None:
            assert lost.poll() is None, lost.stderr.read() if lost.stderr else ""
            assert time.monotonic() < deadline, "the worker never started training"
            time.sleep(0.2)
        assert trial.user_attrs["host"] == "other-host"
    finally:
        lost.kill()
        lost.wait()
    out = sweep(tmp_path, *spec)  # a worker here, with the study's heartbeat (1 s): it fails the lost trial and runs it again
    trials = optuna.load_study(study_name="fashion-cnn", storage=url).trials
    assert trials[trial.number].state.name == "FAIL"
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == trial.number]
    assert len(retry) == 1 and retry[0].params == trial.params and retry[0].user_attrs["host"] != "other-host"
    assert sum(t.state.name == "COMPLETE" for t in trials) == 2  # exactly N complete trials
    assert sorted(t["params"]["optimizer.lr"] for t in out["trials"]) == [0.001, 0.002]  # the grid, each point once
    assert all(t["state"] == "complete" for t in out["trials"]) and [t["retry_of"] for t in out["trials"]].count(trial.number) == 1


def test_the_heartbeat_is_the_studys_all_its_workers_beat_alike(tmp_path: Path) -> None:
    from fcclass.config.load import load_config
    from fcclass.errors import FcclassError
    from fcclass.experiments.sweep import open_study, plan

    def opened(heartbeat: int | None, storage: str | None = None) -> object:
        made = plan(load_config(None, TINY[1::2]), ["optimizer.lr=0.1,0.01"], {"heartbeat": heartbeat, "storage": storage}, tmp_path)
        open_study(made)
        return made.opts.heartbeat

    assert opened(None) == 60  # the default, recorded by the study
    assert opened(None) == 60 and opened(60) == 60
    with pytest.raises(FcclassError, match="runs with --heartbeat 60"):
        opened(5)
    assert opened(None, str(tmp_path / "journal.log")) is None  # a journal storage: no heartbeat


def test_network_filesystems_are_found_from_the_mount_table() -> None:
    from fcclass.experiments.sweep import network_filesystem

    mounts = "\n".join(["/dev/sda1 / ext4 rw 0 0", "server:/export /mnt/shared nfs4 rw,relatime 0 0",
                        "/dev/sdb1 /mnt/shared/local xfs rw 0 0", "//nas/team /mnt/our\\040team cifs rw 0 0",
                        "tmpfs /mnt/over tmpfs rw 0 0", "host:/x /mnt/over fuse.sshfs rw 0 0", "bad line"])
    assert network_filesystem(Path("/mnt/shared"), mounts) == "nfs4"
    assert network_filesystem(Path("/mnt/shared/sweeps/a"), mounts) == "nfs4"
    assert network_filesystem(Path("/mnt/shared/local/sweeps"), mounts) is None  # a local disk mounted inside it
    assert network_filesystem(Path("/mnt/our team/sweeps"), mounts) == "cifs"  # \040: a space in the mount point
    assert network_filesystem(Path("/mnt/over/x"), mounts) == "fuse.sshfs"  # the last mount on a point hides the first
    assert network_filesystem(Path("/mnt/sharedness"), mounts) is None and network_filesystem(Path("/home/me"), mounts) is None


def test_a_sqlite_study_on_a_network_filesystem_is_warned_about(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna

    from fcclass.experiments import sweep as sweep_module

    monkeypatch.setattr(sweep_module, "read_mounts", lambda: f"/dev/sda1 / ext4 rw 0 0\nserver:/home {tmp_path} nfs rw 0 0\n")
    folder = tmp_path / "sw"
    folder.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{folder / 'study.db'}", study_name="fashion-cnn")
    study.set_user_attr("space", {"optimizer.lr": "0.5"})  # another search: the command stops before training anything
    res = runner.invoke(app, ["sweep", *TINY, "-p", "optimizer.lr=0.1,0.01", "--sweep-dir", str(folder), "--json", "-"])
    assert res.exit_code == 1 and "searched {'optimizer.lr': '0.5'}" in res.stderr
    warning = " ".join(res.stderr.split())
    assert f"Warning: The sweep's SQLite file {folder / 'study.db'} is on a network filesystem (nfs)" in warning
    assert "--storage /shared/study.log" in warning and "postgresql://" in warning and res.stdout == ""
    monkeypatch.setattr(sweep_module, "read_mounts", lambda: "/dev/sda1 / ext4 rw 0 0\n")
    res = runner.invoke(app, ["sweep", *TINY, "-p", "optimizer.lr=0.1,0.01", "--sweep-dir", str(folder)])
    assert res.exit_code == 1 and "Warning" not in res.output


def _hostile(tmp_path: Path, kind: str) -> tuple[list[str], str]:
    """A storage or sweep folder that cannot hold a study, and the message that refuses it."""
    import sqlite3

    if kind == "memory":
        return ["--storage", "sqlite:///:memory:"], "a database in memory, which ends with the process"
    if kind == "memory-short":
        return ["--storage", "sqlite://"], "a database in memory"
    if kind == "text":
        (tmp_path / "notes.txt").write_text("my notes\n")
        return ["--storage", str(tmp_path / "notes.txt")], "is not an Optuna journal file"
    if kind == "fifo":
        os.mkfifo(tmp_path / "pipe")
        return ["--storage", str(tmp_path / "pipe")], "is a FIFO, not a journal file"
    if kind == "fifo-sqlite":
        os.mkfifo(tmp_path / "pipe")
        return ["--storage", f"sqlite:///{tmp_path / 'pipe'}"], "is a FIFO, not an SQLite file"
    if kind == "other-sqlite":
        with sqlite3.connect(tmp_path / "other.db") as con:
            con.execute("CREATE TABLE trials (patient TEXT)")
        return ["--storage", f"sqlite:///{tmp_path / 'other.db'}"], "is an SQLite database of something else (tables: trials)"
    if kind == "text-as-sqlite":
        (tmp_path / "notes.txt").write_text("my notes\n")
        return ["--storage", f"sqlite:///{tmp_path / 'notes.txt'}"], "is not an SQLite database"
    (tmp_path / "file").write_text("x")
    return ["--sweep-dir", str(tmp_path / "file" / "sw")], f"'{tmp_path / 'file'}' is a file, not a folder"


@pytest.mark.parametrize("kind", ["memory", "memory-short", "text", "fifo", "fifo-sqlite", "other-sqlite", "text-as-sqlite",
                                  "sweep-dir-file"])
def test_a_storage_that_cannot_hold_a_study_is_refused_before_anything_is_written(tmp_path: Path, kind: str) -> None:
    args, message = _hostile(tmp_path, kind)
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    res = runner.invoke(app, ["sweep", *TINY, "--set", f"train.runs_dir={tmp_path / 'runs'}", "-p", "optimizer.lr=0.1,0.01", *args])
    assert res.exit_code == 1 and message in " ".join(res.stderr.split()), res.output
    assert "Traceback" not in res.output
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before  # nothing written, no folder made


def test_optuna_storages_pass_the_checks(tmp_path: Path) -> None:
    import optuna

    from fcclass.config.load import load_config
    from fcclass.experiments.sweep import plan
    from fcclass.experiments.sweep_checks import check_storage

    optuna.create_study(storage=f"sqlite:///{tmp_path / 'a.db'}", study_name="x")
    from optuna.storages.journal import JournalFileBackend

    optuna.create_study(storage=optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "j.log"))), study_name="x")
    (tmp_path / "empty.log").touch()
    for storage in (f"sqlite:///{tmp_path / 'a.db'}", str(tmp_path / "j.log"), str(tmp_path / "empty.log"),
                    f"sqlite:///{tmp_path / 'new.db'}", str(tmp_path / "new.log")):
        check_storage(plan(load_config(None, TINY[1::2]), ["optimizer.lr=0.1,0.01"], {"storage": storage}, tmp_path / "sw"))


def test_a_sweep_folder_that_cannot_be_made_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fcclass.experiments import sweep_checks

    real = os.access
    monkeypatch.setattr(sweep_checks.os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))  # read-only
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["sweep", *TINY, "-p", "optimizer.lr=0.1,0.01"])  # runs_dir: runs/, in the working folder
    assert res.exit_code == 1 and f"'{tmp_path}' is not writable" in " ".join(res.stderr.split()), res.output
    assert list(tmp_path.iterdir()) == []


def test_more_workers_than_cores_or_memory_are_refused_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fcclass import memory

    monkeypatch.setattr(memory, "cores", lambda: 2)
    args = ["sweep", *TINY, "--set", f"train.runs_dir={tmp_path / 'runs'}", "-p", "optimizer.lr=0.1,0.01"]
    res = runner.invoke(app, [*args, "--workers", "8"])
    assert res.exit_code == 1 and "--workers 8 runs 8 trials at once, but this machine gives fcclass 2 core(s)" in res.stderr
    assert "--oversubscribe" in res.stderr
    monkeypatch.setattr(memory, "available", lambda device=None: (3_000_000_000, "available on this machine"))
    res = runner.invoke(app, [*args, "--workers", "8", "--oversubscribe"])  # past the cores, not past the memory
    text = " ".join(res.stderr.split())
    assert res.exit_code == 1 and "8 sweep workers need about" in text and "Give --workers 3 or fewer." in text, res.output
    assert not (tmp_path / "runs").exists()


def test_the_workers_memory_plan_follows_the_largest_trial(tmp_path: Path) -> None:
    from fcclass.config.load import load_config
    from fcclass.experiments.sweep import plan
    from fcclass.experiments.sweep_checks import largest_trial_bytes

    def planned(spec: str) -> int:
        return largest_trial_bytes(plan(load_config(None, TINY[1::2]), [spec], {}, tmp_path))

    small, large = planned("model.layers.-3.units=16,32"), planned("model.layers.-3.units=16,4096")
    assert 0 < small < large and planned("data.batch_size=32,4096") > planned("data.batch_size=32,64")


@pytest.mark.parametrize("where", ["sweep-dir", "sqlite", "journal"])
def test_status_of_a_study_that_is_not_there_creates_nothing(tmp_path: Path, where: str) -> None:
    args = {"sweep-dir": ["--sweep-dir", str(tmp_path / "sw")], "sqlite": ["--storage", f"sqlite:///{tmp_path / 'x.db'}"],
            "journal": ["--storage", str(tmp_path / "x.log")]}[where]
    res = runner.invoke(app, ["sweep", *TINY, "--set", f"train.runs_dir={tmp_path / 'runs'}", "-p", "optimizer.lr=0.1,0.01",
                              "--status", *args])
    assert res.exit_code == 1 and "No sweep 'fashion-cnn'" in res.stderr and list(tmp_path.iterdir()) == [], res.output
