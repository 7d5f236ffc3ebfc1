"""One computation per number: the same model on the same images shows the same accuracy, loss and parameter count
wherever fcclass shows them (validation, eval, compress's table, summary, summary.json, `fcclass runs`), and compress
says how many images really calibrate its int8 model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import needs_fashion, small_config
from typer.testing import CliRunner

from fcclass.cli import app
from fcclass.errors import FcclassError
from fcclass.inference.metrics import Score, predicted, score
from fcclass.inference.predict import Prediction, _fill

runner = CliRunner(env={"COLUMNS": "200"})
TRAIN_IMAGES = 900  # data.limit_train 1,000 less the 10 % validation split: 14 whole batches of 64 calibrate, 896 images


def _json(*args: str) -> Any:
    res = runner.invoke(app, [*args, "--json", "-"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The default model (it has a BatchNormalization layer) for 2 epochs on 1,000 images, in fp32 and without label
    smoothing, so that its val_loss is the plain cross-entropy `fcclass eval` reports."""
    from conftest import fashion_available

    if not fashion_available():
        pytest.skip("Fashion-MNIST not installed")
    from fcclass.training.fit import fit

    tmp = tmp_path_factory.mktemp("numbers")
    result = fit(small_config(tmp, **{"data.limit_train": 1000, "data.limit_test": 200, "train.epochs": 2,
                                      "train.label_smoothing": 0.0, "train.precision": "fp32"}))
    return result.run_dir, result


@pytest.fixture(scope="module")
def compressed(small_run: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("compressed") / "int8"
    data = _json("compress", str(small_run[0]), "--quantize", "int8", "--calibration", "1000", "--rounds", "1", "--out", str(out))
    return out, data


def test_score_adds_up_over_parts_and_ties_go_to_the_first_label() -> None:
    logits, labels = torch.randn(50, 10, generator=torch.Generator().manual_seed(0)), torch.arange(50) % 10
    whole = score(logits, labels, 0.1)
    parts = score(logits[:17], labels[:17], 0.1) + score(logits[17:], labels[17:], 0.1)  # e.g. two DDP ranks' shards
    assert parts.correct == whole.correct and parts.images == whole.images == 50
    assert parts.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1).item(), abs=1e-6)
    summed = Score.from_tensor(whole.to_tensor() + Score().to_tensor())  # what distributed.all_sum does with them
    assert (summed.correct, summed.images, summed.loss) == (whole.correct, 50, pytest.approx(whole.loss, abs=1e-6))
    assert score(logits[:0], labels[:0]).images == 0
    tied = torch.tensor([[0.0, 2.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    assert predicted(tied).tolist() == [1, 0]
    preds = [Prediction("a"), Prediction("b")]
    _fill(preds, tied, ["w", "x", "y", "z"], 2)  # predict's top label is the one eval and compress count
    assert [p.label for p in preds] == ["x", "w"] and [t["label"] for t in preds[0].top_k] == ["x", "y"]


@needs_fashion
def test_the_best_epochs_validation_figures_are_what_eval_gives_on_the_val_split(small_run: tuple[Path, Any]) -> None:
    run, result = small_run
    from fcclass.runs.checkpoint import Checkpoint

    best = Checkpoint.load(run / "best.pt")
    assert best.epoch == result.best_epoch and best.metrics["val_accuracy"] == result.best["val_accuracy"]
    report = _json("eval", str(run), "--split", "val", "--no-save")
    assert report["num_samples"] == 100
    assert report["accuracy"] == pytest.approx(result.best["val_accuracy"], abs=1e-6)
    assert report["loss"] == pytest.approx(result.best["val_loss"], abs=1e-6)


@needs_fashion
def test_validation_of_a_bf16_training_runs_in_fp32_as_eval_does(tmp_path: Path) -> None:
    """bf16 autocast (train.precision bf16, as auto picks on CPUs with native bf16 and on GPUs) trains, but validation
    runs in fp32, the precision of `fcclass eval`: the best epoch's val figures are eval's on best.pt to the last digit
    (under bf16 the loss differed in the third decimal and the accuracy by a few images)."""
    from fcclass.training.fit import fit

    result = fit(small_config(tmp_path, **{"data.limit_train": 1000, "data.limit_test": 100, "train.epochs": 1,
                                           "train.label_smoothing": 0.0, "train.precision": "bf16"}))
    assert result.precision == "bf16"
    report = _json("eval", str(result.run_dir), "--split", "val", "--no-save")
    assert report["accuracy"] == pytest.approx(result.best["val_accuracy"], abs=1e-6)
    assert report["loss"] == pytest.approx(result.best["val_loss"], abs=1e-6)


@needs_fashion
def test_parameter_counts_are_the_same_in_summary_the_run_record_runs_and_compress(
        small_run: tuple[Path, Any], compressed: tuple[Path, dict[str, Any]]) -> None:
    run, _ = small_run
    counted = _json("summary", "-c", str(run / "config.yaml"))
    from fcclass.inference.load import load_for_inference

    torch_count = sum(p.numel() for p in load_for_inference(run, device="cpu").model.parameters())
    assert counted["total_params"] == torch_count + 2 * 48  # Keras's count: BatchNorm's moving mean and variance too
    assert json.loads((run / "summary.json").read_text())["params"] == counted["total_params"]
    listed = {r["name"]: r["params"] for r in _json("runs", "--runs-dir", str(run.parent))}
    assert listed[run.name] == counted["total_params"]
    out, table = compressed
    assert {r["parameters"] for r in table["rows"]} == {counted["total_params"]}  # int8 only: the same network
    assert json.loads((out / "summary.json").read_text())["params"] == counted["total_params"]


@needs_fashion
def test_compress_says_how_many_images_calibrate_as_the_int8_record_does(compressed: tuple[Path, dict[str, Any]]) -> None:
    out, table = compressed
    recorded = json.loads((out / "model.int8.onnx.json").read_text())["quantization"]["calibration_images"]
    assert recorded == TRAIN_IMAGES // 64 * 64 == 896
    assert (f"The training split has {TRAIN_IMAGES} images, fewer than --calibration 1,000: 896 of them (whole batches of 64) "
            "calibrate the int8 ranges.") in table["notes"]


def test_run_files_are_read_with_the_yaml_guard(tmp_path: Path) -> None:
    """A config.yaml that is an alias bomb, in a run without summary.json: listed without its config, and named as the
    problem by a comparison, in a moment."""
    from fcclass.runs.listing import flat_config

    bomb = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]"
                                                              for p, n in zip("abcdefgh", "bcdefghi")]) + "\nname: *i\n"
    run = tmp_path / "runs" / "bomb"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(bomb)
    started = time.monotonic()
    assert [r["name"] for r in _json("runs", "--runs-dir", str(tmp_path / "runs"))] == ["bomb"]
    with pytest.raises(FcclassError, match="expands to more than 100,000 values"):
        flat_config(run)
    assert time.monotonic() - started < 5
