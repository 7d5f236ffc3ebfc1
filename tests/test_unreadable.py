"""data.on_unreadable (error | skip) on a real image folder with a truncated JPEG, an empty file and a text file named
.png; and the summary that ends `fcclass predict`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fcclass.cli import app

runner = CliRunner(env={"COLUMNS": "250"})
LABELS = ("ant", "bee", "cat")
BAD = {"ant/notes.png": "not an image file", "cat/empty.png": "not an image file", "bee/truncated.jpg": "truncated"}


def make_photos(root: Path, per_label: int = 30) -> Path:
    """JPEGs of 16x16 pixels whose brightness gives the label (learnable in a few epochs), and three bad files."""
    rng = np.random.default_rng(0)
    for k, label in enumerate(LABELS):
        (root / label).mkdir(parents=True)
        for i in range(per_label):
            Image.fromarray((rng.integers(0, 120, (16, 16, 3)) + 60 * k).astype(np.uint8)).save(root / label / f"{i:03d}.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)).save(root / "bee" / "truncated.jpg", quality=95)
    whole = (root / "bee" / "truncated.jpg").read_bytes()
    (root / "bee" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # its header reads: only decoding finds it
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "ant" / "notes.png").write_text("this is not an image\n")
    return root


def config(tmp_path: Path, folder: Path, epochs: int = 2, **data: object) -> Path:
    extra = "".join(f", {k}: {v}" for k, v in data.items())
    path = tmp_path / "photos.yaml"
    path.write_text(f"name: photos\ndata: {{dataset: imagefolder, path: '{folder}', image_size: [16, 16], batch_size: 16, "
                    f"num_workers: 0{extra}}}\nmodel:\n  layers:\n    - {{type: Conv2D, filters: 8, kernel_size: 3, activation: relu}}\n"
                    "    - {type: MaxPooling2D}\n    - {type: Flatten}\n    - {type: Dense, activation: softmax}\n"
                    f"train: {{epochs: {epochs}, runs_dir: '{tmp_path / 'runs'}'}}\n")
    return path


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_photos(tmp_path_factory.mktemp("unreadable") / "photos")


@pytest.fixture(scope="module")
def skipped_run(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A run trained with data.on_unreadable: skip (decode cache on), and its output."""
    tmp = tmp_path_factory.mktemp("skip-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FCCLASS_CACHE_DIR", str(tmp / "cache"))
        res = runner.invoke(app, ["train", "-c", str(config(tmp, photos, on_unreadable="skip"))])
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp / "runs").iterdir()
    return run_dir, res.output


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FCCLASS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_error_is_the_default_and_names_every_unreadable_file(photos: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["train", "-c", str(config(tmp_path, photos))])
    text = one_line(res.output)
    assert res.exit_code == 1 and "2 of 93 image file(s) cannot be read" in text, text  # the headers: before any epoch
    assert "ant/notes.png" in text and "cat/empty.png" in text and "epoch 1/" not in text
    assert text.endswith("Remove or replace these files and run again, or set data.on_unreadable: skip to train without them.")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_skip_leaves_them_out_and_lists_each_in_the_header_and_the_run_record(skipped_run: tuple[Path, str], photos: Path) -> None:
    run_dir, output = skipped_run
    text = one_line(output)
    assert "Skipped 3 unreadable image file(s) (left out of the splits; data.on_unreadable: skip)" in text
    for name, why in BAD.items():  # found by the header scan (2) and by building the decode cache (the truncated JPEG)
        assert f"{name}: " in text and why in text.split(f"{name}: ")[1][:120]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(Path(s["path"]).relative_to(photos).as_posix() for s in summary["skipped"]) == sorted(BAD)
    splits = json.loads((run_dir / "splits.json").read_text())
    assert sorted(s["file"] for s in splits["skipped"]) == sorted(BAD)
    recorded = [f for split in splits["splits"].values() for f in split["files"]]
    assert len(recorded) == 90 and not set(BAD) & set(recorded)  # every readable image, in exactly one split


def test_eval_and_predict_on_a_split_say_how_many_were_skipped(skipped_run: tuple[Path, str]) -> None:
    run_dir, _ = skipped_run
    res = runner.invoke(app, ["eval", str(run_dir), "--json", "-", "--no-save"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert len(report["skipped"]) == 3 and report["num_samples"] == 9
    assert any(n.startswith("3 unreadable file(s) of ") and "were left out of this run's splits" in n for n in report["notes"])
    assert not any("added after training" in n for n in report["notes"])  # the skipped files are not new ones
    res = runner.invoke(app, ["predict", "--split", "test", "--run", str(run_dir)])
    assert res.exit_code == 0 and "3 unreadable file(s) of " in one_line(res.output), res.output
    res = runner.invoke(app, ["predict", "--split", "test", "--run", str(run_dir), "--json", "-", "--json-summary"])
    assert json.loads(res.stdout)["summary"]["skipped"] == 3


def test_a_run_that_skipped_files_resumes(skipped_run: tuple[Path, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "copy"
    shutil.copytree(skipped_run[0], run_dir)
    res = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", "train.epochs=3"])
    assert res.exit_code == 0 and "epoch 3/3" in res.output, res.output
    assert "Skipped 3 unreadable image file(s)" in one_line(res.output)
    assert len(json.loads((run_dir / "summary.json").read_text())["skipped"]) == 3


def test_streaming_gives_the_cached_run_and_a_file_found_mid_epoch_does_not_stop_it(
        skipped_run: tuple[Path, str], photos: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["train", "-c", str(config(tmp_path, photos, on_unreadable="skip", cache="off"))])
    assert res.exit_code == 0, res.output
    (streamed,) = (tmp_path / "runs").iterdir()
    assert (streamed / "metrics.csv").read_text().split("\n")[1].split(",")[:5] == \
        (skipped_run[0] / "metrics.csv").read_text().split("\n")[1].split(",")[:5]  # found while measuring normalization
    shutil.rmtree(tmp_path / "runs")
    res = runner.invoke(app, ["train", "-c", str(config(tmp_path, photos, on_unreadable="skip", cache="off", normalize="none"))])
    text = one_line(res.output)
    assert res.exit_code == 0 and "epoch 2/2" in text, text  # nothing reads the training split before epoch 1 now
    assert "Skipped 1 unreadable image file(s) (found in this epoch, left out of their batches" in text
    assert text.count("bee/truncated.jpg") == 1  # reported once, though it fails again in epoch 2
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert len(json.loads((run_dir / "summary.json").read_text())["skipped"]) == 3


def test_with_error_a_file_found_mid_epoch_stops_the_run(photos: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    (folder / "ant" / "notes.png").unlink()
    (folder / "cat" / "empty.png").unlink()
    res = runner.invoke(app, ["train", "-c", str(config(tmp_path, folder, cache="off", normalize="none", val_split=0.0))])
    assert res.exit_code == 1 and "Cannot read 1 image(s): " in one_line(res.output) and "bee/truncated.jpg" in res.output


def test_the_file_loader_leaves_unreadable_files_out_of_their_batches(photos: Path) -> None:
    from fcclass.data import Split, make_loader

    files = sorted((photos / "bee").iterdir())[:6] + [photos / "bee" / "truncated.jpg", photos / "cat" / "empty.png"]
    loader = make_loader(Split(torch.arange(8), files=files), 3, False, 0, 1, (16, 16), num_workers=0, skip=True)
    batches = [y.tolist() for _, y in loader]
    assert batches == [[0, 1, 2], [3, 4, 5], []] and set(loader.skipped) == {6, 7}
    assert "truncated" in loader.skipped[6] and "not an image file" in loader.skipped[7]


# ----------------------------------------------------------------------------- predict's summary
def test_predict_on_a_folder_of_label_folders_ends_with_counts_and_accuracy(skipped_run: tuple[Path, str], photos: Path) -> None:
    run_dir, _ = skipped_run
    res = runner.invoke(app, ["predict", str(photos), "--run", str(run_dir), "--json", "-", "--json-summary"])
    assert res.exit_code == 1  # three files could not be read
    out = json.loads(res.stdout)
    preds, summary = out["predictions"], out["summary"]
    read = [p for p in preds if "error" not in p]
    assert summary["images"] == 93 and summary["failed"] == 3 and summary["labelled"] == 90 == len(read)
    assert summary["predicted"] == {label: sum(p["label"] == label for p in read) for label in LABELS}
    assert all(p["true_label"] == Path(p["path"]).parent.name for p in read)
    assert summary["accuracy"] == round(sum(p["label"] == p["true_label"] for p in read) / 90, 6)
    line = one_line(res.output)  # the human lines go to stderr with --json -
    assert f"Summary: 93 image(s), 3 could not be read. Predicted: ant {summary['predicted']['ant']}," in line
    assert f"Top-1 accuracy {summary['accuracy']:.2%} on the 90 image(s) whose folder names their label." in line


def test_predict_without_true_labels_has_no_accuracy_and_json_stays_a_list(skipped_run: tuple[Path, str], photos: Path) -> None:
    run_dir, _ = skipped_run
    res = runner.invoke(app, ["predict", str(photos / "ant"), str(photos / "bee" / "001.jpg"), "--run", str(run_dir)])
    text = one_line(res.output)
    assert res.exit_code == 1 and "Summary: 32 image(s), 1 could not be read. Predicted: " in text and "accuracy" not in text
    res = runner.invoke(app, ["predict", str(photos / "bee" / "001.jpg"), "--run", str(run_dir), "--json", "-"])
    listed = json.loads(res.stdout)
    assert isinstance(listed, list) and set(listed[0]) == {"path", "label", "probability", "top_k"}
