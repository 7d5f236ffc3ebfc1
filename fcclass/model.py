"""Keras-style layer list -> torch module: shape inference, build, Keras-compatible parameter counts."""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fcclass import config as C
from fcclass.errors import ModelError
from fcclass.registries import ACTIVATIONS, INITIALIZERS, MONOTONIC_ACTIVATIONS

Shape = tuple[int, ...]
SPATIAL = (C.Conv2D, C.MaxPooling2D, C.AveragePooling2D, C.GlobalAveragePooling2D)


@dataclass
class LayerInfo:
    name: str
    type: str
    output_shape: Shape
    params: int = 0
    trainable_params: int = 0
    non_trainable_params: int = 0


@dataclass
class Summary:
    input_shape: Shape
    layers: list[LayerInfo]
    total_params: int
    trainable_params: int
    non_trainable_params: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "layers": [
                {"name": li.name, "type": li.type, "output_shape": list(li.output_shape), "params": li.params}
                for li in self.layers
            ],
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.non_trainable_params,
        }


class Network(nn.Module):
    """A sequential classifier that returns logits; ``predict_proba`` applies the softmax."""

    def __init__(
        self,
        blocks: "OrderedDict[str, nn.Module]",
        infos: list[LayerInfo],
        input_shape: Shape,
        flatten_input: bool,
        regularized: list[tuple[nn.Module, float, float]],
        frozen_norms: list[nn.Module],
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(blocks)
        self.infos = infos
        self.input_shape = tuple(input_shape)
        self.flatten_input = flatten_input
        # Convolutions run measurably faster in channels-last layout (oneDNN on CPU, tensor cores on GPU).
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in self.body.modules())
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        self._regularized = regularized
        self._frozen_norms = frozen_norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten_input:
            x = x.flatten(1)
        elif self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.body(x)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x).float(), dim=1)

    def regularization_loss(self) -> torch.Tensor | None:
        """Keras's L1/L2 kernel penalties: l1 * sum|W| + l2 * sum W^2, added to the training loss."""
        total = None
        for module, l1, l2 in self._regularized:
            w = module.weight
            term = (l1 * w.abs().sum() if l1 else 0.0) + (l2 * w.square().sum() if l2 else 0.0)
            total = term if total is None else total + term
        return total

    def train(self, mode: bool = True) -> "Network":
        super().train(mode)
        for norm in self._frozen_norms:  # Keras: a frozen BatchNormalization runs in inference mode
            norm.eval()
        return self

    def summary(self) -> Summary:
        total = sum(li.params for li in self.infos)
        trainable = sum(li.trainable_params for li in self.infos)
        return Summary(self.input_shape, self.infos, total, trainable, total - trainable)


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper mask on the CPU: 16-bit random integers compared with a threshold instead of
    ``bernoulli_`` on floats, about twice as fast forward + backward. The drop probability is ``p`` rounded to
    1/32768, and kept values are scaled by 1 / (1 - that probability), so the expected output equals the input.
    Other devices use torch's fused dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        threshold = round(self.p * 32768)
        keep = torch.empty_like(x, dtype=torch.int16).random_() >= threshold
        return x * keep.to(x.dtype).mul_(32768 / (32768 - threshold))


def _pair(v: int | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _snake(type_name: str) -> str:
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", type_name).lower()


def _fmt(shape: Shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _same_padding(size: int, k: int, s: int) -> tuple[int, int]:
    """Keras 'same' padding: output ceil(size / s), the extra pixel (if any) on the bottom/right."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _init(module: nn.Module, kernel: str, bias: str) -> None:
    INITIALIZERS[kernel](module.weight.data)
    if module.bias is not None:
        INITIALIZERS[bias](module.bias.data)


def _add_regularizer(regularized: list[tuple[nn.Module, float, float]], module: nn.Module, spec: C.Regularizer | None) -> None:
    if spec is not None and (spec.l1 or spec.l2):
        regularized.append((module, spec.l1, spec.l2))


def _activation(name: str) -> nn.Module | None:
    factory = ACTIVATIONS[name]
    return factory() if factory is not None else None


def build_model(model_cfg: C.ModelConfig, input_shape: Shape | list[int], num_classes: int) -> Network:
    """Build the network for inputs of ``input_shape`` (C, H, W or features) and ``num_classes`` outputs.

    Raises ModelError naming the layer when the shapes don't fit.
    """
    layers = model_cfg.layers
    shape: Shape = tuple(int(s) for s in input_shape)
    has_spatial = any(isinstance(layer, SPATIAL) for layer in layers)
    flatten_input = not has_spatial and len(shape) > 1
    if flatten_input:
        shape = (math.prod(shape),)
    if has_spatial and len(shape) != 3:
        raise ModelError(
            f"The model has convolution/pooling layers, which need image input [channels, height, width], "
            f"but the input shape is {list(input_shape)}. Set model.input_shape to e.g. [1, 28, 28] or remove it to use the data's shape."
        )
    dense_idx = [i for i, layer in enumerate(layers) if isinstance(layer, C.Dense)]
    if not dense_idx:
        raise ModelError("The model needs at least one Dense layer: the last Dense produces one output per class.")
    last_dense = dense_idx[-1]
    # A softmax at the very end is applied at inference; training uses logits with cross-entropy.
    final_softmax_skip = len(layers) - 1 if isinstance(layers[-1], C.Activation_) and layers[-1].activation == "softmax" else None

    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    infos: list[LayerInfo] = []
    regularized: list[tuple[nn.Module, float, float]] = []
    frozen_norms: list[nn.Module] = []
    counters: dict[str, int] = {}
    for i, layer in enumerate(layers):
        type_name = layer.type
        base = _snake(type_name)
        if layer.name:
            name = layer.name
        else:
            n = counters.get(base, 0)
            counters[base] = n + 1
            name = base if n == 0 else f"{base}_{n}"
        if name in blocks or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            problem = "is used twice" if name in blocks else "must be letters, digits and underscores"
            raise ModelError(f"model.layers[{i}] ({type_name}): the layer name '{name}' {problem}; give each layer a unique name.")
        where = f"model.layers[{i}] ({type_name} '{name}')"
        parts: list[nn.Module] = []
        is_last_layer = i == len(layers) - 1

        if isinstance(layer, C.Conv2D):
            if len(shape) != 3:
                raise ModelError(f"{where} needs image input (channels, height, width) but gets {_fmt(shape)}; move it before Flatten/Dense layers.")
            cin, h, w = shape
            (kh, kw), (sh, sw) = _pair(layer.kernel_size), _pair(layer.strides)
            if layer.padding == "same":
                top, bottom = _same_padding(h, kh, sh)
                left, right = _same_padding(w, kw, sw)
                oh, ow = math.ceil(h / sh), math.ceil(w / sw)
                if (top, left) == (bottom, right):
                    conv = nn.Conv2d(cin, layer.filters, (kh, kw), (sh, sw), padding=(top, left), bias=layer.use_bias)
                else:
                    parts.append(nn.ZeroPad2d((left, right, top, bottom)))
                    conv = nn.Conv2d(cin, layer.filters, (kh, kw), (sh, sw), bias=layer.use_bias)
            else:
                if kh > h or kw > w:
                    raise ModelError(f"{where}: kernel {kh}x{kw} is larger than its input {h}x{w} (input shape {_fmt(shape)}); use padding: same, a smaller kernel_size, or fewer pooling layers before it.")
                oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
                conv = nn.Conv2d(cin, layer.filters, (kh, kw), (sh, sw), bias=layer.use_bias)
            _init(conv, layer.kernel_initializer, layer.bias_initializer)
            parts.append(conv)
            _add_regularizer(regularized, conv, layer.kernel_regularizer)
            act = _activation(layer.activation)
            if act is not None:
                parts.append(act)
            shape = (layer.filters, oh, ow)

        elif isinstance(layer, (C.MaxPooling2D, C.AveragePooling2D)):
            if len(shape) != 3:
                raise ModelError(f"{where} needs image input (channels, height, width) but gets {_fmt(shape)}; move it before Flatten/Dense layers.")
            cin, h, w = shape
            (ph, pw) = _pair(layer.pool_size)
            (sh, sw) = _pair(layer.strides) if layer.strides is not None else (ph, pw)
            if ph > h or pw > w:
                raise ModelError(f"{where}: pool_size {ph}x{pw} is larger than its input {h}x{w} (input shape {_fmt(shape)}); remove a pooling layer or use a larger image_size.")
            pool_cls = nn.MaxPool2d if isinstance(layer, C.MaxPooling2D) else nn.AvgPool2d
            parts.append(pool_cls((ph, pw), (sh, sw)))
            if isinstance(layer, C.MaxPooling2D):
                moved = _activation_after_pool(layers[i - 1] if i else None, blocks)
                if moved is not None:
                    parts.append(moved)
            shape = (cin, (h - ph) // sh + 1, (w - pw) // sw + 1)

        elif isinstance(layer, C.GlobalAveragePooling2D):
            if len(shape) != 3:
                raise ModelError(f"{where} needs image input (channels, height, width) but gets {_fmt(shape)}.")
            parts += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
            shape = (shape[0],)

        elif isinstance(layer, C.Flatten):
            parts.append(nn.Flatten(1))
            shape = (math.prod(shape),)

        elif isinstance(layer, C.Dense):
            if len(shape) != 1:
                raise ModelError(f"{where} gets input of shape {_fmt(shape)}, but Dense needs a flat vector; add a Flatten (or GlobalAveragePooling2D) layer before it.")
            units = layer.units
            if i == last_dense:
                if units is None:
                    units = num_classes
                elif units != num_classes:
                    raise ModelError(f"{where} is the last Dense layer, so it must have one unit per class: the data has {num_classes} classes but units is {units}. Set units: {num_classes} or leave units out.")
            elif units is None:
                raise ModelError(f"{where} needs 'units' (only the last Dense may leave it out, to get one unit per class).")
            linear = nn.Linear(shape[0], units, bias=layer.use_bias)
            _init(linear, layer.kernel_initializer, layer.bias_initializer)
            parts.append(linear)
            _add_regularizer(regularized, linear, layer.kernel_regularizer)
            is_output = i == last_dense and (is_last_layer or i + 1 == final_softmax_skip)
            if not (is_output and layer.activation == "softmax"):
                act = _activation(layer.activation)
                if act is not None:
                    parts.append(act)
            shape = (units,)

        elif isinstance(layer, C.Dropout):
            parts.append(Dropout(layer.rate))

        elif isinstance(layer, C.BatchNormalization):
            norm_cls = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
            norm = norm_cls(shape[0], eps=layer.epsilon, momentum=1.0 - layer.momentum)
            parts.append(norm)
            if not layer.trainable:
                frozen_norms.append(norm)

        elif isinstance(layer, C.Activation_):
            if i != final_softmax_skip:
                act = _activation(layer.activation)
                if act is not None:
                    parts.append(act)
        else:  # pragma: no cover - the config's union and this chain are kept in step by a test
            raise ModelError(f"{where}: layer type {type_name} has no builder.")

        block = parts[0] if len(parts) == 1 else nn.Sequential(*parts)
        if not layer.trainable:
            for p in block.parameters():
                p.requires_grad_(False)
        blocks[name] = block
        infos.append(_layer_info(name, type_name, shape, block, layer.trainable))

    if shape != (num_classes,):
        raise ModelError(
            f"The model's output shape is {_fmt(shape)}, but it must be ({num_classes},): one score per class. "
            "End the layer list with a Dense layer (units left out) after Flatten."
        )
    return Network(blocks, infos, tuple(int(s) for s in input_shape), flatten_input, regularized, frozen_norms)


def _activation_after_pool(previous: C.LayerBase | None, blocks: "OrderedDict[str, nn.Module]") -> nn.Module | None:
    """Conv2D(activation=f) then MaxPooling2D computes max(f(x)) = f(max(x)) for a non-decreasing f, so f moves after
    the pool and runs on a quarter of the values (forward and backward). Outputs and gradients are unchanged; the conv
    block stays a Sequential, so parameter names (and saved checkpoints) are the same either way."""
    if not (isinstance(previous, C.Conv2D) and previous.activation in MONOTONIC_ACTIVATIONS):
        return None
    conv_block = next(reversed(blocks.values()))
    act = conv_block[-1]
    del conv_block[-1]
    return act


def _layer_info(name: str, type_name: str, shape: Shape, block: nn.Module, trainable: bool) -> LayerInfo:
    params = sum(p.numel() for p in block.parameters())
    # Keras counts BatchNormalization's moving mean and variance as non-trainable parameters.
    stats = sum(b.numel() for n, b in block.named_buffers() if n.endswith(("running_mean", "running_var")))
    train_count = params if trainable else 0
    return LayerInfo(name, type_name, shape, params + stats, train_count, params + stats - train_count)


def model_summary(model_cfg: C.ModelConfig, input_shape: Shape | list[int], num_classes: int) -> Summary:
    return build_model(model_cfg, input_shape, num_classes).summary()

