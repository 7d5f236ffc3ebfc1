"""Device and precision selection, shared by training, evaluation, prediction and the benchmark."""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from fcclass.errors import FcclassError

DEVICE_FORMS = "auto, cpu, cuda, cuda:N (N a GPU index, e.g. cuda:0) or mps"


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def select_device(name: str) -> torch.device:
    """The torch device for ``name`` (auto: CUDA, then MPS, then the CPU), or a clear error for a name that is not a
    device or a device this machine lacks."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name or ""):
        raise FcclassError(f"Unknown device '{name}' (train.device or --device): use {DEVICE_FORMS}.")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FcclassError(f"The device is '{name}' (train.device or --device) but CUDA is not available on this machine; use auto or cpu.")
        index = int(name.split(":")[1]) if ":" in name else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise FcclassError(f"The device is '{name}' (train.device or --device) but this machine has {count} CUDA device(s); "
                               f"use cuda:0 to cuda:{count - 1}.")
    if name == "mps" and not _mps_available():
        raise FcclassError("The device is 'mps' (train.device or --device) but MPS is not available on this machine; use auto or cpu.")
    return torch.device(name)


def cpu_bf16_native() -> bool:
    """Whether this CPU does bf16 matrix math in hardware (AVX512-BF16 or AMX tiles), where oneDNN runs bf16
    convolutions and matmuls faster than fp32; elsewhere bf16 is emulated and slower. FCCLASS_CPU_BF16=0 turns the
    automatic choice off (=1 forces it, for testing)."""
    forced = os.environ.get("FCCLASS_CPU_BF16", "").strip().lower()
    if forced in ("0", "no", "false", "off"):
        return False
    if forced in ("1", "yes", "true", "on"):
        return True
    if forced:
        raise FcclassError(f"FCCLASS_CPU_BF16={forced!r} is not understood: use 0 (never bf16 on the CPU) or 1 (always), "
                           "or unset it to let train.precision auto decide from the CPU.")
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    return False


def select_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. auto: bf16 on GPUs that support it and on CPUs with native bf16
    (measured on such a CPU: the default config's epochs 1.3-1.6x faster for the same test accuracy, RESULTS.md)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_bf16_native():
            return torch.bfloat16
        return None
    if name == "fp32":
        return None
    if name == "fp16" and device.type != "cuda":
        raise FcclassError(f"train.precision fp16 needs a CUDA device (the device is {device.type}); use bf16 or fp32.")
    return torch.bfloat16 if name == "bf16" else torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        """Machines in the job (torchrun starts the same number of processes on each)."""
        return max(1, self.world // self.local_world)

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.world}" if self.enabled else "single process"


SINGLE = Dist()
