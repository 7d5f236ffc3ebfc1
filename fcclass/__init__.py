"""fcclass: conv-pool-flatten-dense image classifiers from Keras-style YAML configs, on PyTorch.

Library use: ``from fcclass import load_config, build_model, fit, evaluate, predict``.
Everything is imported on first use (torch, pydantic), so ``import fcclass`` and ``fcclass --help`` stay instant.
"""

from __future__ import annotations

from typing import Any

from fcclass.errors import FcclassError
from fcclass.version import __version__

_LAZY = {
    "Config": ("fcclass.config.sections", "Config"),
    "load_config": ("fcclass.config.load", "load_config"),
    "build_model": ("fcclass.model.network", "build_model"),
    "fit": ("fcclass.training.fit", "fit"),
    "evaluate": ("fcclass.inference.evaluate", "evaluate"),
    "predict": ("fcclass.inference.predict", "predict"),
    "load_dataset": ("fcclass.data", "load_dataset"),
    "load_for_inference": ("fcclass.inference.load", "load_for_inference"),
    "Callback": ("fcclass.training.callbacks", "Callback"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'fcclass' has no attribute {name!r}")


__all__ = ["FcclassError", "__version__", *_LAZY]
