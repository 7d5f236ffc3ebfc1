"""Layer builders: one function per layer type of ``fcclass.config.layers``, turning the layer's config and its input
shape into torch modules and an output shape (or a ModelError that names the layer when they don't fit).

The config side of a layer (its keys, Keras's names and defaults) lives in the config package, below this one, so that
loading a config never imports torch; adding a layer type is its config class there and its builder in BUILDERS here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fcclass.config.layers import (
    Activation,
    AveragePooling2D,
    Backbone,
    BatchNormalization,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAveragePooling2D,
    LayerBase,
    MaxPooling2D,
    Shape,
    _Pooling,
    _Weighted,
    fmt_shape,
)
from fcclass.config.registries import ACTIVATIONS, INITIALIZERS, MONOTONIC_ACTIVATIONS
from fcclass.errors import ModelError
from fcclass.model.backbones import backbone_block

BEFORE_FLATTEN = "; move it before Flatten/Dense layers"


@dataclass
class BuildContext:
    """What a builder needs to know besides its input shape; build_model makes one per layer."""

    where: str  # "model.layers[3] (Dense 'dense_1')": how errors name the layer
    num_classes: int
    last_dense: bool  # the last Dense layer gives one score per class
    final_softmax: bool  # a softmax here ends the model: predict_proba applies it, so the logits leave it out
    previous: LayerBase | None  # the layer before, in the config
    previous_block: nn.Module | None  # and its built block
    regularized: list[tuple[nn.Module, float, float]]  # collects (module, l1, l2) kernel penalties
    frozen_norms: list[nn.Module]  # collects norms that stay in inference mode while training


Built = tuple[list[nn.Module], Shape]


class DropoutModule(nn.Dropout):
    """nn.Dropout with a cheaper mask on the CPU: 16-bit random integers compared with a threshold instead of
    ``bernoulli_`` on floats, about twice as fast forward + backward. The drop probability is ``p`` rounded to
    1/32768, and kept values are scaled by 1 / (1 - that probability), so the expected output equals the input.
    Other devices use torch's fused dropout, and so does a rate within 1/65536 of 1, which rounds to dropping all
    (and scaling by 1/0). dropout() below makes it: swapping in nn.Dropout there is a one-line change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threshold = round(self.p * 32768)
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or threshold == 32768:
            return super().forward(x)
        keep = torch.empty_like(x, dtype=torch.int16).random_() >= threshold
        return x * keep.to(x.dtype).mul_(32768 / (32768 - threshold))


def build_layer(layer: LayerBase, shape: Shape, ctx: BuildContext) -> Built:
    """The torch modules of ``layer`` for input of ``shape`` and their output shape."""
    for cls in type(layer).__mro__:
        if cls in BUILDERS:
            return BUILDERS[cls](layer, shape, ctx)
    raise ModelError(f"{ctx.where}: fcclass has no builder for layer type {layer.type!r}.")  # a config class without one


def _weights(layer: _Weighted, module: nn.Module, ctx: BuildContext) -> nn.Module:
    """Keras's initialisation of the kernel and bias; the kernel's L1/L2 penalty, if any, joins the loss."""
    INITIALIZERS[layer.kernel_initializer](module.weight.data)
    if module.bias is not None:
        INITIALIZERS[layer.bias_initializer](module.bias.data)
    reg = layer.kernel_regularizer
    if reg is not None and (reg.l1 or reg.l2):
        ctx.regularized.append((module, reg.l1, reg.l2))
    return module


def _activation(name: str) -> list[nn.Module]:
    factory = ACTIVATIONS[name]
    return [factory()] if factory is not None else []


def _image(shape: Shape, ctx: BuildContext, fix: str = "") -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ModelError(f"{ctx.where} needs image input (channels, height, width) but gets {fmt_shape(shape)}{fix}.")
    return shape  # type: ignore[return-value]


def _same_padding(size: int, k: int, s: int) -> tuple[int, int]:
    """Keras 'same' padding: output ceil(size / s), the extra pixel (if any) on the bottom/right."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def conv2d(layer: Conv2D, shape: Shape, ctx: BuildContext) -> Built:
    cin, h, w = _image(shape, ctx, BEFORE_FLATTEN)
    (kh, kw), (sh, sw) = layer.kernel_size, layer.strides
    parts: list[nn.Module] = []
    if layer.padding == "same":
        (top, bottom), (left, right) = _same_padding(h, kh, sh), _same_padding(w, kw, sw)
        out = (math.ceil(h / sh), math.ceil(w / sw))
        if (top, left) != (bottom, right):  # uneven: torch's own padding is the same on both sides
            parts.append(nn.ZeroPad2d((left, right, top, bottom)))
            top = left = 0
    else:
        if kh > h or kw > w:
            raise ModelError(f"{ctx.where}: kernel {kh}x{kw} is larger than its input {h}x{w} (input shape {fmt_shape(shape)}); use padding: same, a smaller "
                             "kernel_size, or fewer pooling layers before it.")
        top = left = 0
        out = ((h - kh) // sh + 1, (w - kw) // sw + 1)
    conv = nn.Conv2d(cin, layer.filters, (kh, kw), (sh, sw), padding=(top, left), bias=layer.use_bias)
    return [*parts, _weights(layer, conv, ctx), *_activation(layer.activation)], (layer.filters, *out)


def pooling(layer: _Pooling, shape: Shape, ctx: BuildContext) -> Built:
    cin, h, w = _image(shape, ctx, BEFORE_FLATTEN)
    (ph, pw), (sh, sw) = layer.pool_size, layer.strides or layer.pool_size
    if ph > h or pw > w:
        raise ModelError(f"{ctx.where}: pool_size {ph}x{pw} is larger than its input {h}x{w} (input shape {fmt_shape(shape)}); remove a pooling layer or use "
                         "a larger image_size.")
    out = (cin, (h - ph) // sh + 1, (w - pw) // sw + 1)
    if isinstance(layer, MaxPooling2D):
        return [nn.MaxPool2d((ph, pw), (sh, sw)), *_activation_after_pool(ctx)], out
    return [nn.AvgPool2d((ph, pw), (sh, sw))], out


def _activation_after_pool(ctx: BuildContext) -> list[nn.Module]:
    """Conv2D(activation=f) then MaxPooling2D computes max(f(x)) = f(max(x)) for a non-decreasing f, so f moves after
    the pool and runs on a quarter of the values (forward and backward). Outputs and gradients are unchanged; the conv
    block stays a Sequential, so parameter names (and saved checkpoints) are the same either way."""
    if not (isinstance(ctx.previous, Conv2D) and ctx.previous.activation in MONOTONIC_ACTIVATIONS):
        return []
    conv_block = ctx.previous_block
    act = conv_block[-1]
    del conv_block[-1]
    return [act]


def global_average_pooling(layer: GlobalAveragePooling2D, shape: Shape, ctx: BuildContext) -> Built:
    channels = _image(shape, ctx)[0]
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)], (channels,)


def flatten_block(layer: Flatten, shape: Shape, ctx: BuildContext) -> Built:
    return [nn.Flatten(1)], (math.prod(shape),)


def dense(layer: Dense, shape: Shape, ctx: BuildContext) -> Built:
    if len(shape) != 1:
        raise ModelError(f"{ctx.where} gets input of shape {fmt_shape(shape)}, but Dense needs a flat vector; add a Flatten (or GlobalAveragePooling2D) layer "
                         "before it.")
    units = _units(layer, ctx)
    linear = _weights(layer, nn.Linear(shape[0], units, bias=layer.use_bias), ctx)
    activation = [] if ctx.final_softmax and layer.activation == "softmax" else _activation(layer.activation)
    return [linear, *activation], (units,)


def _units(layer: Dense, ctx: BuildContext) -> int:
    if ctx.last_dense:
        if layer.units is not None and layer.units != ctx.num_classes:
            raise ModelError(f"{ctx.where} is the last Dense layer, so it must have one unit per class: the data has {ctx.num_classes} classes but units is "
                             f"{layer.units}. Set units: {ctx.num_classes} or leave units out.")
        return ctx.num_classes
    if layer.units is None:
        raise ModelError(f"{ctx.where} needs 'units' (only the last Dense may leave it out, to get one unit per class).")
    return layer.units


def dropout(layer: Dropout, shape: Shape, ctx: BuildContext) -> Built:
    return [DropoutModule(layer.rate)], shape


def batch_normalization(layer: BatchNormalization, shape: Shape, ctx: BuildContext) -> Built:
    norm_cls = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
    norm = norm_cls(shape[0], eps=layer.epsilon, momentum=1.0 - layer.momentum)  # torch's momentum weighs the new value
    return [norm], shape  # trainable: false fixes its statistics too (network._freeze)


def activation(layer: Activation, shape: Shape, ctx: BuildContext) -> Built:
    return ([] if ctx.final_softmax and layer.activation == "softmax" else _activation(layer.activation)), shape


def backbone(layer: Backbone, shape: Shape, ctx: BuildContext) -> Built:
    block, out = backbone_block(layer, _image(shape, ctx, BEFORE_FLATTEN), ctx.where, first=ctx.previous is None)
    return [block], out


BUILDERS: dict[type[LayerBase], Callable[..., Built]] = {
    Conv2D: conv2d,
    MaxPooling2D: pooling,
    AveragePooling2D: pooling,
    GlobalAveragePooling2D: global_average_pooling,
    Flatten: flatten_block,
    Dense: dense,
    Dropout: dropout,
    BatchNormalization: batch_normalization,
    Activation: activation,
    Backbone: backbone,
}
