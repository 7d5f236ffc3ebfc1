"""train.class_weight as one weight per label: balanced, or {label: weight} with labels named or, as in Keras, indexed."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

import torch

from fcclass.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from fcclass.data import DataInfo


def class_weights(spec: Any, info: "DataInfo") -> torch.Tensor | None:
    """train.class_weight as one float32 weight per label: balanced (n / (labels x count), from the training split),
    a {label: weight} mapping (1 for labels left out; a key is a label's name or, as in Keras, its index: see
    ``label_position``), or None."""
    if spec is None:
        return None
    names = info.class_names
    if spec == "balanced":
        counts = torch.tensor(info.train_counts, dtype=torch.float32)
        return counts.sum() / (len(names) * counts.clamp_min(1))
    weights, given, problems = [1.0] * len(names), {}, []
    for key, weight in spec.items():
        try:
            i = label_position(str(key), names)
        except DataError as e:
            problems.append(str(e))
            continue
        if i in given:
            problems.append(f"{given[i]!r} and {key!r} both name label {names[i]!r}; give its weight once")
        given[i], weights[i] = key, float(weight)
    if problems:
        raise DataError(f"train.class_weight: {'; '.join(problems)}.")
    return torch.tensor(weights)


def label_position(key: str, names: Sequence[str]) -> int:
    """Which label a train.class_weight key means: the label of that name; else, when no label is a number, the label
    at that index (Keras's class_weight is {index: weight}), so {0: 5.0} is Fashion-MNIST's T-shirt/top. When labels
    are numbers (folders 3 and 8), a number always names a label, never an index: {3: 5.0} is folder 3."""
    if key in names:
        return list(names).index(key)
    listed, last = ", ".join(names), len(names) - 1
    if re.fullmatch(r"[+-]?\d+", key.strip()):
        numbered = [n for n in names if re.fullmatch(r"[+-]?\d+", n.strip())]
        if numbered:
            raise DataError(f"{key!r} is not a label; the labels are {listed}, and as some of them are numbers "
                            f"({', '.join(numbered[:5])}), a number names a label by its name, never by index")
        if 0 <= int(key) <= last:
            return int(key)
        raise DataError(f"index {key} is out of range: label indices go from 0 to {last} "
                        f"({', '.join(f'{i}: {n}' for i, n in enumerate(names))})")
    raise DataError(f"unknown label {key!r}; the labels are {listed} (or their indices, 0 to {last})")
