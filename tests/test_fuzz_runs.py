"""Property-based, on the run directory: whatever summary.json, metrics.csv, config.yaml or splits.json a real run
holds (wrong types, non-finite numbers, deep nesting, huge sizes, a FIFO, a device, a folder), `runs`, `runs compare`,
`eval` and `train --resume` each end in bounded time and memory with a result or a clear message (exit 1, no traceback).

Each example damages a fresh copy of the session's real trained run (conftest's ``trained_run``). The default profile
(tests/test_fuzz.py's: derandomized) keeps the default suite's cost to a few seconds; FCCLASS_FUZZ=deep explores more."""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_fashion
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz import DEEP, SECONDS, bounded, runner

from fcclass.cli import app

FILES = ["summary.json", "metrics.csv", "config.yaml", "splits.json"]
NUMBERS = st.one_of(st.floats(), st.integers(-(2**70), 2**70), st.sampled_from([1e308, -1e308, 5e-324]))
JSON_VALUES = st.recursive(st.none() | st.booleans() | NUMBERS | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=12)


def _stable(value: Any) -> int:
    """A hash that is the same in every process (Python's own is salted), so derandomized examples repeat exactly."""
    return zlib.crc32(repr(value).encode("utf-8", "surrogatepass"))


def _replaced(original: Any, path: list[str], value: Any) -> Any:
    """``original`` (parsed JSON or YAML) with the value at ``path`` (keys that exist are followed) set to ``value``."""
    if not path or not isinstance(original, dict) or not original:
        return value
    key = path[0] if path[0] in original else sorted(original)[_stable(path[0]) % len(original)]
    return {**original, key: _replaced(original[key], path[1:], value)}


@st.composite
def damage(draw: Any) -> tuple[str, str, Any]:
    """Which file, how (content, a special file, a huge sparse file) and what."""
    name = draw(st.sampled_from(FILES))
    how = draw(st.sampled_from(["value", "value", "value", "text", "deep", "fifo", "folder", "device", "sparse", "bomb"]))
    if how == "value":
        return name, how, (draw(st.lists(st.text(max_size=10), max_size=3)), draw(JSON_VALUES))
    if how == "text":
        return name, how, draw(st.sampled_from(["", "{", "nan", "epoch\nnan\n", "epoch,val_accuracy\n1e308,2\n", "\x00\xff",
                                                "epoch,val_loss\n1,inf\n", "train: {epochs: ten}\n", "[1, 2]",
                                                '{"format": 1, "splits": NaN}'])) + draw(st.text(max_size=20))
    if how == "deep":
        return name, how, draw(st.sampled_from([1000, 100_000]))
    return name, how, None


def _damage(run: Path, name: str, how: str, what: Any) -> None:
    path = run / name
    original = path.read_text(encoding="utf-8")
    path.unlink()
    if how == "value":
        import yaml

        keys, value = what
        if name == "metrics.csv":  # a cell of a row
            lines = original.splitlines()
            cells = lines[1].split(",")
            cells[_stable(keys) % len(cells)] = json.dumps(value)[:30].replace(",", " ")
            path.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
        elif name == "config.yaml":
            path.write_text(yaml.safe_dump(_replaced(yaml.safe_load(original), keys, value)))
        else:
            path.write_text(json.dumps(_replaced(json.loads(original), keys, value)))  # NaN and Infinity included
    elif how == "text":
        path.write_text(what, encoding="utf-8", errors="surrogateescape")
    elif how == "deep":
        path.write_text("[" * what + "]" * what if name != "metrics.csv" else "epoch\n" + "[" * what + "\n")
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "folder":
        path.mkdir()
    elif how == "device":
        path.symlink_to("/dev/zero")
    elif how == "sparse":
        with open(path, "wb") as f:
            f.truncate(20 << 30)
    else:  # a YAML alias bomb (a JSON file holding it is merely not JSON)
        path.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")) + "name: *i\n")


def _check(work: Path, args: list[str]) -> Any:
    started = time.monotonic()
    with bounded(work):
        result = runner.invoke(app, args, catch_exceptions=True)
    shown = f"fcclass {' '.join(args)}\n{result.output[-3000:]}"
    assert result.exception is None or isinstance(result.exception, SystemExit), f"{shown}\n{result.exception!r}"
    assert result.exit_code in (0, 1) and "Traceback" not in result.output, shown
    assert result.exit_code == 0 or "Error:" in result.output, shown
    assert time.monotonic() - started < SECONDS, shown
    return result


def _damaged_copy(tmp_path_factory: pytest.TempPathFactory, trained_run: Path, hurt: tuple[str, str, Any]) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("fuzzruns")
    shutil.copytree(trained_run, work / "runs" / "good")
    run = work / "runs" / "bad"
    shutil.copytree(trained_run, run)
    _damage(run, *hurt)
    return work, run


@needs_fashion
@settings(max_examples=600 if DEEP else 12)
@given(hurt=damage(), command=st.sampled_from(["runs", "runs-json", "compare"]))
def test_a_damaged_run_file_never_breaks_a_listing(tmp_path_factory: pytest.TempPathFactory, trained_run: Path,
                                                    hurt: tuple[str, str, Any], command: str) -> None:
    work, run = _damaged_copy(tmp_path_factory, trained_run, hurt)
    runs = str(work / "runs")
    args = {"runs": ["runs", "--runs-dir", runs, "--sort", "val_accuracy"], "runs-json": ["runs", "--runs-dir", runs, "--json", "-"],
            "compare": ["runs", "compare", "good", "bad", "--runs-dir", runs, "-o", str(work / "c.png"), "--json", "-"]}[command]
    result = _check(work, args)
    assert result.exit_code == 0, result.output  # one bad run never keeps the others from being listed
    if command != "runs":
        def refuse(constant: str) -> None:
            raise AssertionError(f"{constant} in --json output")

        out = json.loads(result.stdout, parse_constant=refuse)
        names = [r["name"] for r in (out if command == "runs-json" else out["runs"])]
        assert sorted(names) == ["bad", "good"]


@needs_fashion
@settings(max_examples=300 if DEEP else 4)
@given(hurt=damage(), command=st.sampled_from(["eval", "resume"]))
def test_a_damaged_run_file_gives_eval_and_resume_a_result_or_a_message(
        tmp_path_factory: pytest.TempPathFactory, trained_run: Path, hurt: tuple[str, str, Any], command: str) -> None:
    work, run = _damaged_copy(tmp_path_factory, trained_run, hurt)
    args = {"eval": ["eval", str(run), "--no-save", "--split", "val"], "resume": ["train", "--resume", str(run)]}[command]
    _check(work, args)
