"""Layer types. Each is one class: its config keys (validated by pydantic, Keras's names and defaults) and its
builder, which turns an input shape into torch modules and an output shape.

Adding a layer type is one class here, its entry in LAYER_CLASSES and its aliases in registries.LAYER_ALIASES.
torch is imported inside the builders only: loading a config (and `fcclass --help`) must not pay for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, Union

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from fcclass.errors import ModelError
from fcclass.registries import ACTIVATIONS, INITIALIZERS, MONOTONIC_ACTIVATIONS
from fcclass.schema import Size2, Strict

if TYPE_CHECKING:
    from torch import nn

Shape = tuple[int, ...]
ActivationName = Literal[tuple(ACTIVATIONS)]  # type: ignore[valid-type]
Initializer = Literal[tuple(INITIALIZERS)]  # type: ignore[valid-type]


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


def fmt_shape(shape: Shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


# ----------------------------------------------------------------------------- shared pieces
class Regularizer(Strict):
    l1: NonNegativeFloat = 0.0
    l2: NonNegativeFloat = 0.0


class LayerBase(Strict):
    type: str  # each layer type narrows it to its own Literal, which pydantic uses to pick the class
    name: str | None = None
    trainable: bool = True
    needs_image: ClassVar[bool] = False  # True: the model keeps its input as (channels, height, width)

    def build(self, shape: Shape, ctx: BuildContext) -> tuple[list[nn.Module], Shape]:
        """The torch modules for input of ``shape`` and their output shape; ModelError naming ctx.where when they don't fit."""
        raise NotImplementedError


class _Weighted(LayerBase):
    """Keys shared by the layers with a kernel (Conv2D, Dense)."""

    activation: ActivationName = "linear"
    use_bias: bool = True
    kernel_initializer: Initializer = "glorot_uniform"
    bias_initializer: Initializer = "zeros"
    kernel_regularizer: Regularizer | None = None

    def _weights(self, module: nn.Module, ctx: BuildContext) -> nn.Module:
        """Keras's initialisation of the kernel and bias; the kernel's L1/L2 penalty, if any, joins the loss."""
        INITIALIZERS[self.kernel_initializer](module.weight.data)
        if module.bias is not None:
            INITIALIZERS[self.bias_initializer](module.bias.data)
        reg = self.kernel_regularizer
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


BEFORE_FLATTEN = "; move it before Flatten/Dense layers"


def _same_padding(size: int, k: int, s: int) -> tuple[int, int]:
    """Keras 'same' padding: output ceil(size / s), the extra pixel (if any) on the bottom/right."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


# ----------------------------------------------------------------------------- layer types
class Conv2D(_Weighted):
    type: Literal["Conv2D"]
    filters: PositiveInt
    kernel_size: Size2
    strides: Size2 = [1, 1]
    padding: Literal["valid", "same"] = "valid"
    needs_image: ClassVar[bool] = True

    def build(self, shape: Shape, ctx: BuildContext) -> tuple[list[nn.Module], Shape]:
        from torch import nn

        cin, h, w = _image(shape, ctx, BEFORE_FLATTEN)
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        parts: list[nn.Module] = []
        if self.padding == "same":
            (top, bottom), (left, right) = _same_padding(h, kh, sh), _same_padding(w, kw, sw)
            out = (math.ceil(h / sh), math.ceil(w / sw))
            if (top, left) != (bottom, right):  # uneven: torch's own padding is the same on both sides
                parts.append(nn.ZeroPad2d((left, right, top, bottom)))
                top = left = 0
        else:
            if kh > h or kw > w:
                raise ModelError(f"{ctx.where}: kernel {kh}x{kw} is larger than its input {h}x{w} (input shape {fmt_shape(shape)}); use padding: same, a smaller kernel_size, or fewer pooling layers before it.")
            top = left = 0
            out = ((h - kh) // sh + 1, (w - kw) // sw + 1)
        conv = nn.Conv2d(cin, self.filters, (kh, kw), (sh, sw), padding=(top, left), bias=self.use_bias)
        return [*parts, self._weights(conv, ctx), *_activation(self.activation)], (self.filters, *out)


class _Pooling(LayerBase):
    pool_size: Size2 = [2, 2]
    strides: Size2 | None = None  # Keras: defaults to pool_size
    padding: Literal["valid"] = "valid"
    needs_image: ClassVar[bool] = True

    def _module(self, size: tuple[int, int], strides: tuple[int, int]) -> nn.Module:
        raise NotImplementedError

    def build(self, shape: Shape, ctx: BuildContext) -> tuple[list[nn.Module], Shape]:
        cin, h, w = _image(shape, ctx, BEFORE_FLATTEN)
        (ph, pw), (sh, sw) = self.pool_size, self.strides or self.pool_size
        if ph > h or pw > w:
            raise ModelError(f"{ctx.where}: pool_size {ph}x{pw} is larger than its input {h}x{w} (input shape {fmt_shape(shape)}); remove a pooling layer or use a larger image_size.")
        return [self._module((ph, pw), (sh, sw))], (cin, (h - ph) // sh + 1, (w - pw) // sw + 1)


class MaxPooling2D(_Pooling):
    type: Literal["MaxPooling2D"]

    def _module(self, size: tuple[int, int], strides: tuple[int, int]) -> nn.Module:
        from torch import nn

        return nn.MaxPool2d(size, strides)

    def build(self, shape: Shape, ctx: BuildContext) -> tuple[list[nn.Module], Shape]:
        parts, out = super().build(shape, ctx)
        return parts + _activation_after_pool(ctx), out


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


class AveragePooling2D(_Pooling):
    type: Literal["AveragePooling2D"]

    def _module(self, size: tuple[int, int], strides: tuple[int, int]) -> nn.Module:
        from torch import nn

        return nn.AvgPool2d(size, strides)


class GlobalAveragePooling2D(LayerBase):
    type: Literal["GlobalAveragePooling2D"]
    needs_image: ClassVar[bool] = True

    def build(self, shape: Shape, ctx: BuildContext) -> tuple[list[nn.Module], Shape]:
        from torch import nn

        channels = _image(shape, ctx)[0]
        return [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)], (channels,)


class Flatten(LayerBase):
    type: Literal["Flatten"]

    def build(self, shape: Shape, ctx: BuildContext) -> tuple[list[nn.Module], Shape]:
        from torch import nn

        return [nn.Flatten(1)], (math.prod(shape),)


class Dense(_Weighted):
    type: Literal["Dense"]
    units: PositiveInt | None = None  # None on the last Dense: the number of classes

    def build(self, shape: Shape, ctx: BuildContext) -> tuple[list[nn.Module], Shape]:
        from torch import nn

        if len(shape) != 1:
            raise ModelError(f"{ctx.where} gets input of shape {fmt_shape(shape)}, but Dense needs a flat vector; add a Flatten (or GlobalAveragePooling2D) layer before it.")
        units = self._units(ctx)
        linear = self._weights(nn.Linear(shape[0], units, bias=self.use_bias), ctx)
        activation = [] if ctx.final_softmax and self.activation == "softmax" else _activation(self.activation)
        return [linear, *activation], (units,)

    def _units(self, ctx: BuildContext) -> int:
        if ctx.last_dense:
            if self.units is not None and self.units != ctx.num_classes:
                raise ModelError(f"{ctx.where} is the last Dense layer, so it must have one unit per class: the data has {ctx.num_classes} classes but units is {self.units}. Set units: {ctx.num_classes} or leave units out.")
            return ctx.num_classes
        if self.units is None:
            raise ModelError(f"{ctx.where} needs 'units' (only the last Dense may leave it out, to get one unit per class).")
        return self.units


class Dropout(LayerBase):
    type: Literal["Dropout"]
    rate: float = Field(ge=0.0, lt=1.0)

    def build(self, shape: Shape, ctx: BuildContext) -> tuple[list[nn.Module], Shape]:
        from fcclass.model import Dropout as DropoutModule

        return [DropoutModule(self.rate)], shape


class BatchNormalization(LayerBase):
    type: Literal["BatchNormalization"]
    momentum: float = Field(0.99, gt=0.0, lt=1.0)  # Keras meaning: weight of the old running value
    epsilon: PositiveFloat = 1e-3

    def build(self, shape: Shape, ctx: BuildContext) -> tuple[list[nn.Module], Shape]:
        from torch import nn

        norm_cls = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
        norm = norm_cls(shape[0], eps=self.epsilon, momentum=1.0 - self.momentum)  # torch's momentum weighs the new value
        if not self.trainable:
            ctx.frozen_norms.append(norm)
        return [norm], shape


class Activation(LayerBase):
    type: Literal["Activation"]
    activation: ActivationName

    def build(self, shape: Shape, ctx: BuildContext) -> tuple[list[nn.Module], Shape]:
        return ([] if ctx.final_softmax and self.activation == "softmax" else _activation(self.activation)), shape


LAYER_CLASSES: dict[str, type[LayerBase]] = {
    "Conv2D": Conv2D,
    "MaxPooling2D": MaxPooling2D,
    "AveragePooling2D": AveragePooling2D,
    "GlobalAveragePooling2D": GlobalAveragePooling2D,
    "Flatten": Flatten,
    "Dense": Dense,
    "Dropout": Dropout,
    "BatchNormalization": BatchNormalization,
    "Activation": Activation,
}

LayerSpec = Annotated[
    Union[tuple(LAYER_CLASSES.values())],  # type: ignore[valid-type]
    Field(discriminator="type"),
]
