"""int8 models through ONNX Runtime: static quantization (per-channel weights) of the exported ONNX model,
calibrated on training images, and the module that runs such a model wherever fcclass runs a Network.

The quantized model keeps the export's contract (fcclass.export.Deployable): pixels scaled to [0, 1] in, class
probabilities out, with the normalisation inside; the softmax stays in float, so small probabilities keep their
precision. benchmarks/RESULTS.md has the measurements behind the choices (ONNX Runtime against torchao, U8S8, MinMax).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

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

    def check_fits(self, input_shape: Sequence[int], class_names: Sequence[str], run_dir: Path) -> None:
        """Raise CheckpointError unless the model takes the run's images (input_shape, its recorded [C, H, W]) and
        gives one score per class of the run: a model file replaced by another's would otherwise fail inside eval or
        predict, or be exported as this run's. Checked by its declared input and by a run on one blank image."""
        want = [int(d) for d in input_shape]
        declared = list(self.session.get_inputs()[0].shape)
        fix = (f"It is not the model this run was compressed into (replaced or damaged): write it again with fcclass compress, "
               f"or use the run's float weights with --checkpoint {run_dir / 'best.pt'}.")
        shown = "x".join(str(d) for d in want)
        if len(declared) != len(want) + 1 or any(isinstance(d, int) and d != w for d, w in zip(declared[1:], want)):
            raise CheckpointError(f"'{self.path}' takes input of shape {declared}, but the run's images are [N, {', '.join(map(str, want))}] "
                                  f"({shown}). {fix}")
        try:
            out = np.asarray(self.probabilities(np.zeros([1, *want], dtype=np.float32)))
        except Exception as e:  # onnxruntime raises its own types for inputs of the wrong shape or type
            raise CheckpointError(f"'{self.path}' does not run on the run's images ({shown}): {str(e).splitlines()[0][:200]}. {fix}") from None
        if out.shape != (1, len(class_names)):
            scores = out.shape[1] if out.ndim == 2 else f"an output of shape {list(out.shape)} for one image, not one score per class"
            raise CheckpointError(f"'{self.path}' gives {scores} class scores, but the run has {len(class_names)} classes "
                                  f"({', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''}). {fix}")
