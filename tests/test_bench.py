"""The benchmark runs end to end on a tiny subset (figures are printed, never asserted against a clock)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DATA_ROOT, needs_fashion
from typer.testing import CliRunner

from fcclass.bench.runner import MODELS, keras_available, keras_model
from fcclass.cli import app
from fcclass.config.load import load_config
from fcclass.model.network import build_model

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.mark.slow  # Keras and two loops besides fcclass's: 20 s; test_throughput_on_a_named_device_without_keras covers the mode
@needs_fashion
def test_throughput_mode_compares_three_ways() -> None:
    res = runner.invoke(app, ["bench", "--images", "128", "--data-root", str(DATA_ROOT), "--json", "-"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [r["model"] for r in out["results"]] == ["examples", "default"]
    for r in out["results"]:
        assert r["reference"]["images"] == 128 and r["fcclass"]["images"] >= 128
        assert r["speedup"] == r["fcclass"]["images_per_s"] / r["reference"]["images_per_s"]
        assert r["matmul_peak_gflops"] > 0 and 0 < r["fraction_of_peak"]
        if keras_available():  # the dev extra installs Keras, so CI times it too
            assert r["keras"]["images"] == 128 and r["keras"]["backend"] == "torch"
            assert r["speedup_vs_keras"] == r["fcclass"]["images_per_s"] / r["keras"]["images_per_s"]
    # FLOPs of one training step per image, from torch's counter: forward + backward ~ 3x the forward convs/matmuls.
    examples = out["results"][0]["train_gflop_per_image"]
    forward = 2 * (26 * 26 * 32 * 9 + 24 * 24 * 64 * 32 * 9 + 9216 * 128 + 128 * 10) / 1e9
    assert 2.5 * forward < examples < 3.1 * forward


@needs_fashion
def test_time_to_accuracy_mode_reports_per_epoch_test_accuracy() -> None:
    res = runner.invoke(app, ["bench", "--mode", "tta", "--model", "default", "--data-root", str(DATA_ROOT), "--target", "0.3",
                              "--target", "0.999", "--set", "data.limit_train=1000", "--set", "data.limit_test=1000", "--set", "train.epochs=2",
                              "--set", "data.batch_size=128",
                              "--set", "optimizer={name: adam, lr: 0.003}", "--json", "-"])
    assert res.exit_code == 0, res.output
    (r,) = json.loads(res.stdout)["results"]
    assert [e["epoch"] for e in r["epochs"]] == [1, 2]
    assert r["seconds_to_target"]["0.999"] is None  # not reached: reported as such, not faked
    reached = r["seconds_to_target"]["0.3"]
    assert reached is not None and reached <= r["train_seconds_total"]
    first = next(e for e in r["epochs"] if e["test_accuracy"] >= 0.3)
    assert reached == first["train_seconds_cumulative"]


def test_bench_rejects_unknown_models() -> None:
    res = runner.invoke(app, ["bench", "--model", "resnet"])
    assert res.exit_code == 1 and "Unknown --model resnet: the benchmark models are default and examples" in res.output
    res = runner.invoke(app, ["bench", "--mode", "fast"])
    assert res.exit_code == 1 and "Unknown --mode fast" in res.output


@pytest.mark.skipif(not keras_available(), reason="Keras is not installed (pip install -e '.[bench]')")
@pytest.mark.parametrize("name", list(MODELS))
def test_keras_leg_builds_the_same_model_as_fcclass(name: str) -> None:
    cfg = load_config(MODELS[name])
    ours = build_model(cfg.model, [1, 28, 28], 10).summary()
    theirs = keras_model(cfg, 10)
    assert [type(layer).__name__ for layer in theirs.layers] == [spec.type for spec in cfg.model.layers]
    assert theirs.count_params() == ours.total_params  # fcclass counts parameters the way Keras does
    assert [tuple(layer.output.shape[1:]) for layer in theirs.layers][-1] == ours.layers[-1].output_shape


@needs_fashion
def test_throughput_on_a_named_device_without_keras(tmp_path: Path) -> None:
    res = runner.invoke(app, ["bench", "--images", "64", "--model", "default", "--device", "cpu", "--no-keras",
                              "--data-root", str(DATA_ROOT), "--json", str(tmp_path / "bench.json")])
    assert res.exit_code == 0, res.output
    (r,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    from fcclass.device import cpu_bf16_native

    native = cpu_bf16_native()  # train.precision auto: bf16 on CPUs with native bf16, and the peak measured in it
    assert "keras" not in r and r["device"] == "cpu"
    assert (r["matmul_peak_dtype"], r["fcclass"]["precision"]) == (("bfloat16", "bf16") if native else ("float32", "fp32"))
    caption = " ".join(res.output.split())  # the table's caption wraps at the table's width
    assert "Device: cpu" in caption and "pip install -e '.[bench]'" in caption  # Rich markup escaped
    out = json.loads((tmp_path / "bench.json").read_text())  # one repeat: no spread of the loops, the peak's may warn
    assert r["spread"] == {"reference": 0.0, "fcclass": 0.0} and r["warnings"] == [] and len(r["repeat_images_per_s"]["fcclass"]) == 1
    assert all(w["measurement"].startswith("the matmul peak") for w in out["warnings"])
    assert all(f"Warning: {w['measurement']} varied by" in caption for w in out["warnings"])


def test_repeats_that_disagree_by_more_than_a_fifth_are_named_with_their_spread() -> None:
    from fcclass.bench.runner import ThroughputResult, spread, spread_warnings

    assert spread([100.0]) == 0.0 and spread([]) == 0.0 and spread([100.0, 100.0]) == 0.0
    assert spread([100.0, 75.0, 90.0]) == pytest.approx(0.25)  # the slowest 25% below the fastest
    assert spread_warnings({"steady": [100.0, 81.0], "one": [5.0]}, "images/s") == []  # 19%: within a quiet machine's noise
    (w,) = spread_warnings({"steady": [100.0, 95.0], "busy": [1000.0, 600.0, 950.0]}, "images/s")
    assert (w["measurement"], w["repeats"], w["spread"], w["slowest"], w["fastest"]) == ("busy", 3, 0.4, 600.0, 1000.0)
    assert w["message"].startswith("busy varied by 40% over its 3 repeats (600 to 1,000 images/s")
    assert "probably busy" in w["message"] and "nothing else running" in w["message"]
    result = ThroughputResult("default", {"images_per_s": 900.0}, {"images_per_s": 100.0}, 1e6, 50.0,
                              repeat_rates={"reference": [100.0, 98.0], "fcclass": [900.0, 500.0]})
    out = result.to_dict()
    assert out["spread"] == {"reference": 0.02, "fcclass": 0.4444}
    (w,) = out["warnings"]
    assert w["measurement"] == "fcclass's loop (default model)" and w["message"].startswith("fcclass's loop (default model) varied by 44%")
