"""`fcclass bench`: fcclass's training loop against a plain PyTorch loop, Keras and the machine's matmul peak.

Throughput mode trains the same model on the same Fashion-MNIST images in one process: (a) fcclass from a YAML
config, (b) the loop of the PyTorch examples (torchvision dataset with ToTensor + Normalize, DataLoader, batch 64),
(c) Keras's model.fit on the config's layers (when Keras is installed), and reports the GFLOP/s (a) achieves against
a measured matmul peak. Time-to-accuracy mode trains a config and reports when test accuracy first reaches each target."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

from fcclass.config.load import SHIPPED_CONFIGS, load_config
from fcclass.config.sections import Config
from fcclass.training.callbacks import Callback

MODELS = {"default": SHIPPED_CONFIGS / "fashion_mnist.yaml", "examples": SHIPPED_CONFIGS / "pytorch_examples_mnist.yaml"}


# ----------------------------------------------------------------------------- the reference, written as the examples do
class ExamplesNet(nn.Module):
    """pytorch/examples mnist/main.py's Net."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.dropout1(torch.max_pool2d(x, 2))
        x = self.dropout2(torch.relu(self.fc1(torch.flatten(x, 1))))
        return torch.log_softmax(self.fc2(x), dim=1)


class DefaultNet(nn.Module):
    """configs/fashion_mnist.yaml's model, written by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 24, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(24, 48, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(48, eps=1e-3, momentum=0.01),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2352, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head(self.features(x)), dim=1)


REFERENCE_NETS: dict[str, Callable[[], nn.Module]] = {"examples": ExamplesNet, "default": DefaultNet}
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # the training set's pixel statistics, as the examples hard-code them


def _fashion_mnist(data_root: str, transform: Any = None) -> Any:
    """torchvision's FashionMNIST training set, from the raw files fcclass unpacks (Debian's copy or a download)."""
    from torchvision import datasets

    from fcclass.config.registries import DATASETS
    from fcclass.data import unpack_debian_copy

    unpack_debian_copy(DATASETS["fashion_mnist"], Path(data_root))
    return datasets.FashionMNIST(data_root, train=True, download=False, transform=transform)


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reference_loop(model_name: str, data_root: str, images: int, device: torch.device | None = None) -> dict[str, float]:
    """Train ``images`` images the way the PyTorch examples do (fp32, batches moved to the device one by one)."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms

    device = device or torch.device("cpu")
    torch.manual_seed(0)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((FASHION_MEAN,), (FASHION_STD,))])
    dataset = _fashion_mnist(data_root, transform)
    loader = DataLoader(Subset(dataset, range(min(images, len(dataset)))), batch_size=64, shuffle=True)
    model = REFERENCE_NETS[model_name]().to(device)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0) if model_name == "examples" else torch.optim.Adam(model.parameters(), 2e-3)
    model.train()
    seen, started = 0, time.perf_counter()
    for data, target in loader:
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        loss = nn.functional.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        seen += len(target)
    _sync(device)
    seconds = time.perf_counter() - started
    return {"images": seen, "seconds": seconds, "images_per_s": seen / seconds}


# ----------------------------------------------------------------------------- fcclass's own loop
def _config(model_name: str, data_root: str, overrides: list[str], runs_dir: str = "runs") -> Config:
    """The benchmark model's config: a named one (default, examples) or, in tta mode, any config (a shipped name like
    fashion_mnist_best, or a YAML path)."""
    return load_config(MODELS.get(model_name, model_name), [f"data.root={data_root}", f"train.runs_dir={runs_dir}", *overrides])


def _fit_in_scratch(cfg_args: tuple[str, str, list[str]], callbacks: list[Any]) -> Any:
    """fit() with the run written to a temporary folder that is removed afterwards: benchmarks keep no runs."""
    import tempfile

    from fcclass.training.fit import fit

    with tempfile.TemporaryDirectory(prefix="fcclass-bench-") as scratch:
        return fit(_config(*cfg_args, runs_dir=scratch), callbacks=callbacks)


class EpochClock(Callback):
    """The seconds and images of each epoch's training part (validation excluded), read when its last batch ends
    (the trainer has synchronised with the device there)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_batch_end(self, trainer: Any, info: Any) -> None:
        if info.batch == info.batches:
            self.epochs.append({"epoch": info.epoch, "seconds": info.seconds, "images": info.images})


def fcclass_loop(model_name: str, data_root: str, images: int, device: str = "auto") -> dict[str, float]:
    """One epoch over ``images`` training images with fcclass's loop (the config's batch size); images/s over its training part."""
    sets = [f"data.limit_train={images + max(1, images // 9)}", "data.val_split=0.1", "train.epochs=1", f"train.device={device}"]
    clock = EpochClock()
    result = _fit_in_scratch((model_name, data_root, sets), [clock])
    (epoch,) = clock.epochs
    return {"images": epoch["images"], "seconds": epoch["seconds"], "images_per_s": epoch["images"] / epoch["seconds"],
            "precision": result.precision}


# ----------------------------------------------------------------------------- Keras, on the same config
def keras_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("keras") is not None


def _import_keras() -> Any:
    """Keras 3 on the backend named by KERAS_BACKEND; the benchmark picks torch (the same kernels) unless the user chose."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    return keras


def keras_model(cfg: Config, num_classes: int) -> Any:
    """The config's layers as a keras.Sequential for 28x28 grayscale input (the benchmark's Fashion-MNIST):
    fcclass's layer keys are Keras's constructor arguments."""
    keras = _import_keras()

    layers: list[Any] = [keras.Input((28, 28, 1))]
    for spec in cfg.model.layers:
        kwargs = spec.model_dump(exclude={"type"}, exclude_none=True)
        if "kernel_regularizer" in kwargs:
            kwargs["kernel_regularizer"] = keras.regularizers.L1L2(**kwargs["kernel_regularizer"])
        if spec.type == "Dense" and "units" not in kwargs:
            kwargs["units"] = num_classes
        layers.append(getattr(keras.layers, spec.type)(**kwargs))
    return keras.Sequential(layers)


KERAS_OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop", "adadelta": "Adadelta"}


def keras_device() -> str:
    """Where Keras's torch backend trains: it takes CUDA whenever torch sees a GPU and has no switch of its own."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def keras_runs_on(device: torch.device) -> bool:
    """Keras is installed and would train on ``device``, so its figures compare with the other loops'."""
    return keras_available() and keras_device() == device.type


def keras_loop(model_name: str, data_root: str, images: int) -> dict[str, Any]:
    """One epoch of ``model.fit`` on the same images, normalised in numpy, with the config's batch size and optimizer."""
    import numpy as np

    raw = _fashion_mnist(data_root)
    x = ((raw.data[:images].numpy().astype(np.float32) / 255.0 - FASHION_MEAN) / FASHION_STD)[..., None]
    y = raw.targets[:images].numpy()
    cfg = _config(model_name, data_root, [])
    keras = _import_keras()
    keras.utils.set_random_seed(0)
    model = keras_model(cfg, 10)
    optimizer = getattr(keras.optimizers, KERAS_OPTIMIZERS[cfg.optimizer.name])(learning_rate=cfg.optimizer.lr)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    model.fit(x, y, batch_size=cfg.data.batch_size, epochs=1, shuffle=True, verbose=0)
    seconds = time.perf_counter() - started
    return {"images": len(y), "seconds": seconds, "images_per_s": len(y) / seconds,
            "backend": keras.backend.backend(), "version": keras.__version__, "device": keras_device()}


# ----------------------------------------------------------------------------- hardware limit
def train_flops_per_image(model_name: str, data_root: str) -> float:
    """FLOPs of one training step (forward + backward) per image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from fcclass.model.network import build_model

    cfg = _config(model_name, data_root, [])
    model = build_model(cfg.model, [1, 28, 28], 10)
    x = torch.randn(16, 1, 28, 28)
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), torch.zeros(16, dtype=torch.long)).backward()
    return counter.get_total_flops() / 16


class Peak(NamedTuple):
    gflops: float  # the best repeat's
    dtype: str
    repeats: list[float]  # GFLOP/s of each timed repeat, for their spread


def matmul_repeats(device: torch.device | None = None, dtype: torch.dtype = torch.float32, repeats: int = 10) -> list[float]:
    """GFLOP/s of each of ``repeats`` square matmuls in ``dtype`` on ``device`` (2048 on the CPU, 8192 on a GPU), after
    one untimed warm-up."""
    device = device or torch.device("cpu")
    size = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _sync(device)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        _sync(device)
        rates.append(2 * size**3 / (time.perf_counter() - t) / 1e9)
    return rates


def training_peak(device: torch.device) -> Peak:
    """The matmul peak in the precision fcclass trains in on ``device`` (bf16 autocast on CUDA, else fp32), its name,
    and every repeat's figure."""
    from fcclass.device import select_precision

    dtype = select_precision("auto", device) or torch.float32
    rates = matmul_repeats(device, dtype)
    return Peak(max(rates), str(dtype).removeprefix("torch."), rates)


# ----------------------------------------------------------------------------- repeats that disagree
SPREAD_LIMIT = 0.20  # the slowest repeat this far below the fastest: the machine was busy, the figures are unreliable
LOOP_NAMES = {"reference": "the PyTorch-examples loop", "keras": "Keras's model.fit", "fcclass": "fcclass's loop"}


def spread(rates: Sequence[float]) -> float:
    """How far the slowest of repeated measurements fell below the fastest, as a fraction of the fastest (0 for one)."""
    return 0.0 if len(rates) < 2 or max(rates) <= 0 else 1 - min(rates) / max(rates)


def spread_warnings(measurements: dict[str, Sequence[float]], unit: str) -> list[dict[str, Any]]:
    """One warning for each measurement whose repeats disagree by more than SPREAD_LIMIT: which one, by how much,
    what that means and what to do."""
    out = []
    for name, rates in measurements.items():
        s = spread(rates)
        if s > SPREAD_LIMIT:
            out.append({"measurement": name, "repeats": len(rates), "spread": round(s, 4), "slowest": min(rates),
                        "fastest": max(rates), "unit": unit,
                        "message": f"{name} varied by {s:.0%} over its {len(rates)} repeats ({min(rates):,.0f} to {max(rates):,.0f} "
                                   f"{unit}, more than the {SPREAD_LIMIT:.0%} a quiet machine stays within): the machine was "
                                   "probably busy with other work, so the figures that use it are unreliable. Re-run the "
                                   "benchmark with nothing else running."})
    return out


@dataclass
class ThroughputResult:
    model: str
    fcclass: dict[str, float]
    reference: dict[str, float]
    flops_per_image: float
    peak_gflops: float
    keras: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    repeat_rates: dict[str, list[float]] = field(default_factory=dict)  # images/s of every repeat of each loop

    @property
    def warnings(self) -> list[dict[str, Any]]:
        return spread_warnings({f"{LOOP_NAMES[name]} ({self.model} model)": rates for name, rates in self.repeat_rates.items()}, "images/s")

    @property
    def speedup(self) -> float:
        return self.fcclass["images_per_s"] / self.reference["images_per_s"]

    @property
    def achieved_gflops(self) -> float:
        return self.fcclass["images_per_s"] * self.flops_per_image / 1e9

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model, **self.extra, "fcclass": self.fcclass, "reference": self.reference, "speedup": self.speedup}
        if self.keras is not None:
            out |= {"keras": self.keras, "speedup_vs_keras": self.fcclass["images_per_s"] / self.keras["images_per_s"]}
        return out | {"train_gflop_per_image": self.flops_per_image / 1e9, "achieved_gflops": self.achieved_gflops,
                      "matmul_peak_gflops": self.peak_gflops, "fraction_of_peak": self.achieved_gflops / self.peak_gflops,
                      "repeat_images_per_s": self.repeat_rates,
                      "spread": {name: round(spread(rates), 4) for name, rates in self.repeat_rates.items()}, "warnings": self.warnings}


def throughput(model_name: str, data_root: str = "data", images: int = 12_800, peak: Peak | None = None,
               repeats: int = 1, keras: bool = True, device: str = "auto") -> ThroughputResult:
    """Alternate the reference, Keras (when installed, ``keras`` and it trains on the same device) and fcclass
    ``repeats`` times on ``device``; keep each one's best run (machines are noisy) and every run's figure, whose spread
    says how noisy (``ThroughputResult.warnings``). ``peak``: a training_peak() to reuse across models."""
    from fcclass.device import select_device

    dev = select_device(device)
    loops: dict[str, Callable[[], dict[str, Any]]] = {
        "reference": lambda: reference_loop(model_name, data_root, images, dev),
        "fcclass": lambda: fcclass_loop(model_name, data_root, images, str(dev)),
    }
    if keras and keras_runs_on(dev):
        loops["keras"] = lambda: keras_loop(model_name, data_root, images)
    best: dict[str, dict[str, Any]] = {}
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, run in loops.items():
            result = run()
            rates[name].append(result["images_per_s"])
            if name not in best or result["images_per_s"] > best[name]["images_per_s"]:
                best[name] = result
    peak_gflops, peak_dtype, _ = peak if peak is not None else training_peak(dev)
    return ThroughputResult(model_name, best["fcclass"], best["reference"], train_flops_per_image(model_name, data_root),
                            peak_gflops, best.get("keras"), {"repeats": repeats, "device": str(dev), "matmul_peak_dtype": peak_dtype},
                            rates)


def time_to_accuracy(model_name: str, targets: list[float], data_root: str = "data", overrides: list[str] | None = None,
                     device: str = "auto") -> dict[str, Any]:
    """Train the config; after each epoch measure test accuracy; report cumulative training seconds per target."""
    from fcclass.data import load_dataset, make_loader
    from fcclass.device import select_device
    from fcclass.inference.load import inference_dtype, run_model
    from fcclass.inference.metrics import score

    sets = [f"train.device={device}", *(overrides or [])]
    cfg = _config(model_name, data_root, sets)
    test = load_dataset(cfg.data, cfg.seed, splits=("test",))
    loader = make_loader(test.test, 256, False, 0, test.channels, test.size, device=select_device(device))
    clock = EpochClock()
    epochs: list[dict[str, float]] = []
    reached: dict[str, float | None] = {f"{t:.4g}": None for t in targets}

    class TestAfterEpoch(Callback):
        def on_epoch_end(self, trainer: Any, row: dict[str, Any], is_best: bool) -> None:
            logits, labels = run_model(trainer.model, loader, trainer.eval_prep, trainer.device, inference_dtype(trainer.device))  # as fcclass eval
            acc = score(logits, labels).accuracy
            seconds = sum(e["seconds"] for e in clock.epochs)
            epochs.append({"epoch": row["epoch"], "test_accuracy": acc, "train_seconds_cumulative": seconds})
            for t in targets:
                if acc >= t and reached[f"{t:.4g}"] is None:
                    reached[f"{t:.4g}"] = seconds

    result = _fit_in_scratch((model_name, data_root, sets), [clock, TestAfterEpoch()])
    return {"model": model_name, "device": result.device, "precision": result.precision, "epochs": epochs, "seconds_to_target": reached,
            "final_test_accuracy": epochs[-1]["test_accuracy"] if epochs else None,
            "train_seconds_total": sum(e["seconds"] for e in clock.epochs)}
