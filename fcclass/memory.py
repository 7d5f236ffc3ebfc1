"""Memory planning: what a model, a batch or a dataset needs, worked out from shapes before anything is allocated,
and refused with the figures when the machine cannot hold it (instead of a traceback asking for terabytes, or a
process that swaps the machine to a halt)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from fcclass.errors import ModelError

FLOAT = 4  # bytes per float32 value
HEADROOM = 0.9  # of the free memory a plan may use


def human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} PB"  # pragma: no cover


def available(device: Any = None) -> tuple[int, str]:
    """Bytes free for fcclass on ``device`` (a torch.device or None for the CPU), and how the figure was read."""
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return free, f"free on {device} (of {human(total)})"
    free = _meminfo_available()
    limit = _cgroup_room()
    if limit is not None and limit < free:
        return limit, "left under this container's memory limit"
    return free, "available on this machine"


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - no way to tell: assume plenty
        return 1 << 50


def _cgroup_room() -> int | None:
    """cgroup v2's memory.max minus memory.current, if this process runs under a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        return None


def require(nbytes: float, what: str, fix: str, device: Any = None) -> None:
    """Raise ModelError when ``nbytes`` exceed what ``device`` has free (with headroom)."""
    free, how = available(device)
    if nbytes > free * HEADROOM:
        raise ModelError(f"{what} needs about {human(nbytes)}, but {human(free)} is {how}. {fix}")


def images_bytes(count: int, shape: tuple[int, ...]) -> int:
    """uint8 images held in memory, plus the float32 working copy a resize makes of one chunk of them."""
    pixels = math.prod(shape)
    return count * pixels + min(count, 4096) * pixels * FLOAT * 2


def model_bytes(params: int, activations: int, batch: int, training: bool) -> int:
    """A rough but safe estimate. Weights, gradients and two optimizer states per parameter when training (Adam's;
    SGD needs less); per sample, every layer's output kept for the backward pass and its gradient (when
    training), or the two largest outputs alive at once (inference)."""
    weights = params * FLOAT * (4 if training else 1)
    return weights + batch * activations * FLOAT * (2 if training else 1)


def network_sizes(net: Any) -> tuple[int, int, int]:
    """(parameters, the sum of every layer's output values per sample, the largest output per sample) of a built
    Network (on any device, the meta device included: only shapes are read)."""
    params = sum(p.numel() for p in net.parameters())
    outputs = [math.prod(info.output_shape) for info in net.infos] + [math.prod(net.input_shape)]
    return params, sum(outputs), max(outputs)


PROCESS_BYTES = 400 * 10**6  # what one training process holds before its model: Python, torch, fcclass, its data


def cores() -> int:
    """The CPU cores this process may run on (its affinity, else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_processes(n: int, model: int, fix: str) -> None:
    """Refuse ``n`` training processes that would not fit in this machine's memory, each holding PROCESS_BYTES and
    ``model`` bytes (its weights, optimizer state and activations in this machine's memory; 0 on GPUs)."""
    require(n * (PROCESS_BYTES + model), f"Starting {n} training processes (about {human(PROCESS_BYTES + model)} each)", fix)


def check_training(net: Any, batch: int, device: Any = None) -> None:
    params, total, _ = network_sizes(net)
    require(model_bytes(params, total, batch, training=True),
            f"Training this model ({params:,} parameters) with batch size {batch}",
            f"Make the model smaller (fewer filters or units; the largest layer is {_largest(net)}), lower data.batch_size, "
            "or lower data.image_size.", device)


def check_inference(net: Any, batch: int, device: Any = None) -> None:
    params, _, largest = network_sizes(net)
    require(model_bytes(params, 2 * largest, batch, training=False),
            f"Running this model ({params:,} parameters) on batches of {batch}", "Lower --batch-size.", device)


def _largest(net: Any) -> str:
    info = max(net.infos, key=lambda i: i.params)
    return f"'{info.name}' with {info.params:,} parameters"
