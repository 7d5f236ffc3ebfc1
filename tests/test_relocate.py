"""`fcclass runs relocate`: a run told once where its data moved finds it there for eval, predict and resume; a new
place that does not hold the recorded data is refused, naming what differs, and nothing is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import folder_config, needs_fashion
from typer.testing import CliRunner

from fcclass.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


def _run(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, " ".join(res.output.split())


@pytest.fixture()
def moved_run(clothes_folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A 1-epoch image-folder run whose folder then moved (copied without modification times, the old one deleted)."""
    shutil.copytree(clothes_folder, tmp_path / "images")
    res = runner.invoke(app, ["train", "-c", str(folder_config(tmp_path, tmp_path / "images", epochs=1))])
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    shutil.copytree(tmp_path / "images", tmp_path / "moved", copy_function=shutil.copyfile)
    shutil.rmtree(tmp_path / "images")
    return run_dir, tmp_path / "moved"


@needs_fashion
def test_relocate_records_the_new_place_for_eval_predict_and_resume(moved_run: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, moved = moved_run
    code, out = _run("eval", str(run_dir), "--no-save")
    assert code == 1 and "is not there any more" in out
    res = runner.invoke(app, ["runs", "relocate", run_dir.name, "--runs-dir", str(run_dir.parent), "--data-root", str(moved), "--json", "-"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["key"] == "data.path" and report["old"] == str(tmp_path / "images") and report["new"] == str(moved)
    assert report["checked"] == 180 and set(report["rewritten"]) == {"last.pt", "best.pt", "splits.json", "summary.json", "config.yaml"}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["path"] == str(moved)
    assert json.loads((run_dir / "splits.json").read_text())["root"] == str(moved)
    assert json.loads((run_dir / "summary.json").read_text())["data"] == str(moved)
    assert runner.invoke(app, ["eval", str(run_dir), "--no-save"]).exit_code == 0  # no --data-root any more
    assert runner.invoke(app, ["predict", "--split", "test", "--run", str(run_dir), "--json", "-"]).exit_code == 0
    res = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", "train.epochs=2"])
    assert res.exit_code == 0, res.output
    code, out = _run("runs", "relocate", str(run_dir), "--data-root", str(moved))  # again: nothing to change
    assert code == 0 and "already records data.path" in out and "nothing to change" in out


@needs_fashion
def test_relocate_refuses_what_is_not_a_run_a_missing_place_and_other_data(moved_run: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, moved = moved_run
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code, out = _run("runs", "relocate", str(tmp_path), "--data-root", str(moved))
    assert code == 1 and out.startswith("Error:") and "is not a run directory" in out
    code, out = _run("runs", "relocate", str(run_dir), "--data-root", str(tmp_path / "nowhere"))
    assert code == 1 and "does not exist" in out
    test_files = json.loads((run_dir / "splits.json").read_text())["splits"]["test"]["files"]
    (moved / test_files[0]).unlink()
    with (moved / test_files[1]).open("ab") as f:
        f.write(b"\0")
    code, out = _run("runs", "relocate", str(run_dir), "--data-root", str(moved))
    assert code == 1 and "does not hold the data" in out and "Nothing was changed" in out and "Traceback" not in out
    assert "the test split: 1 file(s) vanished" in out and test_files[0] in out and "1 file(s) changed" in out and test_files[1] in out
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


@needs_fashion
def test_a_torchvision_runs_data_is_checked_where_it_is_said_to_be(trained_run: Path, tmp_path: Path) -> None:
    from conftest import DATA_ROOT

    from fcclass.data import record_differences
    from fcclass.runs.checkpoint import run_config
    from fcclass.runs.splits import read_splits

    cfg, record = run_config(trained_run), read_splits(trained_run)
    assert record is not None and record_differences(cfg.data, record, DATA_ROOT) == []
    (differs,) = record_differences(cfg.data, record, tmp_path)
    assert "holds no fashion_mnist files" in differs and not (tmp_path / "FashionMNIST").exists()  # nothing unpacked there
