"""Backbone layers: a torchvision model's feature extractor (everything before its pooling and classifier) as one
layer, and its pretrained weights.

``backbone_block`` builds the layer with random weights: that is all ``build_model`` does, on any device (meta
included), so a run's checkpoint rebuilds it without the weights file. ``load_pretrained`` puts the named or local
weights into a new run's backbones, once, before training. A backbone that is the model's first layer and has
weights normalises its [0, 1] pixels with the weights' mean and std itself (buffers, so exports carry them), and the
data pipeline then leaves them as they are (``normalises_input``).
"""

from __future__ import annotations

import functools
import pickle
import re
import urllib.error
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcclass.config.layers import WEIGHT_NAME, Backbone, Shape, fmt_shape
from fcclass.config.sections import ModelConfig, NormalizeStats
from fcclass.errors import ConfigError, ModelError
from fcclass.files import shown

HEAD = ("avgpool", "fc", "classifier")  # the first of these children ends a torchvision model's feature extractor
# torchvision's DenseNet files keep the old names 'norm.1', 'conv.2' for what the model calls norm1, conv2
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def normalises_input(model_cfg: ModelConfig, normalize: Any = "auto") -> bool:
    """True when the model's first layer is a Backbone with weights: it normalises the pixels with its weights' mean
    and std, so the data pipeline must not (mean and std [] in the run). ``normalize`` (data.normalize) given as
    explicit statistics then is a mistake: the images would be normalised twice."""
    first = model_cfg.layers[0]
    normalises = isinstance(first, Backbone) and first.weights is not None
    if normalises and isinstance(normalize, NormalizeStats):
        raise ConfigError("data.normalize gives a mean and std, but the first layer (Backbone "
                          f"{first.arch}) normalises its input with its pretrained weights' own statistics. Remove "
                          "data.normalize (or set it to auto or none).")
    return normalises


def first_layer_stats(model: nn.Module) -> tuple[list[float], list[float]] | None:
    """The mean and std a model's first layer normalises its input with (a pretrained Backbone's), if it does."""
    body = getattr(model, "body", None)
    first = next(iter(body.children()), None) if isinstance(body, nn.Sequential) else None
    if isinstance(first, BackboneModule) and first.normalise:
        return [round(v, 6) for v in first.input_mean.flatten().tolist()], [round(v, 6) for v in first.input_std.flatten().tolist()]
    return None


class BackboneModule(nn.Module):
    """The feature extractor, with 1-channel images repeated to 3 channels and, when asked, the weights'
    normalisation before it."""

    def __init__(self, features: nn.Module, gray: bool, stats: tuple[list[float], list[float]] | None) -> None:
        super().__init__()
        self.features = features
        self.gray = gray
        self.normalise = stats is not None
        if stats is not None:
            self.register_buffer("input_mean", torch.tensor(stats[0]).view(1, -1, 1, 1))
            self.register_buffer("input_std", torch.tensor(stats[1]).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gray:
            x = x.expand(-1, 3, -1, -1)
        if self.normalise:
            x = (x - self.input_mean) / self.input_std
        return self.features(x)


def feature_extractor(arch: str) -> nn.Sequential:
    """torchvision's ``arch`` (random weights) up to its pooling/classifier; the children keep torchvision's names, so
    the keys of its state_dict are the model's own (conv1.weight, features.0.0.weight)."""
    from torchvision.models import get_model

    model = get_model(arch, weights=None)
    kept: OrderedDict[str, nn.Module] = OrderedDict()
    for name, child in model.named_children():
        if name in HEAD:
            break
        kept[name] = child
    if arch.startswith("densenet"):  # DenseNet's forward applies a ReLU after its features
        kept["relu"] = nn.ReLU(inplace=False)
    return nn.Sequential(kept)


def backbone_block(layer: Backbone, shape: tuple[int, int, int], where: str, first: bool) -> tuple[nn.Module, Shape]:
    """The layer's module (random weights) for images of ``shape`` and its output shape (channels, height, width).
    ``first``: the model's first layer, which normalises its input when the layer has weights."""
    channels, height, width = shape
    if channels not in (1, 3):
        raise ModelError(f"{where}: {layer.arch} takes 3-channel (RGB) images, or 1-channel ones it repeats to 3, but its "
                         f"input has {channels} channels (input shape {fmt_shape(shape)}). Set data.channels: 3.")
    stats = None
    if layer.weights is not None:
        weights = named_weights(layer.arch, "DEFAULT" if layer.weights_file else layer.weights, where)
        preset = weights.transforms()
        stats = (list(preset.mean), list(preset.std)) if first else None
    out = output_shape(layer.arch, height, width)
    if out is None or 0 in out:
        low = min_size(layer.arch)
        raise ModelError(f"{where}: {layer.arch} needs images of at least {low}x{low} pixels, but its input is {height}x{width} "
                         f"(its output would be empty). Set data.image_size: [{low}, {low}] or larger.")
    return BackboneModule(feature_extractor(layer.arch), channels == 1, stats), out


@functools.lru_cache(maxsize=256)
def output_shape(arch: str, height: int, width: int) -> Shape | None:
    """The feature extractor's output shape for 3 x height x width images, by a forward pass on the meta device (no
    memory, no arithmetic); None when the input is too small for it."""
    with torch.device("meta"):
        try:
            return tuple(int(s) for s in feature_extractor(arch).eval()(torch.empty(1, 3, height, width)).shape[1:])
        except (RuntimeError, ValueError):  # a pooling or convolution kernel larger than its (shrunk) input
            return None


def min_size(arch: str) -> int:
    """The smallest square image side ``arch`` gives a non-empty output for (a bisection over output_shape)."""
    low, high = 1, 1024
    while low < high:
        mid = (low + high) // 2
        out = output_shape(arch, mid, mid)
        low, high = (low, mid) if out is not None and 0 not in out else (mid + 1, high)
    return low


def named_weights(arch: str, name: str, where: str) -> Any:
    """torchvision's weights enum member ``name`` (DEFAULT included) for ``arch``, or a ModelError listing them."""
    from torchvision.models import get_model_weights

    members = get_model_weights(arch).__members__
    if name not in members:
        raise ModelError(f"{where}: torchvision has no weights {name!r} for {arch}; it has {', '.join(members)}. Or give a "
                         "file's path (weights: /path/to/file.pth), or weights: null for random ones.")
    return members[name]


# ----------------------------------------------------------------------------- pretrained weights
def load_pretrained(model: nn.Module, model_cfg: ModelConfig) -> list[str]:
    """Load every Backbone layer's weights (torchvision's, downloaded to its cache if needed, or a local file) into the
    built ``model``; one line per backbone for the training header. Call it once, for a new run: a checkpoint has
    the weights already."""
    notes = []
    for i, (layer, (name, block)) in enumerate(zip(model_cfg.layers, model.body.named_children())):
        if not isinstance(layer, Backbone) or layer.weights is None:
            continue
        where = f"model.layers[{i}] (Backbone '{name}')"
        if layer.weights_file is None:
            weights = named_weights(layer.arch, layer.weights, where)
            state, source = torchvision_state(weights, where), f"torchvision weights {weights.name} from {cached_file(weights)}"
        else:
            path = Path(layer.weights_file).expanduser()
            state, source = file_state(path, where), f"weights from {shown(path)}"
        fit_state(block.features, state, source, layer.arch, where)
        how = ("input normalised with the weights' mean/std" if block.normalise else
               "input not normalised by the backbone (it is not the first layer)")
        gray = "; 1-channel images repeated to 3 channels" if block.gray else ""
        frozen = "; frozen (trainable: false)" if not layer.trainable else ""
        notes.append(f"Backbone '{name}': {layer.arch}, {source}; {how}{gray}{frozen}")
    return notes


def cached_file(weights: Any) -> Path:
    """Where torchvision's download of ``weights`` is kept: torch.hub's cache (TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def torchvision_state(weights: Any, where: str) -> dict[str, Any]:
    """The state_dict of torchvision's ``weights``: from torch.hub's cache, downloaded there first if missing."""
    path = cached_file(weights)
    had = path.is_file()
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise ModelError(f"{where}: cannot download torchvision's {weights} ({reason}). Without internet access, download "
                         f"{weights.url} elsewhere and put the file {path.name} in {path.parent}/ (the cache, under "
                         f"TORCH_HOME), or give its path: weights: /path/to/{path.name}.") from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        what = f"the cached file {path} is damaged" if had else f"the download of {weights.url} failed"
        raise ModelError(f"{where}: {what} ({str(e).splitlines()[0][:160]}). Delete {path} and train again, or give a "
                         f"file's path: weights: /path/to/{path.name}.") from None


def file_state(path: Path, where: str) -> dict[str, Any]:
    """The state_dict in a local weights file: a torchvision model's state_dict (as torchvision's own .pth files are),
    or one inside {"state_dict": ...} or {"model": ...}; DDP's 'module.' prefix is dropped."""
    if not path.is_file():
        named = WEIGHT_NAME.fullmatch(path.name.upper()) and not path.exists() and "." not in path.name
        raise ModelError(f"{where}: weights file '{path}' " + ("is not a file." if path.exists() else "does not exist.")
                         + (f" Did you mean the torchvision weight name {path.name.upper()} (in capitals)?" if named else "")
                         + " Give the path of a .pth state_dict (a relative one is read from the folder fcclass runs in), a "
                         "torchvision weight name (DEFAULT), or null.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # torch refuses objects it does not know; other refusals are bytes no pickle
            raise ModelError(f"{where}: '{path}' is not a readable PyTorch weights file: it is damaged, truncated or of "
                             "another format. Give a file saved with torch.save(model.state_dict(), path).") from None
        raise ModelError(f"{where}: '{path}' holds Python objects, not only tensors, so fcclass does not load it (it could run "
                         "code). Save the weights alone: torch.save(model.state_dict(), path).") from None
    except Exception:  # noqa: BLE001 - torch.load on arbitrary bytes raises what its unpickler meets: KeyError, EOFError...
        raise ModelError(f"{where}: '{path}' is not a readable PyTorch weights file: it is damaged, truncated or of "
                         "another format. Give a file saved with torch.save(model.state_dict(), path).") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{where}: '{path}' holds no state_dict (a mapping from names to tensors). Save one with "
                         "torch.save(model.state_dict(), path).")
    return {k.removeprefix("module."): v for k, v in state.items()}


def fit_state(features: nn.Module, state: dict[str, Any], source: str, arch: str, where: str) -> None:
    """Copy the feature extractor's tensors from ``state`` (a whole torchvision model's state_dict: the classifier's
    keys are left out) into ``features``, or a ModelError that says which keys are missing, extra or of another shape."""
    state = {_OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    kept = {name for name, _ in features.named_children()}
    mine = features.state_dict()
    theirs = {k: v for k, v in state.items() if k.split(".", 1)[0] in kept}
    missing = [k for k in mine if k not in theirs and not k.endswith("num_batches_tracked")]
    extra = [k for k in theirs if k not in mine]
    shapes = [f"{k} {list(theirs[k].shape)} (model: {list(v.shape)})" for k, v in mine.items() if k in theirs and theirs[k].shape != v.shape]
    problems = [f"{len(found)} {what} (e.g. {', '.join(found[:2])})" for found, what in
                ((missing, "keys missing"), (extra, "unexpected keys"), (shapes, "tensors of another shape")) if found]
    if problems:
        raise ModelError(f"{where}: the {source} do not fit {arch}'s feature extractor: {'; '.join(problems)}. Give weights "
                         f"saved from a torchvision {arch} (torch.save(model.state_dict(), path)).")
    features.load_state_dict(theirs, strict=False)  # num_batches_tracked, absent from older files, stays as built
