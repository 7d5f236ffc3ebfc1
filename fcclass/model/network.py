"""Keras-style layer list -> torch module: the build loop over fcclass.model.layers, the Network, Keras-style summaries."""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fcclass.config import layers as L
from fcclass.config.layers import Shape, fmt_shape
from fcclass.config.sections import ModelConfig
from fcclass.errors import ModelError
from fcclass.model.layers import BuildContext, build_layer


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

    @property
    def layer_names(self) -> list[str]:
        return list(self.body._modules)

    def frozen_layers(self) -> list[str]:
        """The layers whose weights are all fixed (trainable: false, or frozen by init_from.freeze)."""
        return [name for name, block in self.body.named_children()
                if any(True for _ in block.parameters()) and not any(p.requires_grad for p in block.parameters())]

    def freeze(self, names: list[str]) -> None:
        """Fix the weights and normalisation statistics of the layers ``names``, as trainable: false does."""
        self._frozen_norms = [m for m in self._frozen_norms if any(m is n for n in self.modules())]  # still in the model
        for name in names:
            self._frozen_norms += [m for m in _freeze(self.body.get_submodule(name)) if m not in self._frozen_norms]
        self._count_trainable()
        self.train(self.training)

    def unfreeze(self) -> None:
        """Every layer trains from now on (train.unfreeze), its normalisation statistics included."""
        for p in self.parameters():
            p.requires_grad_(True)
        self._frozen_norms = []
        self._count_trainable()
        self.train(self.training)

    def _count_trainable(self) -> None:
        for info, block in zip(self.infos, self.body.children()):
            trainable = sum(p.numel() for p in block.parameters() if p.requires_grad)
            info.non_trainable_params += info.trainable_params - trainable
            info.trainable_params = trainable

    def summary(self) -> Summary:
        total = sum(li.params for li in self.infos)
        trainable = sum(li.trainable_params for li in self.infos)
        return Summary(self.input_shape, self.infos, total, trainable, total - trainable)


def build_model(model_cfg: ModelConfig, input_shape: Shape | list[int], num_classes: int, device: str | None = None) -> Network:
    """Build the network for inputs of ``input_shape`` (C, H, W or features) and ``num_classes`` outputs.

    Each layer is built by its builder (fcclass.model.layers); this loop names the blocks, freezes them and counts their parameters.
    Raises ModelError naming the layer when the shapes don't fit. ``device="meta"`` builds it without allocating
    any weights: shapes and parameter counts only (summaries, and memory plans before the real build).
    """
    if device is None:
        return _build(model_cfg, input_shape, num_classes)
    with torch.device(device):
        return _build(model_cfg, input_shape, num_classes)


def _build(model_cfg: ModelConfig, input_shape: Shape | list[int], num_classes: int) -> Network:
    layers = model_cfg.layers
    shape, flatten_input = _network_input(layers, input_shape)
    dense = [i for i, layer in enumerate(layers) if isinstance(layer, L.Dense)]
    if not dense:
        raise ModelError("The model needs at least one Dense layer: the last Dense produces one output per class.")
    # A softmax at the very end is applied at inference; training uses logits with cross-entropy.
    ends_in_softmax = isinstance(layers[-1], L.Activation) and layers[-1].activation == "softmax"
    logits_at = len(layers) - 1 - ends_in_softmax

    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    infos: list[LayerInfo] = []
    regularized: list[tuple[nn.Module, float, float]] = []
    frozen_norms: list[nn.Module] = []
    for i, (layer, name) in enumerate(zip(layers, layer_names(layers))):
        ctx = BuildContext(
            where=f"model.layers[{i}] ({layer.type} '{name}')",
            num_classes=num_classes,
            last_dense=i == dense[-1],
            final_softmax=(ends_in_softmax and i == len(layers) - 1) or i == logits_at == dense[-1],
            previous=layers[i - 1] if i else None,
            previous_block=next(reversed(blocks.values()), None),
            regularized=regularized,
            frozen_norms=frozen_norms,
        )
        try:
            parts, shape = build_layer(layer, shape, ctx)
        except (RuntimeError, OverflowError, TypeError, ValueError) as e:  # sizes past what a tensor can index
            raise ModelError(f"{ctx.where} is too large to build ({str(e).splitlines()[0][:120]}); make it smaller.") from None
        block = parts[0] if len(parts) == 1 else nn.Sequential(*parts)
        if not layer.trainable:
            frozen_norms.extend(_freeze(block))
        blocks[name] = block
        infos.append(_layer_info(name, layer.type, shape, block, layer.trainable))

    if shape != (num_classes,):
        raise ModelError(
            f"The model's output shape is {fmt_shape(shape)}, but it must be ({num_classes},): one score per class. "
            "End the layer list with a Dense layer (units left out) after Flatten."
        )
    return Network(blocks, infos, tuple(int(s) for s in input_shape), flatten_input, regularized, frozen_norms)


def _network_input(layers: list[L.LayerBase], input_shape: Shape | list[int]) -> tuple[Shape, bool]:
    """The shape the first layer sees, and whether the network flattens its input (an MLP over images)."""
    shape: Shape = tuple(int(s) for s in input_shape)
    needs_image = any(layer.needs_image for layer in layers)
    if needs_image and len(shape) != 3:
        raise ModelError(
            f"The model has convolution/pooling layers, which need image input [channels, height, width], "
            f"but the input shape is {list(input_shape)}. Set model.input_shape to e.g. [1, 28, 28] or remove it to use the data's shape."
        )
    flatten_input = not needs_image and len(shape) > 1
    return ((math.prod(shape),) if flatten_input else shape), flatten_input


def layer_names(layers: list[L.LayerBase]) -> list[str]:
    """Keras's names (conv2d, conv2d_1, max_pooling2d...) unless the config names the layer; they key the state_dict."""
    names: list[str] = []
    counters: dict[str, int] = {}
    for i, layer in enumerate(layers):
        name = layer.name
        if not name:
            base = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", layer.type).lower()
            n = counters.get(base, 0)
            counters[base] = n + 1
            name = base if n == 0 else f"{base}_{n}"
        if name in names or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            problem = "is used twice" if name in names else "must be letters, digits and underscores"
            raise ModelError(f"model.layers[{i}] ({layer.type}): the layer name '{name}' {problem}; give each layer a unique name.")
        names.append(name)
    return names


def _freeze(block: nn.Module) -> list[nn.Module]:
    """Fix ``block``'s weights (no gradient: the optimizer leaves them out) and return its normalisation layers, whose
    statistics must stay fixed too (Keras runs a frozen BatchNormalization in inference mode)."""
    for p in block.parameters():
        p.requires_grad_(False)
    return [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _layer_info(name: str, type_name: str, shape: Shape, block: nn.Module, trainable: bool) -> LayerInfo:
    params = sum(p.numel() for p in block.parameters())
    # Keras counts BatchNormalization's moving mean and variance as non-trainable parameters.
    stats = sum(b.numel() for n, b in block.named_buffers() if n.endswith(("running_mean", "running_var")))
    train_count = params if trainable else 0
    return LayerInfo(name, type_name, shape, params + stats, train_count, params + stats - train_count)


def model_summary(model_cfg: ModelConfig, input_shape: Shape | list[int], num_classes: int) -> Summary:
    return build_model(model_cfg, input_shape, num_classes).summary()

