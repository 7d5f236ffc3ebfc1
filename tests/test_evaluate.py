"""Evaluation report against an independent numpy computation; eval artefacts; predict outputs; export."""

from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_fashion
from PIL import Image
from typer.testing import CliRunner

from fcclass.cli import app
from fcclass.inference.evaluate import compute_report

runner = CliRunner(env={"COLUMNS": "200"})


def test_report_agrees_with_numpy() -> None:
    rng = np.random.default_rng(0)
    k, n = 12, 600
    labels = rng.integers(0, k - 1, n)  # the last class never occurs...
    logits = rng.normal(size=(n, k)) + 2.5 * np.eye(k)[labels] * (rng.random(n) < 0.6)[:, None]
    logits[:, 3] -= 10  # ...and class 3 is never predicted
    report = compute_report(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels), [f"c{i}" for i in range(k)])

    preds = logits.argmax(1)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (labels, preds), 1)
    assert report.confusion.tolist() == cm.tolist()
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    for i in range(k):
        m = report.per_class[f"c{i}"]
        assert m["support"] == support[i]
        assert m["accuracy"] == pytest.approx(recall[i], abs=1e-6)
        assert m["precision"] == pytest.approx(precision[i], abs=1e-6)
        assert m["f1"] == pytest.approx(f1[i], abs=1e-6)
    assert report.accuracy == pytest.approx((preds == labels).mean())
    assert report.macro["f1"] == pytest.approx(f1.mean(), abs=1e-6)
    assert report.weighted["f1"] == pytest.approx((f1 * support).sum() / n, abs=1e-6)
    assert report.weighted["recall"] == pytest.approx(report.accuracy, abs=1e-6)
    top5 = np.argsort(-logits, 1)[:, :5]
    assert report.top5_accuracy == pytest.approx((top5 == labels[:, None]).any(1).mean(), abs=1e-6)
    shifted = logits - logits.max(1, keepdims=True)
    nll = -(shifted[np.arange(n), labels] - np.log(np.exp(shifted).sum(1)))
    assert report.loss == pytest.approx(nll.mean(), rel=1e-5)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    top = report.confused_pairs(3)
    assert [p["count"] for p in top] == sorted(off.flatten())[::-1][:3]
    t, p = np.unravel_index(off.argmax(), off.shape)
    assert (top[0]["true"], top[0]["predicted"]) == (f"c{t}", f"c{p}")


def _onnx_table(path: Path, table: np.ndarray) -> Path:
    """An ONNX model, pixels [N, R] in, probabilities out: softmax(pixels @ table), so a one-hot row i gives the
    softmax of ``table[i]``; in ONNX Runtime, as an int8 model of a run runs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows, k = table.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["image", "table"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probs"], axis=1)],
        "table", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", rows])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", k])],
        [numpy_helper.from_array(table.astype(np.float32), "table")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def test_tied_scores_are_broken_the_same_way_by_eval_predict_and_the_int8_path(tmp_path: Path) -> None:
    """Exact ties (common in an int8 model's quantized outputs): the lower label wins in eval's report, in eval's and
    predict's accuracy and in predict's labels, from raw logits and from an ONNX model's probabilities alike."""
    pytest.importorskip("onnxruntime")
    from fcclass.inference.metrics import predicted, ranked, score
    from fcclass.inference.onnx import OnnxNet
    from fcclass.inference.predict import Prediction, _fill

    table = np.array([[1, 3, 3, 0], [2, 2, 2, 2], [0, 5, 1, 5], [-1, -1, -2, -3], [0, 0, 4, 4]], dtype=np.float32)
    first = torch.tensor([1, 0, 1, 0, 2])  # the lowest of each row's tied best labels
    labels = torch.tensor([2, 3, 3, 1, 2])  # the other tied label, where there is one: counted wrong
    onnx_logits = OnnxNet(_onnx_table(tmp_path / "tied.onnx", table))(torch.eye(len(table)))
    assert onnx_logits[0, 1] == onnx_logits[0, 2] and onnx_logits[4, 2] == onnx_logits[4, 3]  # the ties survive ONNX Runtime
    names = ["a", "b", "c", "d"]
    for logits in (torch.from_numpy(table), onnx_logits):
        assert predicted(logits).tolist() == ranked(logits, 1)[:, 0].tolist() == first.tolist()
        preds = [Prediction(str(i)) for i in range(len(table))]
        _fill(preds, logits, names, 3)
        assert [names.index(p.label) for p in preds] == first.tolist()
        report = compute_report(logits, labels, names)
        assert report.predictions.tolist() == first.tolist()
        assert report.accuracy == score(logits, labels).accuracy == 0.2  # the last row only


def test_top5_is_absent_with_five_classes_or_fewer() -> None:
    report = compute_report(torch.randn(20, 5), torch.randint(0, 5, (20,)), list("abcde"))
    assert report.top5_accuracy is None


@needs_fashion
def test_eval_writes_confusion_matrix_json_and_misclassified_grid(trained_run: Path) -> None:
    res = runner.invoke(app, ["eval", str(trained_run), "--misclassified", "12", "--normalize"])
    assert res.exit_code == 0, res.output
    for text in ("Precision", "F1", "Macro avg", "Weighted avg", "top-5 accuracy", "Confusion matrix", "row-normalised", "Most confused"):
        assert text in res.output
    data = json.loads((trained_run / "eval.json").read_text())
    cm = np.array(data["confusion_matrix"])
    assert cm.sum() == data["num_samples"] == 500
    assert np.trace(cm) / cm.sum() == pytest.approx(data["accuracy"])
    assert cm.sum(1).tolist() == [v["support"] for v in data["per_class"].values()]
    assert data["most_confused"][0]["count"] == max(cm[i, j] for i in range(10) for j in range(10) if i != j)
    for name in ("confusion_matrix.png", "misclassified.png"):
        with Image.open(trained_run / name) as img:
            assert img.width > 500
    val = runner.invoke(app, ["eval", str(trained_run), "--split", "val", "--json", "-"])
    assert val.exit_code == 0 and json.loads(val.stdout)["num_samples"] == 300  # 10% of 3,000
    assert (trained_run / "eval-val.json").exists()


def _png_with_declared_size(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))


@needs_fashion
def test_predict_inputs_outputs_and_bad_files(trained_run: Path, tmp_path: Path) -> None:
    base = tmp_path / "in"
    (base / "deep" / "er").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(base / "deep" / "er" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).convert("P").save(base / "palette.png")
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)).convert("CMYK").save(base / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), "RGBA").save(base / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(base / "shoe[red].png")  # not Rich markup
    (base / "empty.png").write_bytes(b"")
    (base / "notes.png").write_text("just text")
    good = base / "deep" / "er" / "gray.png"
    (base / "truncated.png").write_bytes(good.read_bytes()[:60])
    _png_with_declared_size(base / "bomb.png", 100_000, 100_000)
    out_csv = tmp_path / "out.csv"
    res = runner.invoke(app, ["predict", str(base), str(base / "*.png"), "--run", str(trained_run), "--json", "-", "--csv", str(out_csv)])
    assert res.exit_code == 1
    preds = {Path(p["path"]).name: p for p in json.loads(res.stdout)}
    assert set(preds) == {"gray.png", "palette.png", "cmyk.jpg", "rgba.png", "shoe[red].png", "empty.png", "notes.png", "truncated.png", "bomb.png"}
    assert len(json.loads(res.stdout)) == 9  # the glob repeats files of the folder: each is predicted once
    for name in ("gray.png", "palette.png", "cmyk.jpg", "rgba.png", "shoe[red].png"):
        assert "label" in preds[name], preds[name]
    for name in ("empty.png", "notes.png", "truncated.png"):
        assert "error" in preds[name]
    assert "decompression bomb" in preds["bomb.png"]["error"]
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 9 and {"path", "label", "probability", "error", "top3_label"} <= set(rows[0])
    table = runner.invoke(app, ["predict", str(base / "shoe[red].png"), "--run", str(trained_run)])
    assert table.exit_code == 0 and "shoe[red].png" in table.output
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["gray.png"]["label"] == preds["gray.png"]["label"]
    assert by_name["notes.png"]["error"]


@needs_fashion
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_predicts_like_predict(trained_run: Path, tmp_path: Path, fmt: str) -> None:
    from fcclass.config.sections import DataConfig
    from fcclass.data import load_dataset
    from fcclass.inference.predict import predict

    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt")
    res = runner.invoke(app, ["export", str(trained_run), "--format", fmt, "--out", str(out)])
    assert res.exit_code == 0, res.output
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["class_names"][0] == "T-shirt/top" and meta["input"]["shape"] == ["batch", 1, 28, 28]
    assert len(meta["input"]["normalization_inside_model"]["mean"]) == 1

    test = load_dataset(DataConfig(root=str(Path(__file__).resolve().parent.parent / "data"), download=False), 0, splits=("test",)).test
    files = []
    for i in range(64):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(test.images[i, 0].numpy(), "L").save(files[-1])
    expected = predict(files, trained_run, top_k=10)
    x = test.images[:64].float().numpy() / 255.0  # the preprocessing the JSON describes
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out))
        probs = session.run(None, {"image": x})[0]
    else:
        probs = torch.jit.load(str(out))(torch.from_numpy(x)).detach().numpy()
    assert [meta["class_names"][i] for i in probs.argmax(1)] == [p.label for p in expected]
    top_prob = np.array([p.probability for p in expected])
    assert np.allclose(probs.max(1), top_prob, atol=1e-4)


def test_export_errors(tmp_path: Path) -> None:
    res = runner.invoke(app, ["export", "--runs-dir", str(tmp_path)])
    assert res.exit_code == 1 and "No trained runs found" in res.output
