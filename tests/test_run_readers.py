"""Reading a run directory back: every file goes through one guarded reader (a regular file, of a capped size), so a
FIFO, a device or a huge sparse file where a run's file should be is a damaged run, at once; `fcclass runs` and
`runs compare` list every run, a damaged one with why; what came from a file never drives the terminal; --json is
always JSON."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fcclass.cli import app
from fcclass.errors import CheckpointError, FcclassError
from fcclass.files import RefusedFile, read_regular

runner = CliRunner(env={"COLUMNS": "250"})
GOOD = {"name": "g", "state": "finished", "started": "2026-11-01T10:00:00", "dataset": "fashion_mnist", "params": 100,
        "epochs": {"planned": 2, "done": 2}, "best": {"epoch": 2, "val_accuracy": 0.9, "val_loss": 0.3}, "wall_seconds": 12.0}
BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]"
                                                          for p, n in zip("abcdefgh", "bcdefghi")]) + "\nname: *i\n"


def _run(runs: Path, name: str | bytes, summary: Any = None, config: str | None = None, metrics: str | None = None) -> Path:
    run = Path(os.fsdecode(os.path.join(os.fsencode(runs), os.fsencode(name))))
    run.mkdir(parents=True)
    if summary is not None:
        (run / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    if config is not None:
        (run / "config.yaml").write_text(config)
    if metrics is not None:
        (run / "metrics.csv").write_text(metrics)
    return run


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _invoke(*args: str) -> Any:
    started = time.monotonic()
    res = runner.invoke(app, list(args))
    assert time.monotonic() - started < 20, "a hang"
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


# ----------------------------------------------------------------------------- the one reader
def test_the_reader_refuses_what_is_not_a_small_regular_file_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")  # opening it to read would wait for a writer forever
    (tmp_path / "zero").symlink_to("/dev/zero")  # reading it would never end
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(20 << 30)  # 20 GB, on no disk space
    (tmp_path / "dir").mkdir()
    started = time.monotonic()
    for name, why in (("fifo", "a FIFO"), ("zero", "a character device"), ("dir", "a folder"), ("sparse", "21,474,836,480 bytes")):
        with pytest.raises(RefusedFile, match=why):
            read_regular(tmp_path / name, 1 << 20)
    assert time.monotonic() - started < 2
    (tmp_path / "ok").write_bytes(b"12345")
    assert read_regular(tmp_path / "ok", 5) == b"12345"
    with pytest.raises(RefusedFile, match="^it is 5 bytes, more than the 4 bytes such a file can take$"):
        read_regular(tmp_path / "ok", 4)
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing", 5)


# ----------------------------------------------------------------------------- fcclass runs
def _damaged_runs(runs: Path) -> None:
    _run(runs, "good", GOOD, "name: g\ntrain: {epochs: 2}\n")
    _run(runs, "nan", '{"wall_seconds": NaN, "state": "finished"}')
    _run(runs, "inf", '{"state": "finished", "test": {"loss": Infinity}}')
    _run(runs, "huge-value", {**GOOD, "best": {"val_accuracy": 1e308}})
    _run(runs, "types", {**GOOD, "params": "many", "epochs": {"done": [1]}})
    _run(runs, "nested", "[" * 100_000 + "]" * 100_000)
    fifo = _run(runs, "fifo", config="name: f\n")
    os.mkfifo(fifo / "summary.json")
    with open(_run(runs, "sparse", config="name: s\n") / "summary.json", "wb") as f:
        f.truncate(20 << 30)
    os.symlink("/dev/zero", _run(runs, "zero", config="name: z\n") / "summary.json")
    _run(runs, "string-epochs", config="train: {epochs: ten}\n", metrics="epoch,val_accuracy\n1,0.5\n")
    _run(runs, "nan-epoch", config="train: {epochs: 3}\n", metrics="epoch,val_accuracy\nnan,0.5\ninf,0.6\n")
    _run(runs, "bomb", config=BOMB)
    _run(runs, "deep-yaml", config="[" * 5000 + "]" * 5000)
    _run(runs, b"not-utf8-\xff\xfe", GOOD)


def test_one_bad_run_never_breaks_the_listing(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _damaged_runs(runs)
    started = time.monotonic()
    res = _invoke("runs", "--runs-dir", str(runs), "--json", "-")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in _strict_json(res.stdout)}
    assert len(rows) == 14 and rows["good"]["damaged"] is None and rows["good"]["val_accuracy"] == 0.9
    why = {name: r["damaged"] for name, r in rows.items()}
    assert "wall_seconds: Input should be a finite number" in why["nan"]
    assert "test.loss" in why["inf"] and "best.val_accuracy: Input should be less than or equal to 1" in why["huge-value"]
    assert "params: Input should be a valid integer" in why["types"] and "recursion limit" in why["nested"]
    assert why["fifo"] == "summary.json: it is a FIFO (named pipe), not a regular file"
    assert why["zero"] == "summary.json: it is a character device, not a regular file"
    assert "21,474,836,480 bytes, more than the" in why["sparse"]
    assert why["string-epochs"] == "config.yaml: train.epochs: Input should be a valid integer"
    assert why["nan-epoch"] == "metrics.csv: row 1: epoch is nan, which no epoch can have"
    assert "expands to more than 100,000 values" in why["bomb"] and "nested too deeply" in why["deep-yaml"]
    assert rows["not-utf8-\udcff\udcfe"]["state"] == "finished"  # listed as any other
    # a run whose summary.json is damaged is still described from its other files; with nothing else, it is "damaged"
    assert rows["fifo"]["state"] == "interrupted" and rows["nested"]["state"] == "damaged"
    for key in ("started", "name", "dataset", "params", "epochs", "val_accuracy", "test_accuracy", "wall_seconds", "state"):
        res = _invoke("runs", "--runs-dir", str(runs), "--sort", key, "--desc")
        assert res.exit_code == 0 and "Damaged nested: summary.json: Invalid JSON" in res.output, (key, res.output)
        assert "Damaged fifo: summary.json: it is a FIFO (named pipe), not a regular file" in res.output
    assert time.monotonic() - started < 30


def test_escape_sequences_from_run_files_never_reach_the_terminal(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    hostile = "\x1b]0;pwned\x07\x1b[2J\r\x9b31m\u202eevil"
    yaml_escaped = "\\e]0;pwned\\a\\e[2J\\r\\x9b31m\\u202eevil"  # YAML's escapes for the same characters
    _run(runs, "esc\x1b[31m", {**GOOD, "dataset": hostile, "started": "\x1b[5m2026"}, f'name: "{yaml_escaped}"\noptimizer: {{lr: 0.1}}\n')
    _run(runs, "plain", GOOD, "name: plain\noptimizer: {lr: 0.2}\n")
    for args in (["runs"], ["runs", "compare", "plain", "esc\x1b[31m", "-o", str(tmp_path / "c.png")]):
        res = _invoke(*args, "--runs-dir", str(runs))
        assert res.exit_code == 0, res.output
        assert not any(c in res.output for c in "\x1b\x07\r\x9b\u202e"), repr(res.output)
        assert "]0;pwned" in res.output  # the printable rest is shown


def test_json_output_is_json_nan_is_null(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _run(runs, "a", GOOD, "name: a\noptimizer: {lr: .nan}\ntrain: {epochs: 2}\n", "epoch,val_accuracy,val_loss\n1,0.5,0.7\n")
    _run(runs, "b", GOOD, "name: b\noptimizer: {lr: .inf}\ntrain: {epochs: 2}\n")
    res = _invoke("runs", "compare", "a", "b", "--runs-dir", str(runs), "-o", str(tmp_path / "c.png"), "--json", "-")
    assert res.exit_code == 0, res.output
    out = _strict_json(res.stdout)
    assert out["config_differences"]["optimizer.lr"] == [None, None]


def test_compare_lists_a_run_with_a_damaged_config_as_damaged(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _run(runs, "good", GOOD, "name: g\n")
    _run(runs, "bomb", GOOD, BOMB)
    os.mkfifo(_run(runs, "fifo", GOOD) / "config.yaml")
    os.mkfifo(runs / "fifo" / "metrics.csv")
    started = time.monotonic()
    res = _invoke("runs", "compare", "good", "bomb", "fifo", "--runs-dir", str(runs), "-o", str(tmp_path / "c.png"))
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "Damaged bomb:" in text and "expands to more than 100,000 values" in text
    assert "Damaged fifo: Cannot read" in text and "it is a FIFO (named pipe), not a regular file" in text
    assert time.monotonic() - started < 20


# ----------------------------------------------------------------------------- config.yaml and the lock
def test_a_run_config_that_is_a_bomb_or_special_file_is_a_message(tmp_path: Path) -> None:
    from fcclass.runs.checkpoint import run_config

    run = _run(tmp_path, "bomb", config=BOMB)
    with pytest.raises(FcclassError, match="expands to more than 100,000 values"):
        run_config(run)
    (run / "config.yaml").unlink()
    os.mkfifo(run / "config.yaml")
    with pytest.raises(CheckpointError, match="it is a FIFO"):
        run_config(run)
    (run / "config.yaml").unlink()
    (run / "config.yaml").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="character device"):
        run_config(run)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_lock_that_is_not_a_file_is_a_message_not_a_hang(tmp_path: Path, kind: str) -> None:
    from fcclass.runs.checkpoint import lock_run
    from fcclass.runs.summary import lock_is_held

    run = _run(tmp_path / "runs", "r", {**GOOD, "state": "running"})
    os.mkfifo(run / ".lock") if kind == "fifo" else (run / ".lock").mkdir()
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=r"its lock file .*\.lock: it is a (FIFO|folder).* Remove it"):
        lock_run(run)
    assert not lock_is_held(run)
    res = _invoke("runs", "--runs-dir", str(tmp_path / "runs"), "--json", "-")
    assert _strict_json(res.stdout)[0]["state"] == "interrupted"  # no process can hold such a lock
    assert time.monotonic() - started < 10


def test_the_lock_still_locks(tmp_path: Path) -> None:
    from fcclass.runs.checkpoint import lock_run
    from fcclass.runs.summary import lock_is_held

    lock = lock_run(tmp_path)
    assert lock_is_held(tmp_path) and (tmp_path / ".lock").stat().st_mode & 0o777 == 0o666 & ~_umask()
    with pytest.raises(CheckpointError, match="being trained by another process"):
        lock_run(tmp_path)
    lock.close()
    assert not lock_is_held(tmp_path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_int8_models_recorded_description_is_read_through_the_guarded_reader(tmp_path: Path) -> None:
    from fcclass.inference.export import _recorded_description

    good = tmp_path / "good.json"
    good.write_text('{"class_names": ["a", "b"]}')
    assert _recorded_description(good) == {"class_names": ["a", "b"]}
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "text.json").write_text("not json")
    os.mkfifo(tmp_path / "fifo.json")  # never opened for a blocking read: described afresh instead
    for name in ("list.json", "text.json", "fifo.json", "missing.json"):
        assert _recorded_description(tmp_path / name) is None
