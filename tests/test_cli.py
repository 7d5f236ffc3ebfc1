"""The CLI end to end on real Fashion-MNIST: train, eval, predict, summary, and user mistakes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import DATA_ROOT, ROOT, assert_rounded_as_shown, floats, needs_fashion
from PIL import Image
from typer.testing import CliRunner

from fcclass.cli import app

runner = CliRunner(env={"COLUMNS": "300"})  # wide enough that Rich does not cut paths (xdist workers have longer tmp paths)


def run(*args: str):
    return runner.invoke(app, list(args))


@needs_fashion
def test_train_cli_writes_a_complete_run_directory(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    res = run("train", "-c", str(ROOT / "configs" / "fashion_mnist.yaml"), "--set", "train.epochs=2",
              "--set", "data.limit_train=1000", "--set", f"train.runs_dir={runs}", "--set", f"data.root={DATA_ROOT}",
              "--set", "optimizer.lr=0.004", "--set", "data.limit_test=300")
    assert res.exit_code == 0, res.output
    (run_dir,) = runs.iterdir()
    assert run_dir.name.startswith("fashion-cnn-")
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "metrics.csv", "best.pt", "last.pt", "classes.json"}
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 2 and resolved["optimizer"]["lr"] == 0.004  # --set reached the run
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"} <= set(rows[0])
    assert json.loads((run_dir / "classes.json").read_text())[9] == "Ankle boot"
    assert "epoch 2/2" in res.output and "val loss" in res.output


@needs_fashion
def test_eval_json_reports_per_label_accuracy_well_above_chance(trained_run: Path) -> None:
    res = run("eval", str(trained_run), "--json", "-")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)  # nothing but JSON on stdout
    assert report["num_samples"] == 500
    assert report["accuracy"] > 0.7  # chance is 0.1
    assert set(report["per_class"]) == {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"}
    assert all(v["support"] == 50 for v in report["per_class"].values())
    assert abs(np.mean([v["accuracy"] for v in report["per_class"].values()]) - report["accuracy"]) < 1e-6  # balanced test set
    assert 0 < report["loss"] < 2.3
    assert all(v == round(v, 6) for _, v in floats(report))  # as the README says: figures to 6 decimals


@needs_fashion
def test_eval_table_names_labels_and_newest_run_is_default(trained_run: Path) -> None:
    res = run("eval", "--runs-dir", str(trained_run.parent))
    assert res.exit_code == 0, res.output
    for label in ("T-shirt/top", "Ankle boot", "Overall"):
        assert label in res.output
    ck = run("eval", "--checkpoint", str(trained_run / "last.pt"), "--json", "-")
    assert ck.exit_code == 0 and json.loads(ck.stdout)["num_samples"] == 500


@needs_fashion
def test_predict_agrees_with_eval_on_the_same_images(trained_run: Path, tmp_path: Path) -> None:
    from fcclass.inference.evaluate import evaluate
    from fcclass.inference.load import load_for_inference

    report = evaluate(trained_run)
    model = load_for_inference(trained_run)
    test = model.dataset(("test",)).test
    folder = tmp_path / "imgs"
    folder.mkdir()
    n = 40
    for i in range(n):
        Image.fromarray(test.images[i, 0].numpy(), "L").save(folder / f"{i:03d}.png")
    res = run("predict", str(folder), "--run", str(trained_run), "--json", "-", "--top-k", "2")
    assert res.exit_code == 0, res.output
    preds = json.loads(res.stdout)
    names = model.class_names
    assert [p["label"] for p in preds] == [names[i] for i in report.predictions[:n].tolist()]
    assert all(len(p["top_k"]) == 2 and p["top_k"][0]["probability"] >= p["top_k"][1]["probability"] for p in preds)
    assert all(p["probability"] == p["top_k"][0]["probability"] for p in preds)


@needs_fashion
def test_predict_converts_colour_and_size_and_survives_bad_files(trained_run: Path, tmp_path: Path) -> None:
    big_rgb = tmp_path / "big_colour.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8), "RGB").save(big_rgb)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    res = run("predict", str(big_rgb), str(broken), str(tmp_path / "missing.png"), "--run", str(trained_run), "--json", "-")
    assert res.exit_code == 1  # some inputs failed
    out = {Path(p["path"]).name: p for p in json.loads(res.stdout)}
    assert out["big_colour.png"]["label"] in json.loads((trained_run / "classes.json").read_text())
    assert "error" in out["broken.png"] and "error" in out["missing.png"]
    table = run("predict", str(big_rgb), str(broken), "--run", str(trained_run))
    assert "big_colour.png" in table.output and "broken.png" in table.output and "error" in table.output


def test_summary_needs_no_dataset_when_input_shape_is_set(tmp_path: Path) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        "data: {root: /nonexistent}\nmodel:\n  input_shape: [3, 32, 32]\n  layers:\n"
        "    - {type: Conv2D, filters: 16, kernel_size: 3, padding: same, activation: relu}\n"
        "    - {type: MaxPooling2D}\n    - {type: Flatten}\n    - {type: Dense, units: 64, use_bias: false}\n    - {type: Dense, units: 5}\n"
    )
    res = run("summary", "-c", str(cfg), "--json", "-")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert [layer["params"] for layer in s["layers"]] == [3 * 3 * 3 * 16 + 16, 0, 0, 16 * 16 * 16 * 64, 64 * 5 + 5]
    assert s["layers"][0]["output_shape"] == [16, 32, 32]
    assert s["total_params"] == s["trainable_params"] == 448 + 262144 + 325 and s["non_trainable_params"] == 0
    table = run("summary", "-c", str(cfg))
    assert "Total params" in table.output and "262,144" in table.output


def test_summary_of_a_shipped_config_works_from_any_folder(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fcclass.cli", "summary", "-c", "mlp", "--json", "-"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["layers"][0]["params"] == 784 * 256 + 256


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--set", "train.epohcs=2"], "Did you mean 'epochs'"),
        (["train", "--set", "data.batch_size=-1"], "data.batch_size: Input should be greater than 0 (got -1). (from --set data.batch_size=-1)"),
        (["train", "-c", "nope.yaml"], "not found"),
        (["summary", "--set", "model.layers.0.type=Conv3D"], "unknown layer type 'Conv3D'"),
        (["eval", "--runs-dir", "/nonexistent-runs"], "No trained runs found"),
        (["predict", "x.png", "--checkpoint", "/nonexistent.pt"], "not found"),
        (["eval", "--checkpoint", "README.md"], "is not a checkpoint"),
        (["train", "-c", "configs"], "is a folder"),
        (["summary", "--set", "model.input_shape=[3, 32]"], "must be [channels, height, width] or [features]"),
        (["eval", "--json", "/etc/hostname/x.json"], "'/etc/hostname' is a file, not a folder"),
    ],
)
def test_user_mistakes_exit_1_with_a_message_and_no_traceback(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "fcclass.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert message in proc.stderr.replace("\n", " ") or message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""


def test_failed_train_leaves_no_run_directory(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    res = run("train", "--set", f"train.runs_dir={runs}", "--set", f"data.root={tmp_path}", "--set", "data.dataset=kmnist",
              "--set", "data.download=false")
    assert res.exit_code == 1
    assert not runs.exists() or not any(runs.iterdir())


def test_help_does_not_import_torch() -> None:
    code = "import sys; from typer.testing import CliRunner; from fcclass.cli import app; r = CliRunner().invoke(app, ['--help']); " \
           "assert r.exit_code == 0; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


@needs_fashion
def test_python_api_from_the_readme(trained_run: Path) -> None:
    from fcclass import build_model, evaluate, fit, load_config, predict

    assert all(callable(f) for f in (build_model, evaluate, fit, load_config, predict))
    report = evaluate(trained_run)
    assert report.per_class["Shirt"]["support"] == 50
    assert predict([ROOT / "samples" / "test_0.png"], trained_run)[0].label in report.class_names


@needs_fashion
def test_output_to_a_pipe_is_not_wrapped_at_80_columns(tmp_path: Path) -> None:
    # `fcclass train > log` must keep each epoch line whole; Rich alone wraps at 80 columns without a terminal
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-m", "fcclass.cli", "train", "--set", "data.limit_train=300", "--set", "train.epochs=1",
                          "--set", f"data.root={DATA_ROOT}", "--set", "data.download=false", "--set", f"train.runs_dir={tmp_path}", "--no-test"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("epoch 1/1")]
    assert len(line) > 80 and line.rstrip().endswith("* best")  # train loss ... val ... lr ... seconds, on one line


@needs_fashion
def test_a_pipe_or_log_file_gets_progress_lines_during_an_epoch_and_json_is_rounded(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "fcclass.cli", "train", "--set", "data.limit_train=1500", "--set", "train.epochs=1",
            "--set", f"data.root={DATA_ROOT}", "--set", f"train.runs_dir={tmp_path}", "--log-interval", "0.05", "--no-test"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    progress = [line for line in out.stdout.splitlines() if line.startswith("epoch 1/1  batch ")]
    assert progress, out.stdout  # not minutes of silence in CI logs
    assert all(" loss " in line and " acc " in line for line in progress)
    js = runner.invoke(app, [*args[3:-1], "--set", "data.limit_train=1000", "--set", "data.limit_test=300", "--json", "-"])  # in this process: the same CLI
    out = json.loads(js.stdout)
    row = out["history"][0]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"} <= set(row)
    assert {"accuracy", "loss"} <= set(out["test"]) and out["test"]["images"] == 300  # the test pass: rounded too
    assert_rounded_as_shown([out["best"], out["test"], out["history"]])
    assert "train_seconds" not in row and "train_images" not in row  # no benchmark-only fields in training rows


@pytest.mark.parametrize("args", [["eval", "--device", "gpu"], ["predict", "x.png", "--device", "cuda:x"],
                                  ["bench", "--device", "gpu"], ["train", "--set", "train.device=gpu"]])
def test_a_device_that_is_not_one_names_the_valid_forms(args: list[str]) -> None:
    res = run(*args)
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())
    assert "Traceback" not in text and ("cuda:N" in text) and "mps" in text
