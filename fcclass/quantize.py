"""int8 models through ONNX Runtime: static quantization (per-channel weights) of the exported ONNX model,
calibrated on training images, and the module that runs such a model wherever fcclass runs a Network.

The quantized model keeps the export's contract (fcclass.export.Deployable): pixels scaled to [0, 1] in, class
probabilities out, with the normalisation inside; the softmax stays in float, so small probabilities keep their
precision. benchmarks/RESULTS.md has the measurements behind the choices (ONNX Runtime against torchao, U8S8, MinMax).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from fcclass.errors import CheckpointError, FcclassError
from fcclass.files import atomic_write_bytes

INT8_MODEL = "model.int8.onnx"
CALIBRATION = "MinMax"
ACTIVATIONS = "QUInt8"  # uint8 activations with int8 weights (U8S8), the format ONNX Runtime recommends on x86


def _ort() -> Any:
    try:
        import onnxruntime
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        raise FcclassError("int8 models need ONNX Runtime and the ONNX exporter: pip install 'fcclass[export]'.") from None
    return onnxruntime


def calibrated(images: int) -> int:
    """How many of ``images`` calibration images are used: whole batches of 64 (all of them when fewer)."""
    size = min(64, images)
    return images // size * size if size else 0


class _Calibration:
    """onnxruntime.quantization's CalibrationDataReader: the calibration images in batches of 64 (all of one size:
    the histogram calibrators stack them; a ragged remainder is left out)."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        size = min(64, len(images))
        self.batches: Iterator[np.ndarray] = (images[i:i + size] for i in range(0, calibrated(len(images)), size))
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}


# The operators that get int8 kernels. Measured on the default model (benchmarks/RESULTS.md): quantizing every
# operator ONNX Runtime can (Relu, BatchNormalization, Reshape, the normalisation's Sub/Div too) made the QDQ model
# 1.3x slower than the float one at batch 256, and the QOperator form lost 22 points of accuracy; with these four,
# QDQ runs 1.5x faster than float at batch 256, as fast as QOperator, and within 0.1 point of float.
INT8_OPS = ["Conv", "Gemm", "MatMul", "MaxPool"]


def quantize_int8(float_onnx: Path, out: Path, calibration: np.ndarray) -> None:
    """Write ``out``: ``float_onnx`` with int8 weights (per output channel) and uint8 activations whose ranges come
    from running ``calibration`` (float32 pixels in [0, 1], N x C x H x W) through it, in the QDQ form (float
    operators between QuantizeLinear/DequantizeLinear pairs, which ONNX Runtime fuses into int8 kernels, and which
    other runtimes and accelerators read too)."""
    ort = _ort()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnx

    with tempfile.TemporaryDirectory(prefix="fcclass-int8-") as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_onnx), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared)).graph
        softmax = [node.name for node in graph.node if node.op_type == "Softmax"]
        scratch = Path(tmp) / "int8.onnx"
        quantize_static(str(prepared), str(scratch), _Calibration(calibration, graph.input[0].name),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=getattr(QuantType, ACTIVATIONS),
                        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, CALIBRATION),
                        op_types_to_quantize=INT8_OPS, nodes_to_exclude=softmax)
        ort.InferenceSession(str(scratch), providers=["CPUExecutionProvider"])  # it loads, before it is kept
        atomic_write_bytes(out, scratch.read_bytes())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs and prints its progress; fcclass's own output (and --json) stays clean."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with ``threads`` (default: torch's) threads, as a benchmark would run it."""
    ort = _ort()
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
