"""Device and precision selection, shared by training, evaluation and prediction."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from fcclass.errors import FcclassError


def select_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FcclassError(f"The device is '{name}' (train.device or --device) but CUDA is not available on this machine; use auto or cpu.")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise FcclassError(f"The device is '{name}' (train.device or --device) but this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FcclassError("The device is 'mps' (train.device or --device) but MPS is not available on this machine; use auto or cpu.")
    return torch.device(name)


def select_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if name == "fp32":
        return None
    if name == "fp16" and device.type != "cuda":
        raise FcclassError(f"train.precision fp16 needs a CUDA device (the device is {device.type}); use bf16 or fp32.")
    return torch.bfloat16 if name == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
