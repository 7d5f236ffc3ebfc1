"""Weights from another model (``model.init_from``): which of this model's layers take which source layer's tensors.

Layers are matched by name, then, for a layer whose name is a default one (conv2d, dense_1...) and that the source has
no layer of that name for, by position (the source layer at the same index, of the same type, default-named too). A
matched layer is loaded only when every one of its tensors has the source's shape; the classifier (the last Dense) is
loaded only when the source was trained on the same labels, in the same order. Reading the source checkpoint is the
caller's (fcclass.training.transfer): this module sees tensors and layer lists only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fcclass.config import layers as L
from fcclass.config.layers import fmt_shape
from fcclass.config.sections import InitFromConfig
from fcclass.errors import ModelError
from fcclass.model.network import Network, layer_names

LOADED, SKIPPED, NEW = "loaded", "skipped", "new"


@dataclass
class LayerTransfer:
    """What became of one layer with weights: loaded from ``source``, skipped (the shapes differ) or new."""

    name: str
    type: str
    params: int
    status: str  # LOADED | SKIPPED | NEW
    source: str | None = None  # the source layer's name
    why: str = ""  # for skipped and new layers: the reason, e.g. "shape differs: weight (256, 2352) vs (256, 1568)"


@dataclass
class Transfer:
    layers: list[LayerTransfer] = field(default_factory=list)

    def named(self, status: str) -> list[str]:
        return [t.name for t in self.layers if t.status == status]


@dataclass
class SourceModel:
    """The source's layer list (as configured), its weights (the body's state_dict keys) and its labels."""

    layers: list[L.LayerBase]
    state: dict[str, torch.Tensor]
    class_names: list[str]


def _tensors(state: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    prefix = f"body.{name}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _last_dense(layers: list[L.LayerBase], names: list[str]) -> str | None:
    return next((n for layer, n in zip(reversed(layers), reversed(names)) if isinstance(layer, L.Dense)), None)


def _match(i: int, layer: L.LayerBase, name: str, source: SourceModel, src_names: list[str]) -> int | None:
    """The index of the source layer that ``layer`` (index ``i``, named ``name``) takes its weights from, if any."""
    if name in src_names:
        return src_names.index(name)
    if layer.name is None and i < len(source.layers):
        other = source.layers[i]
        if other.name is None and type(other) is type(layer):
            return i
    return None


def _fit(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The source tensors under this layer's keys, in order, or None and why they do not fit. By position, not by key:
    a layer's block holds its activation (Conv2D with relu is a Sequential, keys 0.weight...) or its padding only
    when configured, and a source with another activation still has the same weights."""
    kinds = [key.rsplit(".", 1)[-1] for key in mine], [key.rsplit(".", 1)[-1] for key in theirs]
    if kinds[0] != kinds[1]:
        return None, f"other tensors ({', '.join(kinds[1][:5]) or 'none'} in the source, {', '.join(kinds[0][:5])} here)"
    for (key, t), other in zip(mine.items(), theirs.values()):
        if tuple(t.shape) != tuple(other.shape):
            return None, (f"shape differs: {key.rsplit('.', 1)[-1]} {fmt_shape(tuple(other.shape))} in the source, "
                          f"{fmt_shape(tuple(t.shape))} here")
    return dict(zip(mine, theirs.values())), ""


def plan_transfer(model: Network, layers: list[L.LayerBase], class_names: list[str], source: SourceModel,
                  spec: InitFromConfig) -> tuple[Transfer, dict[str, dict[str, torch.Tensor]]]:
    """Which layers of ``model`` (built from ``layers``) load which source tensors; nothing is loaded yet."""
    names, src_names = model.layer_names, layer_names(source.layers)
    _check_names(spec, model)
    same_labels = list(class_names) == list(source.class_names)
    src_head = _last_dense(source.layers, src_names)
    transfer, loads = Transfer(), {}
    params = {li.name: li.params for li in model.summary().layers}  # Keras's counts, as `fcclass summary` shows them
    for i, (layer, name) in enumerate(zip(layers, names)):
        mine = model.body.get_submodule(name).state_dict()
        if not mine:
            continue  # pooling, flatten, dropout...: nothing to load
        entry = LayerTransfer(name, layer.type, params[name], NEW)
        transfer.layers.append(entry)
        j = _match(i, layer, name, source, src_names)
        if spec.layers is not None and name not in spec.layers:
            entry.why = "not in init_from.layers"
        elif name in spec.exclude:
            entry.why = "in init_from.exclude"
        elif j is None:
            entry.why = "no layer of that name in the source"
        elif src_names[j] == src_head and not same_labels:
            entry.source, entry.why = src_names[j], "the source's classifier, trained on other labels"
        else:
            tensors, problem = _fit(mine, _tensors(source.state, src_names[j]))
            entry.source = src_names[j]
            if tensors is None:
                entry.status, entry.why = SKIPPED, problem
            else:
                entry.status = LOADED
                loads[name] = tensors
    return transfer, loads


def _check_names(spec: InitFromConfig, model: Network) -> None:
    names = model.layer_names
    weighted = [n for n in names if model.body.get_submodule(n).state_dict()]
    for key, wanted in (("layers", spec.layers or []), ("exclude", spec.exclude)):
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise ModelError(f"model.init_from.{key} names {', '.join(repr(n) for n in unknown[:5])}, which "
                             f"{'is not a layer' if len(unknown) == 1 else 'are not layers'} of this model; its layers are "
                             f"{', '.join(names)} (`fcclass summary` lists them).")
        empty = [n for n in wanted if n not in weighted]
        if empty:
            raise ModelError(f"model.init_from.{key} names {', '.join(repr(n) for n in empty[:5])}, which "
                             f"{'has' if len(empty) == 1 else 'have'} no weights to load; the layers with weights are "
                             f"{', '.join(weighted)}.")
    both = [n for n in spec.layers or [] if n in spec.exclude]
    if both:
        raise ModelError(f"model.init_from names {', '.join(repr(n) for n in both[:5])} in both layers (load) and exclude "
                         "(do not load); keep each in one of them.")


def load_transfer(model: Network, loads: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy the planned tensors into ``model`` (its layout, e.g. channels-last, is kept)."""
    with torch.no_grad():
        for name, tensors in loads.items():
            model.body.get_submodule(name).load_state_dict(tensors)
