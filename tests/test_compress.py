"""`fcclass compress` on a real Fashion-MNIST run: structured pruning really shrinks the network, unstructured
pruning survives fine-tuning, int8 runs in ONNX Runtime and agrees with the float model; the user's mistakes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_rounded_as_shown, needs_fashion
from typer.testing import CliRunner

from fcclass.cli import app
from fcclass.compress.pruning import plan_units, prune_units
from fcclass.inference.load import load_for_inference

runner = CliRunner(env={"COLUMNS": "200"})
pytestmark = needs_fashion


def _compress(*args: str) -> dict:
    res = runner.invoke(app, ["compress", *args, "--rounds", "1", "--json", "-"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _test_pixels(run: Path, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    inf = load_for_inference(run, device="cpu")
    test = inf.dataset(("test",)).splits["test"]
    return test.take(slice(0, n)), test.labels[:n]


def _masked_reference(model: torch.nn.Module, cfg: object, plan: object) -> torch.nn.Module:
    """The original network with the removed units cut off where they are read (and their average moved into the
    reader's bias): what the smaller network must compute exactly."""
    ref = copy.deepcopy(model)
    names = [li.name for li in model.infos]
    for j, kept in plan.inputs.items():
        kernel = next(m for m in getattr(ref.body, names[j]).modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
        removed = torch.ones(kernel.weight.shape[1], dtype=torch.bool)
        removed[kept] = False
        with torch.no_grad():
            if j in plan.bias_shift:
                kernel.bias += plan.bias_shift[j]
            kernel.weight[:, removed] = 0
    return ref


@pytest.mark.parametrize("conv", [False, True])
def test_structured_pruning_is_a_smaller_network_that_computes_the_same(trained_run: Path, conv: bool) -> None:
    inf = load_for_inference(trained_run, device="cpu")
    images, _ = _test_pixels(trained_run, 200)
    x = inf.preprocess(images)
    sample = inf.preprocess(inf.dataset(("train",)).splits["train"].take(slice(0, 300)))
    model = inf.model.float().eval()
    plan = plan_units(model, inf.config, 0.5, conv, sample)
    small_cfg, small, _ = prune_units(model, inf.config, 0.5, conv, sample)
    assert plan.sizes["dense"] == (256, 128)
    assert [layer.units for layer in small_cfg.model.layers if layer.type == "Dense"][0] == 128
    if conv:
        assert plan.sizes["conv2d"] == (24, 12) and plan.sizes["conv2d_1"] == (48, 24)
        assert small.body.batch_normalization.num_features == 24 and small.body.dense[0].in_features == 24 * 7 * 7
    assert small.summary().total_params < model.summary().total_params
    with torch.inference_mode():
        torch.testing.assert_close(small(x), _masked_reference(model, inf.config, plan)(x), rtol=1e-4, atol=1e-4)


def test_compress_structured_writes_a_run_of_the_smaller_model(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "small"
    data = _compress(str(trained_run), "--prune", "0.5", "--structured", "--out", str(out))
    assert data["pruned_layers"] == {"dense": [256, 128]}
    original, pruned = data["rows"]
    assert (original["model"], pruned["model"]) == ("original", "pruned")
    summary = json.loads(runner.invoke(app, ["summary", "-c", str(out / "config.yaml"), "--json", "-"]).stdout)
    assert pruned["parameters"] == summary["total_params"] < original["parameters"]
    assert pruned["file_bytes"] < 0.6 * original["file_bytes"] and pruned["file_bytes"] == (out / "best.pt").stat().st_size
    for row in data["rows"]:
        assert 0.5 < row["test_accuracy"] <= 1 and row["latency_ms_batch1"] > 0 and row["latency_ms_batch256"] > 0
        assert row["test_accuracy"] == round(row["test_accuracy"], 6)  # as eval's figures (README)
    # Predictions come from the smaller network: eval and predict load it, and agree with a forward pass through it.
    small = load_for_inference(out, device="cpu")
    assert small.model.body.dense[0].out_features == 128
    images, labels = _test_pixels(out, 500)
    expected = small.logits(images).argmax(1)
    predicted = json.loads(runner.invoke(app, ["predict", "--run", str(out), "--split", "test", "--json", "-"]).stdout)
    names = small.class_names
    assert [names.index(p["label"]) for p in predicted[:500]] == expected.tolist()
    report = json.loads(runner.invoke(app, ["eval", str(out), "--json", "-", "--no-save"]).stdout)
    assert report["accuracy"] == pytest.approx(pruned["test_accuracy"], abs=1e-6)
    assert json.loads((out / "compress.json").read_text())["rows"] == data["rows"]
    record = json.loads((out / "summary.json").read_text())  # what `fcclass runs` lists
    assert record["state"] == "finished" and record["compressed"]["from"] == str(trained_run)
    assert record["test"]["accuracy"] == pruned["test_accuracy"] and record["params"] == summary["total_params"]


def test_unstructured_pruning_keeps_its_zeros_through_fine_tuning(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "sparse"
    data = _compress(str(trained_run), "--prune", "0.7", "--finetune", "1", "--set", "optimizer.lr=0.0002", "--out", str(out))
    original, tuned = data["rows"]
    assert tuned["model"] == "pruned + fine-tuned" and data["finetune"]["epochs"] == 1 and data["finetune"]["lr"] == 0.0002
    assert_rounded_as_shown(data["finetune"]["best_val"])  # the fine-tuning's best epoch, as train --json gives it
    kernels = [t for k, t in torch.load(out / "best.pt", weights_only=True)["model_state"].items()
               if k.startswith(("body.dense.", "body.dense_1.")) and k.endswith("weight")]
    zeros = sum(int((t == 0).sum()) for t in kernels) / sum(t.numel() for t in kernels)
    assert zeros == pytest.approx(0.7, abs=0.002)  # fine-tuned, and the pruned weights are still exactly zero
    assert tuned["parameters"] == original["parameters"] and tuned["nonzero_parameters"] < 0.4 * original["parameters"]
    assert (out / "metrics.csv").read_text().count("\n") == 2 and (out / "last.pt").is_file()


def test_unstructured_pruning_of_conv_kernels(trained_run: Path, tmp_path: Path) -> None:
    """--conv without --structured: the conv kernels (channels-last in memory) are pruned with the Dense ones."""
    out = tmp_path / "sparse-conv"
    data = _compress(str(trained_run), "--prune", "0.5", "--conv", "--out", str(out))
    state = torch.load(out / "best.pt", weights_only=True)["model_state"]
    conv = [t for k, t in state.items() if k.startswith("body.conv2d") and k.endswith("weight") and t.dim() == 4]
    assert conv and all(0 < int((t == 0).sum()) < t.numel() for t in conv)
    assert data["zeroed_weights"] > 0 and 0.5 < data["rows"][-1]["test_accuracy"] <= 1


def test_int8_model_runs_in_onnxruntime_and_agrees_with_the_float_model(trained_run: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    out = tmp_path / "int8"
    data = _compress(str(trained_run), "--quantize", "int8", "--calibration", "300", "--out", str(out))
    rows = {(r["model"], r["runtime"]): r for r in data["rows"]}
    float_row, int8_row = rows[("original", "torch fp32")], rows[("int8", "onnxruntime int8")]
    assert int8_row["file_bytes"] < float_row["file_bytes"] / 3.5
    assert abs(int8_row["test_accuracy"] - float_row["test_accuracy"]) < 0.02
    # The file alone, in a plain ONNX Runtime session: pixels in [0, 1] in, probabilities out.
    images, _ = _test_pixels(trained_run, 500)
    session = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    probs = session.run(None, {"image": images.float().div(255).numpy()})[0]
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    float_pred = load_for_inference(trained_run, device="cpu").logits(images).argmax(1).numpy()
    assert (probs.argmax(1) == float_pred).mean() > 0.95
    ops = {node.op_type for node in __import__("onnx").load(str(out / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # eval, predict and export use the int8 model of the run.
    res = runner.invoke(app, ["eval", str(out), "--no-save"])
    assert res.exit_code == 0 and "int8, ONNX Runtime" in res.output
    report = json.loads(runner.invoke(app, ["eval", str(out), "--json", "-", "--no-save"]).stdout)
    assert report["accuracy"] == pytest.approx(int8_row["test_accuracy"], abs=1e-6)
    files = [out / "model.int8.onnx", out / "model.int8.onnx.json"]
    stamps = lambda: [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]  # noqa: E731
    before = stamps()
    res = runner.invoke(app, ["export", str(out)])  # where the model already is: nothing is written, and it says so
    assert res.exit_code == 0 and "Wrote" not in res.output and "Nothing rewritten" in res.output, res.output
    assert f"{out / 'model.int8.onnx'} is this run's model" in " ".join(res.output.split())
    assert stamps() == before
    assert not (out / "model.onnx").exists()
    exported = tmp_path / "deploy.onnx"
    res = runner.invoke(app, ["export", str(out), "-o", str(exported)])
    assert res.exit_code == 0 and f"Wrote {exported} and {exported}.json" in " ".join(res.output.split()), res.output
    assert exported.read_bytes() == (out / "model.int8.onnx").read_bytes()
    assert json.loads((tmp_path / "deploy.onnx.json").read_text())["quantization"]["weights"] == "int8, per output channel"
    refused = runner.invoke(app, ["export", str(out), "--format", "torchscript"])
    assert refused.exit_code == 1 and "--checkpoint" in refused.output and "Traceback" not in refused.output
    # The int8 file replaced by a model of other classes or another input shape: refused by name, everywhere.
    for shape, k, said in [((1, 28, 28), 7, "gives 7 class scores, but the run has 10 classes (T-shirt/top, Trouser"),
                           ((3, 32, 32), 10, "takes input of shape ['N', 3, 32, 32], but the run's images are [N, 1, 28, 28]")]:
        _onnx_classifier(out / "model.int8.onnx", shape, k)
        for args in (["eval", str(out), "--no-save"], ["predict", "--run", str(out), "--split", "test"], ["export", str(out)]):
            res = runner.invoke(app, args)
            assert res.exit_code == 1 and said in " ".join(res.output.split()) and "Traceback" not in res.output, (args, res.output)
            assert "--checkpoint" in res.output


def _onnx_classifier(path: Path, shape: tuple[int, int, int], classes: int) -> None:
    """Another model where a run's int8 model belongs: images of ``shape`` in, ``classes`` probabilities out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((int(np.prod(shape)), classes), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=1)],
        "other", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *shape])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])], [numpy_helper.from_array(weights, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))


@pytest.mark.parametrize("args, expected", [
    ([], "Nothing to do"),
    (["--prune", "1.5"], "between 0 and 1"),
    (["--structured"], "--structured goes with --prune"),
    (["--finetune", "2", "--quantize", "int8"], "--finetune goes with --prune"),
    (["--quantize", "int4"], "takes int8"),
    (["--quantize", "int8", "--set", "optimizer.lr=0.01"], "goes with --finetune"),
    (["--prune", "0.5", "--finetune", "1", "--set", "model.layers.-3.units=7"],
     "--set model.layers.-3.units cannot change when fine-tuning in compress: the model is the source run's"),
    (["--prune", "0.5", "--finetune", "1", "--set", "data.dataset=mnist"],
     "Only train.*, optimizer.*, scheduler.*, data.batch_size, data.sampler, data.augment.*, tracking.* can"),
])
def test_compress_mistakes_are_named(trained_run: Path, tmp_path: Path, args: list[str], expected: str) -> None:
    res = runner.invoke(app, ["compress", str(trained_run), *args, "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and expected in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_compress_never_writes_into_an_existing_folder(trained_run: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["compress", str(trained_run), "--prune", "0.5", "--out", str(taken)])
    assert res.exit_code == 1 and "is a folder with files in it" in res.output
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]


def test_compress_refuses_an_out_folder_another_process_is_writing(trained_run: Path, tmp_path: Path) -> None:
    from fcclass.runs.checkpoint import lock_run

    out = tmp_path / "busy"
    out.mkdir()
    lock = lock_run(out)  # as a compress (or train) writing there holds it
    try:
        res = runner.invoke(app, ["compress", str(trained_run), "--prune", "0.5", "--out", str(out)])
    finally:
        lock.close()
    assert res.exit_code == 1 and "is being written by another fcclass process" in res.output, res.output
    assert "Traceback" not in res.output and [p.name for p in out.iterdir()] == [".lock"]


def test_compress_names_the_run_it_took_and_warns_when_accuracy_collapses(trained_run: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["compress", "--runs-dir", str(trained_run.parent), "--prune", "0.99", "--structured", "--conv",
                              "--rounds", "1", "--out", str(tmp_path / "tiny")])
    assert res.exit_code == 0, res.output
    assert f"Run: {trained_run}" in res.output and "(the newest trained run" in res.output
    assert "Test accuracy fell by" in res.output and "--finetune 2" in res.output
    assert "conv2d: 24 -> 1 filters" in res.output and "dense: 256 -> 3 units" in res.output


def test_compress_refuses_a_checkpoint_file_and_an_out_file(trained_run: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["compress", str(trained_run / "best.pt"), "--prune", "0.5"])
    assert res.exit_code == 1 and f"fcclass compress {trained_run}" in res.output
    taken = tmp_path / "model.png"
    taken.write_bytes(b"mine")
    res = runner.invoke(app, ["compress", str(trained_run), "--prune", "0.5", "--out", str(taken)])
    assert res.exit_code == 1 and "is a file" in res.output and taken.read_bytes() == b"mine"
