"""int8 quantization of an exported ONNX model with ONNX Runtime: static QDQ quantization (per-channel int8
weights, uint8 activations) calibrated on training images."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from fcclass.files import atomic_write_bytes
from fcclass.inference.onnx import onnxruntime_module

CALIBRATION = "MinMax"


ACTIVATIONS = "QUInt8"  # uint8 activations with int8 weights (U8S8), the format ONNX Runtime recommends on x86


def calibrated(images: int) -> int:
    """How many of ``images`` calibration images are used: whole batches of 64 (all of them when fewer)."""
    size = min(64, images)
    return images // size * size if size else 0


def calibration_notes(images: int, asked: int, structured: bool, quantize: bool) -> list[str]:
    """What a training split of fewer than ``asked`` (--calibration) images means: every one of them ranks units for
    --structured, and ``calibrated(images)`` of them, as the int8 model's record says, calibrate --quantize int8."""
    if images >= asked or not (structured or quantize):
        return []
    used = calibrated(images)
    uses = [*(["all of them rank the units to prune"] if structured else []),
            *([("all of them" if used == images else f"{used:,} of them (whole batches of 64)") + " calibrate the int8 ranges"]
              if quantize else [])]
    return [f"The training split has {images:,} images, fewer than --calibration {asked:,}: {' and '.join(uses)}."]


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


def quantize_int8(float_onnx: Path, out: Path, calibration: np.ndarray) -> None:
    """Write ``out``: ``float_onnx`` with int8 weights (per output channel) and uint8 activations whose ranges come
    from running ``calibration`` (float32 pixels in [0, 1], N x C x H x W) through it, in the QDQ form (float
    operators between QuantizeLinear/DequantizeLinear pairs, which ONNX Runtime fuses into int8 kernels, and which
    other runtimes and accelerators read too)."""
    ort = onnxruntime_module()
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

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


# The operators that get int8 kernels. Measured on the default model (benchmarks/RESULTS.md): quantizing every
# operator ONNX Runtime can (Relu, BatchNormalization, Reshape, the normalisation's Sub/Div too) made the QDQ model
# 1.3x slower than the float one at batch 256, and the QOperator form lost 22 points of accuracy; with these four,
# QDQ runs 1.5x faster than float at batch 256, as fast as QOperator, and within 0.1 point of float.
INT8_OPS = ["Conv", "Gemm", "MatMul", "MaxPool"]
