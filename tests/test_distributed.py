"""Distributed data-parallel training on CPUs (gloo): torchrun's processes on this machine, two torchrun agents
simulating two nodes through c10d rendezvous, a rank that dies, and the sharding arithmetic behind them."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA_ROOT, needs_fashion

FCCLASS = [sys.executable, "-m", "fcclass"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# fp32 (bf16's rounding differs with the split of the batch), no BatchNormalization, dropout or augmentation: with the
# same global batch and seed, the processes' summed gradients equal one process's, so the runs agree to float rounding
# (BatchNorm normalises each process's part of the batch, and dropout draws per process, which a model that has them
# turns into small differences).
PLAIN = """
name: plain
seed: 0
data: {{dataset: fashion_mnist, root: {root}, download: false, limit_train: {n}, limit_test: 300, batch_size: 99}}
model:
  layers:
    - {{type: Conv2D, filters: 8, kernel_size: 3, activation: relu}}
    - {{type: MaxPooling2D, pool_size: 2}}
    - {{type: Flatten}}
    - {{type: Dense, units: 32, activation: relu}}
    - {{type: Dense, activation: softmax}}
optimizer: {{name: adam, lr: 0.003}}
train: {{epochs: {epochs}, threads: 1, precision: fp32, test_at_end: false, runs_dir: runs{extra}}}
"""


def _config(tmp_path: Path, n: int = 2000, epochs: int = 2, extra: str = "") -> Path:
    path = tmp_path / "plain.yaml"
    path.write_text(PLAIN.format(root=DATA_ROOT, n=n, epochs=epochs, extra=extra))
    return path


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    env.pop("WORLD_SIZE", None)
    return env


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def _close(a: list[dict[str, float]], b: list[dict[str, float]], loss_tol: float = 1e-3) -> None:
    """The stated tolerance: losses within 1e-3 (or loss_tol), accuracies within 0.5 points, the same LR."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            assert abs(ra[key] - rb[key]) < loss_tol, (key, ra, rb)
        for key in ("train_accuracy", "val_accuracy"):
            assert abs(ra[key] - rb[key]) <= 0.005, (key, ra, rb)
        assert ra["lr"] == pytest.approx(rb["lr"])


# ----------------------------------------------------------------------------- sharding arithmetic
def test_every_image_of_a_batch_goes_to_exactly_one_process() -> None:
    from fcclass.data.loaders import epoch_batches
    from fcclass.device import Dist

    n, batch = 1003, 100
    for world in (1, 2, 3, 7):
        parts = [epoch_batches(n, batch, Dist(rank, world, rank, world)) for rank in range(world)]
        assert len({len(p) for p in parts}) == 1  # every rank takes part in every step
        for step in zip(*parts):
            starts = sorted((s, e) for s, e, _ in step)
            assert starts[0][0] % batch == 0 and all(a[1] == b[0] for a, b in zip(starts, starts[1:]))
            sizes = [e - s for s, e, _ in step]
            assert max(sizes) - min(sizes) <= 1 and sum(sizes) == step[0][2]
    # a last batch smaller than the number of processes is left out, on every rank alike
    assert [b[2] for b in epoch_batches(201, 100, Dist(0, 3, 0, 3))] == [100, 100]


@pytest.mark.parametrize("weighted", [False, True])
def test_the_ranks_parts_of_a_batch_loss_add_up_to_its_loss(weighted: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """distributed.batch_loss: each rank's part of the batch's loss (with class weights, over the whole batch's sum of
    label weights; label smoothing included) adds up over the ranks to torch's loss of the whole batch, the loss one
    process computes unchanged."""
    import torch
    from torch import nn

    import fcclass.training.distributed as d
    from fcclass.device import SINGLE, Dist

    gen = torch.Generator().manual_seed(0)
    logits, y = torch.randn(99, 10, generator=gen), torch.randint(0, 10, (99,), generator=gen)
    weight = torch.tensor([10.0] + [0.1] * 9) if weighted else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    whole = nn.functional.cross_entropy(logits, y, weight=weight, label_smoothing=0.1)
    assert torch.equal(d.batch_loss(loss_fn, logits, y, 99, SINGLE), whole)
    if weighted:  # the whole batch's weight sum, as the ranks' all_reduce gives it
        monkeypatch.setattr(d, "all_sum", lambda value, job: weight[y].sum())
    for world in (2, 3):
        parts = [d.batch_loss(loss_fn, lo, yo, 99, Dist(r, world, r, world))
                 for r, (lo, yo) in enumerate(zip(logits.tensor_split(world), y.tensor_split(world)))]
        assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-6)


def test_torchrun_environment_mistakes_are_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    from fcclass.errors import FcclassError
    from fcclass.training.distributed import from_env

    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(FcclassError, match="WORLD_SIZE='two' is not a number"):
        from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(FcclassError, match="Inconsistent torchrun environment"):
        from_env()


def test_the_run_record_keeps_the_command_as_typed_nproc_per_node_included(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's processes get `fcclass train` with rebuilt arguments and without --nproc-per-node; the record keeps
    the command the user typed, which the launcher hands them (torchrun itself is faked here: the real job is below)."""
    import torch.distributed.run
    from typer.testing import CliRunner

    from fcclass.cli import app
    from fcclass.runs.summary import LAUNCH_COMMAND, command_line

    typed = ["train", "--nproc-per-node", "2", "--set", "optimizer={name: adam, lr: 0.003}", "--set", "train.epochs=1"]
    as_typed = "fcclass train --nproc-per-node 2 --set 'optimizer={name: adam, lr: 0.003}' --set train.epochs=1"
    main = str(Path(__import__("fcclass").__file__).with_name("__main__.py"))  # python -m fcclass, as torchrun starts it
    assert command_line([main, *typed], {}) == command_line(["/usr/local/bin/fcclass", *typed], {}) == as_typed
    seen = {}

    def fake_torchrun(args: object) -> None:
        seen["args"] = list(args.training_script_args)
        seen["child"] = command_line([main, *seen["args"]], dict(os.environ))  # what each process records
    monkeypatch.setattr(torch.distributed.run, "run", fake_torchrun)
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/fcclass", *typed])
    for key in ("PYTHONSAFEPATH", "LOGLEVEL", "OMP_NUM_THREADS", LAUNCH_COMMAND):  # launch sets them in this process
        monkeypatch.setenv(key, os.environ.get(key, ""))  # and monkeypatch puts them back as they were afterwards
    res = CliRunner().invoke(app, typed)
    assert res.exit_code == 0, res.output
    assert "--nproc-per-node" not in " ".join(seen["args"])  # the processes' own arguments lack it...
    assert seen["child"] == as_typed and LAUNCH_COMMAND not in os.environ  # ...their record has it; nothing left behind


# ----------------------------------------------------------------------------- real jobs
@pytest.mark.slow  # the class-weighted equivalence test below covers the same path in the default suite
@needs_fashion
def test_two_processes_train_one_run_that_matches_one_process(tmp_path: Path) -> None:
    """`fcclass train --nproc-per-node 2` (torchrun, gloo): one run directory, written by rank 0, whose metrics match a
    single-process run with the same global batch (99, split 50/49) and seed."""
    from fcclass.config.load import load_config
    from fcclass.training.fit import fit

    config = _config(tmp_path)
    single = fit(load_config(config, [f"train.runs_dir={tmp_path / 'single'}"]))
    out = subprocess.run([*FCCLASS, "train", "-c", str(config), "--nproc-per-node", "2", "--json", "-"], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)  # rank 0's JSON alone on stdout
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and Path(report["run_dir"]).resolve() == runs[0].resolve()
    _close(_metrics(runs[0]), _metrics(single.run_dir))
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["state"] == "finished" and summary["distributed"] == {"processes": 2, "nodes": 1, "backend": "gloo"}
    assert "Traceback" not in out.stderr and out.stderr.count("epoch 2/2") == 1  # only rank 0 reports


# Strongly unequal weights (labels left out weigh 1): the sum of label weights of each process's part of a batch varies
# with how many Shirts it holds, and is not half the whole batch's (without the fix: losses off by about 0.03).
WEIGHTS = ", label_smoothing: 0.1, class_weight: {Shirt: 10.0, Sandal: 0.1, Bag: 0.1}"


@pytest.mark.slow  # two torchrun processes: kept out of the default run's 5 minutes (CI runs them)
@needs_fashion
def test_two_processes_with_class_weights_match_one_process(tmp_path: Path) -> None:
    """With class weights (and label smoothing) the batch's loss is sum_i w_i l_i / sum_i w_i over the whole global
    batch: two processes (batch 99 split 50/49) train and report the run one process does, losses within 2e-3."""
    from fcclass.config.load import load_config
    from fcclass.training.fit import fit

    config = _config(tmp_path, n=1000, epochs=1, extra=WEIGHTS)
    single = fit(load_config(config, [f"train.runs_dir={tmp_path / 'single'}"]))
    out = subprocess.run([*FCCLASS, "train", "-c", str(config), "--nproc-per-node", "2"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = next((tmp_path / "runs").iterdir())
    _close(_metrics(run_dir), _metrics(single.run_dir), loss_tol=2e-3)
    command = json.loads((run_dir / "summary.json").read_text())["command"]
    assert command == shlex.join(["fcclass", "train", "-c", str(config), "--nproc-per-node", "2"])  # as typed


@pytest.mark.slow
@needs_fashion
def test_two_torchrun_agents_meet_through_c10d_rendezvous(tmp_path: Path) -> None:
    """Two nodes simulated on localhost: two torchrun agents (--nnodes 2, one process each) find each other through
    the c10d rendezvous and train one run, as one process would."""
    from fcclass.config.load import load_config
    from fcclass.training.fit import fit

    config = _config(tmp_path)
    single = fit(load_config(config, [f"train.runs_dir={tmp_path / 'single'}"]))
    port = _free_port()
    nodes = _agents(tmp_path, port, "test-job", [["-c", str(config)]] * 2)
    outs = _finish(nodes)
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    _close(_metrics(runs[0]), _metrics(single.run_dir))
    assert json.loads((runs[0] / "summary.json").read_text())["distributed"]["nodes"] == 2


def _agents(tmp_path: Path, port: int, job: str, args: list[list[str]]) -> list[subprocess.Popen]:
    """One torchrun agent per simulated node (one process each), meeting through c10d rendezvous on localhost. The
    first hosts the rendezvous store: both addresses are this machine's, and left to guess, both agents may try."""
    nodes = []
    for i, extra in enumerate(args):
        cmd = [*TORCHRUN, "--nnodes", str(len(args)), "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
               f"127.0.0.1:{port}", "--rdzv-id", job, "--rdzv-conf", f"is_host={'true' if i == 0 else 'false'}",
               "-m", "fcclass", "train", *extra]
        nodes.append(subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return nodes


def _finish(nodes: list[subprocess.Popen], timeout: float = 180) -> list[tuple[str, str]]:
    """The agents' output; on a timeout they are killed (no job left running into the next test) and it fails."""
    try:
        return [node.communicate(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.communicate()


def _rank_pid(parent_cmd: str, rank: int) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and parent_cmd.encode() in env and b"fcclass" in cmd:
            return int(pid)
    return None


@pytest.mark.slow
@needs_fashion
def test_a_killed_rank_takes_the_job_down_and_the_run_resumes(tmp_path: Path) -> None:
    """SIGKILL one process mid-training: the job ends in seconds with messages naming what happened (no hang, no
    traceback), the completed epochs are kept, and `--resume` under two processes finishes the run."""
    config = _config(tmp_path, n=20000, epochs=40)
    tag = f"FCCLASS_TEST_JOB={tmp_path.name}"
    env = {**_env(), "FCCLASS_TEST_JOB": tmp_path.name}
    job = subprocess.Popen([*FCCLASS, "train", "-c", str(config), "--nproc-per-node", "2"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "runs").glob("*/metrics.csv")) and time.time() < deadline:
        time.sleep(0.2)
    victim = _rank_pid(tag, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    _, err = job.communicate(timeout=60)
    assert job.returncode == 1 and time.time() - killed < 30
    assert "rank 1 was killed by SIGKILL" in err
    # Rank 0 says it lost contact when it notices before torchrun's agent stops it; when the agent is first (a race
    # of a few hundred milliseconds, seen in CI), the agent's summary says so instead. Either way the job is down.
    assert "lost contact with the other processes" in err or "rank 0 was stopped by torchrun" in err
    assert "Traceback" not in err
    run = next((tmp_path / "runs").iterdir())
    done = len(_metrics(run))
    assert done >= 1
    out = subprocess.run([*FCCLASS, "train", "--resume", str(run), "--set", f"train.epochs={done + 1}", "--nproc-per-node", "2"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(_metrics(run)) == done + 1
    assert json.loads((run / "summary.json").read_text())["state"] == "finished"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@needs_fashion
def test_machines_started_with_different_configs_are_told_so(tmp_path: Path) -> None:
    """Two simulated nodes whose configs differ (data.limit_train) stop at once with a message naming the key, instead
    of failing later in a collective or training different data."""
    config = _config(tmp_path)
    port = _free_port()
    nodes = _agents(tmp_path, port, "mismatch", [["-c", str(config), "--set", f"data.limit_train={n}"] for n in (2000, 2400)])
    errs = [err for _, err in _finish(nodes)]
    assert all(node.returncode != 0 for node in nodes)
    assert any("started with different configs (data.limit_train: 2000 on rank 0, 2400 on rank 1" in e or
               "started with different configs (data.limit_train: 2400 on rank 0, 2000 on rank 1" in e for e in errs), errs
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.mark.slow
@needs_fashion
def test_ctrl_c_stops_every_process_at_a_batch_and_keeps_the_run_resumable(tmp_path: Path) -> None:
    """SIGINT to the whole process group (what a terminal's Ctrl-C does, and torchrun's agent then signals its
    processes again): every process stops at the same batch, the last epoch is saved, exit 130, state interrupted."""
    config = _config(tmp_path, n=20000, epochs=40)
    job = subprocess.Popen([*FCCLASS, "train", "-c", str(config), "--nproc-per-node", "2"], cwd=tmp_path, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list((tmp_path / "runs").glob("*/metrics.csv")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGINT)
    out, err = job.communicate(timeout=60)
    assert job.returncode == 130, err[-2000:]
    assert "SIGINT: stopped in epoch" in out + err and "--nproc-per-node 2" in out + err and "Traceback" not in err
    run = next((tmp_path / "runs").iterdir())
    assert json.loads((run / "summary.json").read_text())["state"] == "interrupted"
    assert len(_metrics(run)) >= 1


# ----------------------------------------------------------------------------- launched by hand: misconfigurations
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_without_a_job_is_an_error_not_a_silent_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RANK=1 alone used to train quietly and print nothing, --json - included."""
    from typer.testing import CliRunner

    from fcclass.cli import app

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")
    res = CliRunner().invoke(app, ["train", "--set", f"train.runs_dir={tmp_path / 'runs'}", "--json", "-"])
    assert res.exit_code == 1 and res.stdout == ""
    assert "RANK=1 is set but WORLD_SIZE is not set" in res.stderr and "Unset RANK" in res.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_peers_never_come_stops_at_the_rendezvous_timeout_naming_them(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    from fcclass.device import Dist
    from fcclass.errors import FcclassError
    from fcclass.training.rendezvous import ENV_TIMEOUT, rendezvous

    port = _free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv(ENV_TIMEOUT, "1.5")
    started = time.monotonic()
    with pytest.raises(FcclassError) as e:
        rendezvous(Dist(rank, 3, rank, 3))
    assert time.monotonic() - started < 10
    missing = "ranks 1, 2 of 3 did not join the job" if rank == 0 else "rank 0 did not open"
    assert missing in str(e.value) and f"127.0.0.1:{port}" in str(e.value) and "FCCLASS_RENDEZVOUS_TIMEOUT" in str(e.value)


def test_a_master_addr_that_does_not_resolve_is_told_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from fcclass.device import Dist
    from fcclass.errors import FcclassError
    from fcclass.training.rendezvous import rendezvous

    monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    with pytest.raises(FcclassError, match="MASTER_ADDR 'no-such-host.invalid' does not resolve"):
        rendezvous(Dist(0, 2, 0, 2))


@needs_fashion
def test_rank_0_alone_under_a_hand_made_job_exits_1_at_the_timeout(tmp_path: Path) -> None:
    env = {**_env(), "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "FCCLASS_RENDEZVOUS_TIMEOUT": "2"}
    res = subprocess.run([*FCCLASS, "train", "-c", str(_config(tmp_path, n=300, epochs=1)), "--json", "-"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stdout == "" and "Traceback" not in res.stderr
    assert "rank 1 of 2 did not join the job at 127.0.0.1:" in res.stderr, res.stderr


def test_more_processes_than_cores_or_memory_are_refused_before_any_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--nproc-per-node 64 on 2 cores started 64 processes (6 GiB and climbing)."""
    from typer.testing import CliRunner

    from fcclass import memory
    from fcclass.cli import app
    from fcclass.training import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(memory, "cores", lambda: 2)
    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("started"))
    args = ["train", "-c", str(_config(tmp_path)), "--nproc-per-node", "64"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "--nproc-per-node 64 is more processes than this machine's 2 CPU core(s)" in res.stderr
    assert "--oversubscribe" in res.stderr
    monkeypatch.setattr(memory, "available", lambda device=None: (10 * memory.PROCESS_BYTES, "available on this machine"))
    res = CliRunner().invoke(app, [*args, "--oversubscribe"])
    assert res.exit_code == 1 and "Starting 64 training processes (about" in res.stderr and "4.0 GB is available" in res.stderr, res.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@needs_fashion
def test_two_processes_start_from_a_run_freeze_and_thaw_together_as_one_process_does(tmp_path: Path) -> None:
    """model.init_from with init_from.freeze and train.unfreeze under torchrun: every rank loads the same weights, the
    frozen layers are left out of DDP's gradient reduction until epoch 2, when each rank thaws them and the wrapper is
    made again. The metrics match one process's."""
    from fcclass.config.load import load_config
    from fcclass.training.fit import fit

    config = _config(tmp_path, n=1000, epochs=2)
    source = fit(load_config(config, [f"train.runs_dir={tmp_path / 'source'}", "train.epochs=1"])).run_dir
    sets = [f"model.init_from.path={source}", "model.init_from.freeze=true", "model.init_from.exclude=[dense_1]",
            "train.unfreeze={epoch: 2, lr_scale: 0.5}"]
    single = fit(load_config(config, [*sets, f"train.runs_dir={tmp_path / 'single'}"]))
    out = subprocess.run([*FCCLASS, "train", "-c", str(config), "--nproc-per-node", "2", *(f"--set={s}" for s in sets)],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = next((tmp_path / "runs").iterdir())
    _close(_metrics(run_dir), _metrics(single.run_dir))
    assert "Epoch 2: every layer trains from now on" in out.stdout
    import torch

    first, last = (torch.load(source / "best.pt", weights_only=True)["model_state"],
                   torch.load(run_dir / "last.pt", weights_only=True)["model_state"])
    assert not torch.equal(first["body.conv2d.0.weight"], last["body.conv2d.0.weight"])  # thawed at epoch 2
