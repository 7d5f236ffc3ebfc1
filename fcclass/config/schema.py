"""Building blocks shared by the config sections and the layer configs (pydantic only, never torch).

They live here, not in config.py, so that layers.py can use them while config.py imports layers.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    # allow_inf_nan=False: .inf or .nan in any float field (lr, weight_decay...) is an error, not a run that diverges
    model_config = ConfigDict(extra="forbid", validate_assignment=True, defer_build=True, allow_inf_nan=False)


def _one_or_two(value: Any, handler: Callable[[Any], list[int]]) -> list[int]:
    """Accept ``3`` as ``[3, 3]``. A union of int and list would report one error per branch, under pydantic's
    branch labels instead of the key; validating one normalised list reports a single error at the key itself."""
    pair = value if isinstance(value, (list, tuple)) else [value, value]
    try:
        return handler(pair)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] in ("too_short", "too_long", "list_type"):
            raise PydanticCustomError("size2", "must be one positive integer or a list of two, e.g. 3 or [3, 2]") from None
        raise PydanticCustomError(first["type"], first["msg"]) from None


# kernel_size, strides, pool_size, image_size: an int n means [n, n] (Keras's convention); stored as [height, width].
Size2 = Annotated[list[PositiveInt], Field(min_length=2, max_length=2), WrapValidator(_one_or_two)]

