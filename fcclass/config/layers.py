"""Layer types as config: one class each, with its keys (validated by pydantic, Keras's names and defaults).

Adding a layer type is one class here, its entry in LAYER_CLASSES, its aliases in registries.LAYER_ALIASES and its
builder in fcclass.model.layers.BUILDERS (which turns an input shape into torch modules). Nothing here imports torch:
loading a config (and `fcclass --help`) must not pay for it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, Union

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from fcclass.config.registries import ACTIVATIONS, BACKBONES, INITIALIZERS
from fcclass.config.schema import Size2, Strict

if TYPE_CHECKING:
    pass

Shape = tuple[int, ...]
ActivationName = Literal[tuple(ACTIVATIONS)]  # type: ignore[valid-type]
Initializer = Literal[tuple(INITIALIZERS)]  # type: ignore[valid-type]
BackboneArch = Literal[tuple(BACKBONES)]  # type: ignore[valid-type]


WEIGHT_NAME = re.compile(r"[A-Z][A-Z0-9_]*")  # a torchvision weight name (DEFAULT, IMAGENET1K_V1); anything else is a file


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


class _Weighted(LayerBase):
    """Keys shared by the layers with a kernel (Conv2D, Dense)."""

    activation: ActivationName = "linear"
    use_bias: bool = True
    kernel_initializer: Initializer = "glorot_uniform"
    bias_initializer: Initializer = "zeros"
    kernel_regularizer: Regularizer | None = None


# ----------------------------------------------------------------------------- layer types
class Conv2D(_Weighted):
    type: Literal["Conv2D"]
    filters: PositiveInt
    kernel_size: Size2
    strides: Size2 = [1, 1]
    padding: Literal["valid", "same"] = "valid"
    needs_image: ClassVar[bool] = True


class _Pooling(LayerBase):
    pool_size: Size2 = [2, 2]
    strides: Size2 | None = None  # Keras: defaults to pool_size
    padding: Literal["valid"] = "valid"
    needs_image: ClassVar[bool] = True


class MaxPooling2D(_Pooling):
    type: Literal["MaxPooling2D"]


class AveragePooling2D(_Pooling):
    type: Literal["AveragePooling2D"]


class GlobalAveragePooling2D(LayerBase):
    type: Literal["GlobalAveragePooling2D"]
    needs_image: ClassVar[bool] = True


class Flatten(LayerBase):
    type: Literal["Flatten"]


class Dense(_Weighted):
    type: Literal["Dense"]
    units: PositiveInt | None = None  # None on the last Dense: the number of classes


class Dropout(LayerBase):
    type: Literal["Dropout"]
    rate: float = Field(ge=0.0, lt=1.0)


class BatchNormalization(LayerBase):
    type: Literal["BatchNormalization"]
    momentum: float = Field(0.99, gt=0.0, lt=1.0)  # Keras meaning: weight of the old running value
    epsilon: PositiveFloat = 1e-3


class Activation(LayerBase):
    type: Literal["Activation"]
    activation: ActivationName


class Backbone(LayerBase):
    """A pretrained torchvision model's feature extractor (Keras's applications with include_top=False). ``weights``:
    a torchvision weight name (DEFAULT, IMAGENET1K_V1: capitals, digits and underscores), a path to a saved state_dict,
    or null for random weights."""

    type: Literal["Backbone"]
    arch: BackboneArch
    weights: Annotated[str, Field(min_length=1)] | None = "DEFAULT"
    needs_image: ClassVar[bool] = True

    @property
    def weights_file(self) -> str | None:
        """``weights`` when it names a file (anything but a torchvision weight name in capitals), else None."""
        return self.weights if self.weights is not None and not WEIGHT_NAME.fullmatch(self.weights) else None


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
    "Backbone": Backbone,
}

LayerSpec = Annotated[
    Union[tuple(LAYER_CLASSES.values())],  # type: ignore[valid-type]
    Field(discriminator="type"),
]
