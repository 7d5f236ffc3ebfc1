"""The user's own images: a folder per class, decoded by a DataLoader with workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CLOTHES, folder_config, needs_fashion
from typer.testing import CliRunner

from fcclass.cli import app

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that Rich does not wrap paths
CLASSES = CLOTHES


@pytest.fixture(scope="module")
def folder(clothes_folder: Path) -> Path:
    return clothes_folder


def write_config(tmp_path: Path, folder: Path) -> Path:
    return folder_config(tmp_path, folder, epochs=6, workers=2)


@needs_fashion
def test_imagefolder_trains_evaluates_and_predicts(folder: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, folder)
    res = runner.invoke(app, ["train", "-c", str(cfg)])
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "classes.json").read_text()) == sorted(CLASSES.values())
    ev = runner.invoke(app, ["eval", str(run_dir), "--json", "-"])
    assert ev.exit_code == 0, ev.output
    report = json.loads(ev.stdout)
    assert report["num_samples"] == 18  # data.test_split 0.1 of 180, stratified
    assert report["accuracy"] > 0.6  # chance is 1/3
    one = next((folder / "trouser").iterdir())
    pred = runner.invoke(app, ["predict", str(one), "--run", str(run_dir), "--json", "-"])
    assert pred.exit_code == 0, pred.output
    assert json.loads(pred.stdout)[0]["label"] in CLASSES.values()


@needs_fashion
def test_corrupt_image_in_the_folder_names_the_file(folder: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    for name in CLASSES.values():
        (copy / name / "zz_broken.png").write_bytes(b"not a png")
    cfg = write_config(tmp_path, copy)
    res = runner.invoke(app, ["train", "-c", str(cfg), "--set", "data.val_split=0.0", "--set", "data.num_workers=0"])
    assert res.exit_code == 1
    text = " ".join(res.output.split())
    assert "3 of 183 image file(s) cannot be read" in text  # every bad file, in one run, before training starts
    assert all(f"{name}/zz_broken.png" in text for name in CLASSES.values())
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_imagefolder_errors(tmp_path: Path) -> None:
    res = runner.invoke(app, ["summary", "--set", "data.dataset=imagefolder", "--set", f"data.path={tmp_path / 'nope'}"])
    assert res.exit_code == 1 and "is not a folder" in res.output
    (tmp_path / "only").mkdir()
    res = runner.invoke(app, ["summary", "--set", "data.dataset=imagefolder", "--set", f"data.path={tmp_path}"])
    assert res.exit_code == 1 and "one sub-folder per label" in res.output


@needs_fashion
def test_a_bad_image_in_the_test_split_is_found_before_training(folder: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "data"
    for split in ("train", "test"):
        shutil.copytree(folder, root / split)
    (root / "test" / "tshirt" / "broken.png").write_bytes(b"")
    good = next((root / "test" / "trouser").iterdir())
    (root / "test" / "trouser" / "truncated.png").write_bytes(good.read_bytes()[:200])  # a valid header: decoded to find
    res = runner.invoke(app, ["train", "-c", str(folder_config(tmp_path, root))])
    assert res.exit_code == 1
    text = " ".join(res.output.split())
    assert "2 of 362 image file(s) cannot be read" in text and "test/tshirt/broken.png" in text and "test/trouser/truncated.png" in text
    assert "epoch 1/" not in res.output and not (tmp_path / "runs").exists()
