"""Recorded splits: the images a run was tested on cannot move, runs are portable, folder layouts are explained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import CLOTHES, folder_config, needs_fashion
from typer.testing import CliRunner

from fcclass.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


def _train(cfg: Path) -> Path:
    res = runner.invoke(app, ["train", "-c", str(cfg)])
    assert res.exit_code == 0, res.output
    (run_dir,) = (cfg.parent / "runs").iterdir()
    return run_dir


def _eval(*args: str) -> tuple[int, dict | str]:
    res = runner.invoke(app, ["eval", *args, "--json", "-"])
    return res.exit_code, json.loads(res.stdout) if res.exit_code == 0 else " ".join(res.output.split())


@pytest.fixture()
def folder(clothes_folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "clothes"
    shutil.copytree(clothes_folder, copy)
    return copy


@needs_fashion
def test_images_added_after_training_do_not_change_the_test_split(folder: Path, tmp_path: Path) -> None:
    run_dir = _train(folder_config(tmp_path, folder))
    recorded = json.loads((run_dir / "splits.json").read_text())["splits"]
    test_files = recorded["test"]["files"]
    assert len(test_files) == 18 and not set(test_files) & set(recorded["train"]["files"])  # 10% of 180, disjoint
    code, before = _eval(str(run_dir))
    assert code == 0 and before["num_samples"] == 18
    for name in CLOTHES.values():  # 30 more images per label, e.g. copies of training images under new names
        for i, f in enumerate(sorted((folder / name).iterdir())[:30]):
            shutil.copy(f, folder / name / f"new_{i}.png")
    code, after = _eval(str(run_dir))
    assert code == 0 and after["num_samples"] == 18 and after["accuracy"] == before["accuracy"]
    assert any("90 image(s)" in note and "added after training" in note for note in after["notes"])
    res = runner.invoke(app, ["predict", "--split", "test", "--run", str(run_dir), "--json", "-"])
    assert res.exit_code == 0, res.output
    preds = json.loads(res.stdout)
    assert [Path(p["path"]).relative_to(folder).as_posix() for p in preds] == test_files  # exactly the recorded files
    assert all(p["true_label"] == f.split("/")[0] for p, f in zip(preds, test_files))


@needs_fashion
def test_changed_or_vanished_test_files_are_refused_unless_allowed(folder: Path, tmp_path: Path) -> None:
    run_dir = _train(folder_config(tmp_path, folder))
    test_files = json.loads((run_dir / "splits.json").read_text())["splits"]["test"]["files"]
    (folder / test_files[0]).unlink()
    with (folder / test_files[1]).open("ab") as f:
        f.write(b"\0")
    code, message = _eval(str(run_dir))
    assert code == 1
    assert "1 file(s) vanished" in message and test_files[0] in message
    assert "1 file(s) changed" in message and test_files[1] in message and "--allow-changed-data" in message
    code, report = _eval(str(run_dir), "--allow-changed-data")
    assert code == 0 and report["num_samples"] == 17
    assert any("1 vanished (left out) and 1 changed (used as they are now)" in note for note in report["notes"])


@needs_fashion
def test_a_run_works_from_another_folder_and_after_its_data_moved(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = tmp_path / "project"
    workdir.mkdir()
    shutil.move(str(folder), workdir / "images")
    monkeypatch.chdir(workdir)
    run_dir = workdir / "runs" / _train(folder_config(workdir, "images", runs="runs")).name  # relative paths, as users write them
    config = (run_dir / "config.yaml").read_text()
    assert f"path: {workdir / 'images'}" in config  # stored resolved
    code, here = _eval(str(run_dir))
    assert code == 0
    monkeypatch.chdir(tmp_path)
    code, elsewhere = _eval(str(run_dir))
    assert code == 0 and elsewhere["accuracy"] == here["accuracy"]
    # the folder moves (copied without keeping modification times: the content hashes still match), the run too
    shutil.copytree(workdir / "images", tmp_path / "moved" / "pictures", copy_function=shutil.copyfile)
    shutil.rmtree(workdir / "images")
    shutil.move(str(run_dir), tmp_path / "moved" / "run")
    code, message = _eval(str(tmp_path / "moved" / "run"))
    assert code == 1 and "is not there any more" in message and "--data-root" in message
    code, moved = _eval(str(tmp_path / "moved" / "run"), "--data-root", str(tmp_path / "moved" / "pictures"))
    assert code == 0 and moved["accuracy"] == here["accuracy"] and moved["num_samples"] == 18


def _make_layout(root: Path, layout: dict[str, list[str]], source: Path) -> None:
    image = next(source.rglob("*.png"))
    for split, labels in layout.items():
        for label in labels:
            folder = root / split / label if split else root / label
            folder.mkdir(parents=True)
            for i in range(3):
                shutil.copy(image, folder / f"{i}.png")


@pytest.mark.parametrize(("layout", "message"), [
    ({"train": ["a", "b"]}, "has train/ but no test/ folder"),
    ({"train": ["a", "b"], "test": ["a"]}, "missing ['b']"),
    ({"train": ["a", "b"], "test": ["a", "b", "c"]}, "extra ['c']"),
    ({"train": ["a", "b"], "": ["c"]}, "mixes split folders (train/) with other folders (c/)"),
])
@needs_fashion
def test_folder_layouts_that_do_not_fit_say_what_was_found_and_expected(clothes_folder: Path, tmp_path: Path,
                                                                          layout: dict, message: str) -> None:
    root = tmp_path / "data"
    _make_layout(root, layout, clothes_folder)
    res = runner.invoke(app, ["train", "-c", str(folder_config(tmp_path, root))])
    assert res.exit_code == 1
    text = " ".join(res.output.split())
    assert message in text and ("Expected" in text or "same labels" in text)
    assert not (tmp_path / "runs").exists()


@needs_fashion
def test_train_val_test_folders_are_used_as_given(clothes_folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    _make_layout(root, {"train": ["a", "b"], "val": ["a", "b"], "test": ["a", "b"]}, clothes_folder)
    run_dir = _train(folder_config(tmp_path, root, epochs=1))
    splits = json.loads((run_dir / "splits.json").read_text())["splits"]
    assert {name: sorted({f.split("/")[0] for f in s["files"]}) for name, s in splits.items()} == {
        "train": ["train"], "val": ["val"], "test": ["test"]}


@needs_fashion
def test_predictions_on_a_recorded_torchvision_split_name_each_image_by_its_index(trained_run: Path) -> None:
    from conftest import DATA_ROOT

    from fcclass.config.sections import DataConfig
    from fcclass.data import open_source

    res = runner.invoke(app, ["predict", "--split", "val", "--run", str(trained_run), "--json", "-", "-k", "1"])
    assert res.exit_code == 0, res.output
    preds = json.loads(res.stdout)
    recorded = json.loads((trained_run / "splits.json").read_text())["splits"]["val"]["indices"]
    assert [p["path"] for p in preds] == [f"fashion_mnist:train[{i}]" for i in recorded]
    source = open_source(DataConfig(root=str(DATA_ROOT), download=False), pools=("train",))
    names = source.class_names
    assert [p["true_label"] for p in preds] == [names[int(source.pools["train"].labels[i])] for i in recorded]
