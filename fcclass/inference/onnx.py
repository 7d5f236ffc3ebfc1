"""int8 models through ONNX Runtime: static quantization (per-channel weights) of the exported ONNX model,
calibrated on training images, and the module that runs such a model wherever fcclass runs a Network.

The quantized model keeps the export's contract (fcclass.export.Deployable): pixels scaled to [0, 1] in, class
probabilities out, with the normalisation inside; the softmax stays in float, so small probabilities keep their
precision. benchmarks/RESULTS.md has the measurements behind the choices (ONNX Runtime against torchao, U8S8, MinMax).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fcclass.errors import CheckpointError, FcclassError

INT8_MODEL = "model.int8.onnx"


def onnxruntime_module() -> Any:
    try:
        import onnxruntime
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        raise FcclassError("int8 models need ONNX Runtime and the ONNX exporter: pip install 'fcclass[export]'.") from None
    return onnxruntime


def session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with ``threads`` (default: torch's) threads, as a benchmark would run it."""
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
        raise CheckpointError(f"'{path}' cannot be loaded by ONNX Runtime ({str(e).splitlines()[0][:200]}): the file is "
                              "damaged or incomplete. Write it again with fcclass compress.") from None


class OnnxNet(nn.Module):
    """An ONNX model (pixels in [0, 1] -> probabilities) in a Network's place: it takes pixels scaled to [0, 1] (an
    Inference's preprocessing without normalisation) and returns log-probabilities, so argmax, softmax and the
    cross-entropy loss mean what they do for a Network's logits. Runs on the CPU whatever the input's device."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = path
        self.session = session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: pixels})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(x.detach().float().cpu().numpy())
        probs = torch.from_numpy(self.probabilities(pixels))
        return probs.clamp_min(1e-30).log().to(x.device)
