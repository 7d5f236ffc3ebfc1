"""The default's short-run plan (train.short_run_steps): a quick try on a few thousand images trains at a smaller batch
with the learning rate scaled, says so, records it, and keeps it on resume; a full run is untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DATA_ROOT, needs_fashion
from typer.testing import CliRunner

from fcclass.cli import app
from fcclass.config.load import load_config
from fcclass.training.schedule import SHORT_RUN_MIN_BATCH, plan_batch

runner = CliRunner()


def test_short_runs_halve_the_batch_down_to_16_and_full_runs_keep_theirs() -> None:
    assert plan_batch(256, 300, 2700, 1).batch_size == 16  # 3,000 images with a 10 % val split, one epoch: 11 steps at 256
    assert plan_batch(256, 300, 3600, 2).batch_size == 16  # 4,000 images, two epochs
    full = plan_batch(256, 300, 54000, 9)  # the default's full run: 1,899 steps
    assert full.batch_size == 256 and not full.adapted and full.lr_scale == 1.0
    assert plan_batch(256, 300, 54000, 1).batch_size == 128  # 211 steps at 256, 422 at 128
    assert plan_batch(256, 300, 10, 1).batch_size == SHORT_RUN_MIN_BATCH  # never below 16, however short
    assert plan_batch(256, 0, 2700, 1).batch_size == 256  # 0: off
    assert plan_batch(8, 300, 2700, 1).batch_size == 8  # a batch already below 16 is never changed
    assert plan_batch(256, 300, 54000, 9, recorded=64).batch_size == 64  # a resumed run keeps its batch


def test_the_learning_rate_scales_with_the_batch() -> None:
    cfg = load_config("fashion_mnist", ["scheduler.max_lr=0.4"])
    plan = plan_batch(cfg.data.batch_size, cfg.train.short_run_steps, 2700, 1)
    assert plan.lr_scale == pytest.approx(16 / 256)
    assert plan.scaled_optimizer(cfg.optimizer).lr == pytest.approx(0.3 * 16 / 256)
    assert plan.scaled_optimizer(cfg.optimizer).momentum == cfg.optimizer.momentum
    assert plan.scaled_scheduler(cfg.scheduler).max_lr == pytest.approx(0.4 * 16 / 256)
    assert plan.scaled_scheduler(cfg.scheduler).pct_start == cfg.scheduler.pct_start
    assert cfg.optimizer.lr == 0.3  # the config itself is untouched
    assert load_config("fashion_mnist").train.short_run_steps == 300  # the shipped default plans short runs
    assert load_config("mlp").train.short_run_steps == 0  # other configs train at their batch unless they ask


@needs_fashion
def test_a_short_run_says_so_records_its_batch_and_keeps_it_on_resume(tmp_path: Path) -> None:
    sets = ["data.limit_train=1000", "data.limit_test=200", "train.epochs=1", f"data.root={DATA_ROOT}", "data.download=false",
            f"train.runs_dir={tmp_path}", "train.short_run_steps=6", "train.precision=fp32"]
    res = runner.invoke(app, ["train", "--json", str(tmp_path / "out.json"), *(a for s in sets for a in ("--set", s))])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    # 900 training images: 4 steps at 256 < 6, so 128 (8 steps), with the learning rate scaled to 0.15
    assert ("Short run: 900 images x 1 epoch would be 4 optimizer steps at data.batch_size 256, under "
            "train.short_run_steps 6: training at batch 128 with the learning rate scaled to 0.15 (0.3 x 128/256). "
            "Set train.short_run_steps=0 to train at batch 256.") in text
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["batch_size"] == 128
    run_dir = Path(out["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text())["batch_size"] == 128
    assert out["history"][0]["lr"] < 0.15  # one-cycle's peak is the scaled rate
    # Two epochs at 256 would be 8 steps, no longer short; the resumed run keeps the batch it started with.
    res = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", "train.epochs=2", "--json", str(tmp_path / "more.json")])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "Short run: training at batch 128, with the learning rate scaled to 0.15 (0.3 x 128/256), as this run started" in text
    assert json.loads((tmp_path / "more.json").read_text())["batch_size"] == 128


@needs_fashion
def test_a_full_size_plan_prints_nothing(tmp_path: Path) -> None:
    sets = ["data.limit_train=1000", "train.epochs=1", f"data.root={DATA_ROOT}", "data.download=false", f"train.runs_dir={tmp_path}",
            "train.short_run_steps=4", "train.test_at_end=false", "train.precision=fp32"]
    res = runner.invoke(app, ["train", "--json", str(tmp_path / "out.json"), *(a for s in sets for a in ("--set", s))])
    assert res.exit_code == 0, res.output
    assert "Short run" not in res.output
    assert json.loads((tmp_path / "out.json").read_text())["batch_size"] == 256


@needs_fashion
@pytest.mark.slow
@pytest.mark.parametrize("images,epochs,floor", [(3000, 1, 0.65), (4000, 2, 0.75)])
@pytest.mark.parametrize("seed", [1, 7])
def test_a_quick_try_with_the_default_learns(images: int, epochs: int, floor: float, seed: int, tmp_path: Path) -> None:
    """Issue 20's bar: a new user's first try on a few thousand images, any seed, on the whole test split."""
    sets = [f"data.limit_train={images}", f"train.epochs={epochs}", f"seed={seed}", f"data.root={DATA_ROOT}", "data.download=false",
            f"train.runs_dir={tmp_path}"]
    res = runner.invoke(app, ["train", "--json", str(tmp_path / "out.json"), *(a for s in sets for a in ("--set", s))])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["batch_size"] == 16
    assert out["test"]["accuracy"] >= floor, out["test"]
