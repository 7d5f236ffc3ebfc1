"""Is fcclass's hand-written CPU Dropout still worth keeping? Times it against torch.nn.Dropout, forward + backward,
on the examples net's shapes, and one whole training step of the examples net and of the default model with each.

    .venv/bin/python benchmarks/dropout.py        (nothing else running; 2 threads)
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import fcclass.model as M
from fcclass.config.load import load_config


def forward_backward(shape: tuple[int, ...], p: float, cls: type, reps: int = 200) -> float:
    m, x = cls(p).train(), torch.randn(*shape, requires_grad=True)
    for _ in range(20):
        m(x).sum().backward()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        m(x).sum().backward()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def step_ms(config: str, batch: int, custom: bool, steps: int = 60) -> float:
    cfg = load_config(config)
    original = M.Dropout.forward
    if not custom:
        M.Dropout.forward = nn.Dropout.forward
    try:
        torch.manual_seed(0)
        net = M.build_model(cfg.model, [1, 28, 28], 10)
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t)
        return statistics.median(times[10:]) * 1e3
    finally:
        M.Dropout.forward = original


if __name__ == "__main__":
    torch.set_num_threads(2)
    for shape, p in (((64, 64, 12, 12), 0.25), ((64, 128), 0.5), ((128, 128), 0.3)):
        print(f"{shape} p={p}: custom {forward_backward(shape, p, M.Dropout):.3f} ms, torch {forward_backward(shape, p, nn.Dropout):.3f} ms")
    for config, batch in (("pytorch_examples_mnist", 64), ("fashion_mnist", 128)):
        runs: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(4):  # alternate, keep each one's best: the machine is noisy
            for custom in (True, False):
                runs[custom].append(step_ms(config, batch, custom))
        print(f"{config} step: custom {min(runs[True]):.2f} ms, torch {min(runs[False]):.2f} ms")
