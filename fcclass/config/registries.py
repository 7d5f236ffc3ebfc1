"""Name -> factory registries for activations, initializers, optimizers, schedulers and datasets.

Adding one is one entry here. The config validates names against these keys, so this module must not
import torch at import time: every factory imports what it needs when it is called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable


# ----------------------------------------------------------------------------- activations
def _nn_module(cls_name: str, **kwargs: Any) -> Callable[[], Any]:
    def make() -> Any:
        from torch import nn

        return getattr(nn, cls_name)(**kwargs)

    return make


ACTIVATIONS: dict[str, Callable[[], Any] | None] = {
    "relu": _nn_module("ReLU"),
    "leaky_relu": _nn_module("LeakyReLU", negative_slope=0.2),  # Keras 3 default slope
    "elu": _nn_module("ELU"),
    "gelu": _nn_module("GELU"),
    "selu": _nn_module("SELU"),
    "sigmoid": _nn_module("Sigmoid"),
    "tanh": _nn_module("Tanh"),
    "softmax": _nn_module("Softmax", dim=1),
    "linear": None,  # identity: no module
}
# Elementwise and non-decreasing: they commute with max pooling (the model applies them after the pool).
MONOTONIC_ACTIVATIONS = frozenset({"relu", "leaky_relu", "elu", "selu", "sigmoid", "tanh"})


# ----------------------------------------------------------------------------- initializers
def _variance_scaling(scale: float, mode: str, distribution: str) -> Callable[[Any], None]:
    """Keras's VarianceScaling: the same variance and (truncated) distribution Keras uses."""

    def init(tensor: Any) -> None:
        from torch import nn

        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(tensor)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        variance = scale / max(1.0, n)
        if distribution == "uniform":
            limit = math.sqrt(3.0 * variance)
            nn.init.uniform_(tensor, -limit, limit)
        else:  # truncated normal at two standard deviations, corrected as Keras does
            std = math.sqrt(variance) / 0.87962566103423978
            nn.init.trunc_normal_(tensor, 0.0, std, -2 * std, 2 * std)

    return init


def _constant(value: float) -> Callable[[Any], None]:
    def init(tensor: Any) -> None:
        from torch import nn

        nn.init.constant_(tensor, value)

    return init


INITIALIZERS: dict[str, Callable[[Any], None]] = {
    "glorot_uniform": _variance_scaling(1.0, "fan_avg", "uniform"),
    "glorot_normal": _variance_scaling(1.0, "fan_avg", "normal"),
    "he_uniform": _variance_scaling(2.0, "fan_in", "uniform"),
    "he_normal": _variance_scaling(2.0, "fan_in", "normal"),
    "lecun_uniform": _variance_scaling(1.0, "fan_in", "uniform"),
    "lecun_normal": _variance_scaling(1.0, "fan_in", "normal"),
    "zeros": _constant(0.0),
    "ones": _constant(1.0),
}


# ----------------------------------------------------------------------------- layers
# Keras names and aliases, matched case-insensitively with underscores removed.
LAYER_ALIASES: dict[str, str] = {
    "conv2d": "Conv2D",
    "convolution2d": "Conv2D",
    "maxpooling2d": "MaxPooling2D",
    "maxpool2d": "MaxPooling2D",
    "averagepooling2d": "AveragePooling2D",
    "avgpool2d": "AveragePooling2D",
    "globalaveragepooling2d": "GlobalAveragePooling2D",
    "globalavgpool2d": "GlobalAveragePooling2D",
    "flatten": "Flatten",
    "dense": "Dense",
    "dropout": "Dropout",
    "batchnormalization": "BatchNormalization",
    "batchnorm": "BatchNormalization",
    "activation": "Activation",
    "backbone": "Backbone",
}

# torchvision models whose feature extractor a Backbone layer can be (fcclass.model.backbones keeps what comes before
# their pooling and classifier), named as torchvision.models.get_model and pytorch/examples' ImageNet script name them.
# A plain list: loading a config must not import torchvision (tests/test_backbone.py checks each name exists there).
BACKBONES: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    *(f"efficientnet_b{i}" for i in range(8)), "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l",
    "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
    "densenet121", "densenet161", "densenet169", "densenet201",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
)


# ----------------------------------------------------------------------------- optimizers and schedulers
@dataclass(frozen=True)
class Choice:
    """A factory and the config keys it reads besides those every entry of its registry reads. The config refuses a
    key that the chosen entry does not read (optimizer.momentum with adam), so no key is silently ignored."""

    build: Callable[..., Any]
    keys: tuple[str, ...] = ()

    def __call__(self, *args: Any) -> Any:
        return self.build(*args)


OPTIMIZER_SHARED_KEYS = ("lr", "weight_decay")


def _optimizer(cls_name: str, **keys: str) -> Choice:
    """A torch.optim class; ``keys`` maps its config keys to torch's argument names (rho is RMSprop's alpha)."""

    def make(params: Any, cfg: Any) -> Any:
        import torch

        kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
        for key, arg in keys.items():
            value = getattr(cfg, key)
            if value is not None:  # eps: None keeps torch's default
                kwargs[arg] = tuple(value) if isinstance(value, list) else value
        if torch.cuda.is_available():
            kwargs.setdefault("foreach", True)
        return getattr(torch.optim, cls_name)(params, **kwargs)

    return Choice(make, tuple(keys))


OPTIMIZERS: dict[str, Choice] = {
    "sgd": _optimizer("SGD", momentum="momentum", nesterov="nesterov"),
    "adam": _optimizer("Adam", betas="betas", eps="eps"),
    "adamw": _optimizer("AdamW", betas="betas", eps="eps"),
    "rmsprop": _optimizer("RMSprop", momentum="momentum", rho="alpha", eps="eps"),
    "adadelta": _optimizer("Adadelta", rho="rho", eps="eps"),
}


# Each scheduler factory returns (scheduler or None, when it steps: "batch" | "epoch" | "plateau").
# `epochs` and `steps` count what is left after warm-up.
def _no_schedule(opt: Any, cfg: Any, epochs: int, steps: int) -> tuple[Any, str]:
    return None, "epoch"


def _step(opt: Any, cfg: Any, epochs: int, steps: int) -> tuple[Any, str]:
    from torch.optim import lr_scheduler

    return lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma), "epoch"


def _multistep(opt: Any, cfg: Any, epochs: int, steps: int) -> tuple[Any, str]:
    from torch.optim import lr_scheduler

    return lr_scheduler.MultiStepLR(opt, milestones=sorted(cfg.milestones), gamma=cfg.gamma), "epoch"


def _exponential(opt: Any, cfg: Any, epochs: int, steps: int) -> tuple[Any, str]:
    from torch.optim import lr_scheduler

    return lr_scheduler.ExponentialLR(opt, gamma=cfg.gamma), "epoch"


def _cosine(opt: Any, cfg: Any, epochs: int, steps: int) -> tuple[Any, str]:
    from torch.optim import lr_scheduler

    return lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps), eta_min=cfg.min_lr), "batch"


def _onecycle(opt: Any, cfg: Any, epochs: int, steps: int) -> tuple[Any, str]:
    from torch.optim import lr_scheduler

    max_lr = cfg.max_lr if cfg.max_lr is not None else opt.param_groups[0]["lr"]
    total = max(2, epochs * steps)
    pct_start = cfg.pct_start
    if math.isclose(pct_start * total, 1.0):
        # torch's warm-up phase would last 0 steps and divide by zero (e.g. 0.2 x 5 steps): make it 2 steps
        pct_start = min(2.0 / total, 0.9)
    return lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total, pct_start=pct_start), "batch"


def _plateau(opt: Any, cfg: Any, epochs: int, steps: int) -> tuple[Any, str]:
    from torch.optim import lr_scheduler

    mode = "min" if cfg.monitor == "val_loss" else "max"
    sched = lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=cfg.factor, patience=cfg.patience, min_lr=cfg.min_lr)
    return sched, "plateau"


SCHEDULER_SHARED_KEYS = ("warmup_epochs",)
SCHEDULERS: dict[str, Choice] = {
    "none": Choice(_no_schedule),
    "step": Choice(_step, ("step_size", "gamma")),
    "multistep": Choice(_multistep, ("milestones", "gamma")),
    "exponential": Choice(_exponential, ("gamma",)),
    "cosine": Choice(_cosine, ("min_lr",)),
    "onecycle": Choice(_onecycle, ("max_lr", "pct_start")),
    "plateau": Choice(_plateau, ("factor", "patience", "min_lr", "monitor")),
}


# ----------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class TorchvisionSet:
    """A torchvision dataset small enough to hold in memory as one uint8 tensor."""

    class_name: str  # in torchvision.datasets
    shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    debian_dir: str | None = None  # raw files installed by a Debian package, used when root has none
    debian_package: str | None = None


@dataclass(frozen=True)
class ImageFolderSet:
    """The user's own images: one sub-folder per class."""


@dataclass(frozen=True)
class ShardSet(ImageFolderSet):
    """A packed dataset (`fcclass data pack`): data.path is its folder or s3://bucket/prefix, data.version the version."""


DATASETS: dict[str, TorchvisionSet | ImageFolderSet] = {
    "fashion_mnist": TorchvisionSet(
        "FashionMNIST", (1, 28, 28), 10, "/usr/share/datasets/fashion-mnist", "dataset-fashion-mnist"
    ),
    "mnist": TorchvisionSet("MNIST", (1, 28, 28), 10),
    "kmnist": TorchvisionSet("KMNIST", (1, 28, 28), 10),
    "cifar10": TorchvisionSet("CIFAR10", (3, 32, 32), 10),
    "cifar100": TorchvisionSet("CIFAR100", (3, 32, 32), 100),
    "imagefolder": ImageFolderSet(),
    "shards": ShardSet(),
}
