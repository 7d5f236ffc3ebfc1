"""Export a trained model to ONNX or TorchScript, with its preprocessing described in a JSON file beside it."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcclass.data import LUMA
from fcclass.errors import FcclassError
from fcclass.files import check_output, is_stream, read_regular, write_output
from fcclass.inference.load import Inference, load_for_inference
from fcclass.inference.onnx import OnnxNet
from fcclass.model.backbones import first_layer_stats

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}


@dataclass
class Exported:
    """What export did: the deployable model and its description (None when the model went to a stream), the files it
    wrote (a compressed run's int8 model, exported where it already is, is left as it is) and how the run was picked."""

    model: Path
    description: Path | None
    note: str | None = None
    written: list[Path] = field(default_factory=list)


class Deployable(nn.Module):
    """Pixels scaled to [0, 1] in, class probabilities out: normalisation and softmax are inside."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        channels = len(mean) or 1
        self.register_buffer("mean", torch.tensor(mean or [0.0] * channels).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std or [1.0] * channels).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net((image - self.mean) / self.std).float(), dim=1)


def export_model(run: str | Path | None = None, checkpoint: str | Path | None = None, *, fmt: str = "onnx",
                 out: str | Path | None = None, runs_dir: str | Path = "runs") -> Exported:
    """Write the model (default ``RUN_DIR/model.onnx``) and ``<file>.json`` describing its input and output (not when
    the model goes to a stream such as a pipe or /dev/null). A compressed run's model is its int8 ONNX file: copied
    to ``out``; without ``out`` it is already in place and nothing is rewritten."""
    if fmt not in FORMATS:
        raise FcclassError(f"--format must be one of {', '.join(FORMATS)}, not '{fmt}'.")
    inf = load_for_inference(run, checkpoint, runs_dir=runs_dir, device="cpu")
    shape = list(inf.image_shape)
    if isinstance(inf.model, OnnxNet):
        return _export_int8(inf, fmt, out)
    model = Deployable(inf.model.float(), list(inf.checkpoint.mean), list(inf.checkpoint.std)).eval()
    target = Path(out) if out is not None else inf.path.parent / FORMATS[fmt]
    sidecar = None if is_stream(target) else target.with_name(target.name + ".json")  # no /dev/null.json
    check_output(target, "the model")
    if sidecar is not None:
        check_output(sidecar, "the model's description")
    example = torch.rand(2, *shape)
    with tempfile.TemporaryDirectory(prefix="fcclass-export-") as tmp:  # the exporters write files; -o may not be one
        scratch = Path(tmp) / FORMATS[fmt]
        if fmt == "onnx":
            _export_onnx(model, example, scratch)
        else:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.jit.save(torch.jit.trace(model, example), str(scratch))
        write_output(target, scratch.read_bytes(), "the model")
    if sidecar is not None:
        write_output(sidecar, json.dumps(describe(inf, fmt, target.name), indent=2) + "\n", "the model's description")
    return Exported(target, sidecar, inf.note, [p for p in (target, sidecar) if p is not None])


def _export_int8(inf: Inference, fmt: str, out: str | Path | None) -> Exported:
    """A compressed run's int8 model is an ONNX file already: it is copied (with its description) to ``out``. Without
    ``out`` (or with its own path) it stays as it is, and so does its description, unless that went missing."""
    assert isinstance(inf.model, OnnxNet)
    if fmt != "onnx":
        raise FcclassError(f"This run's model is int8 ONNX ({inf.model.path}), which has no {fmt} form. Export it with "
                           f"--format onnx, or export its float weights: fcclass export --checkpoint {inf.path} --format {fmt}.")
    target = Path(out) if out is not None else inf.model.path
    sidecar = None if is_stream(target) else target.with_name(target.name + ".json")
    source = inf.model.path.with_name(inf.model.path.name + ".json")
    done = Exported(target, sidecar, inf.note)
    if target.absolute() != inf.model.path.absolute():
        check_output(target, "the model")
        write_output(target, inf.model.path.read_bytes(), "the model")
        done.written.append(target)
    if sidecar is not None and (sidecar.absolute() != source.absolute() or not source.is_file()):
        facts = _recorded_description(source) or describe(inf, fmt, target.name)
        write_output(sidecar, json.dumps(facts | {"file": target.name}, indent=2) + "\n", "the model's description")
        done.written.append(sidecar)
    return done


def _recorded_description(source: Path) -> dict[str, Any] | None:
    """The description compress wrote beside an int8 model (read through the guarded reader), or None when it is
    missing or unusable (then it is described afresh)."""
    try:
        facts = json.loads(read_regular(source, 1 << 20).decode("utf-8"))
    except (OSError, ValueError):  # missing, a FIFO or device, too large, not UTF-8 or not JSON
        return None
    return facts if isinstance(facts, dict) else None


def _export_onnx(model: nn.Module, example: torch.Tensor, target: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise FcclassError("ONNX export needs the onnx and onnxscript packages: pip install 'fcclass[export]'.") from None
    batch = torch.export.Dim("batch", min=1)
    # The exporter reports its progress on stdout, which would corrupt --json output.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["image"], output_names=["probabilities"],
                                    dynamic_shapes=({0: batch},), verbose=False)
        program.save(str(target))


def _normalization(inf: Inference) -> dict[str, list[float]]:
    """The run's mean and std, or, when its first layer normalises instead (a pretrained Backbone), that layer's (over
    3 channels: a grayscale image is repeated to 3 before)."""
    mean, std = list(inf.checkpoint.mean), list(inf.checkpoint.std)
    stats = None if mean else first_layer_stats(inf.model)
    return {"mean": stats[0], "std": stats[1]} if stats else {"mean": mean, "std": std}


def describe(inf: Inference, fmt: str, filename: str) -> dict[str, Any]:
    c, h, w = inf.image_shape
    return {
        "format": fmt,
        "file": filename,
        "checkpoint": str(inf.path.absolute()),
        "class_names": inf.class_names,
        "input": {
            "name": "image",
            "shape": ["batch", c, h, w],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "preprocessing": [
                f"decode the image; convert to {'grayscale (L = 0.299 R + 0.587 G + 0.114 B, transparency over white)' if c == 1 else 'RGB'}",
                f"resize to {h}x{w} (height x width), bilinear with antialiasing, round to uint8",
                "divide the uint8 pixel values by 255",
                "layout: channels first (N, C, H, W)",
            ],
            "normalization_inside_model": _normalization(inf),
            "luma_weights": list(LUMA),
        },
        "output": {"name": "probabilities", "shape": ["batch", len(inf.class_names)],
                   "meaning": "softmax probabilities, in the order of class_names"},
    }
