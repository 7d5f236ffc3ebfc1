"""Inference: one way to load a trained model (``load``), evaluation, prediction, export, and int8 ONNX models."""

from fcclass.inference.load import Inference, load_for_inference, rebuild, run_model

__all__ = ['run_model', 'Inference', 'load_for_inference', 'rebuild']
