"""fcclass: conv-pool-flatten-dense image classifiers from Keras-style YAML configs, on PyTorch.

Library use: ``from fcclass import load_config, build_model, fit, evaluate, predict``.
Everything is imported on first use (torch, pydantic), so ``import fcclass`` and ``fcclass --help`` stay instant.
"""

from __future__ import annotations

from typing import Any

from fcclass.errors import FcclassError

__version__ = "0.1.0"

_LAZY = {
    "Config": ("fcclass.config", "Config"),
    "load_config": ("fcclass.config", "load_config"),
    "build_model": ("fcclass.model", "build_model"),
    "fit": ("fcclass.train", "fit"),
    "evaluate": ("fcclass.evaluation", "evaluate"),
    "predict": ("fcclass.prediction", "predict"),
    "load_dataset": ("fcclass.data", "load_dataset"),
    "load_for_inference": ("fcclass.inference", "load_for_inference"),
    "Callback": ("fcclass.callbacks", "Callback"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'fcclass' has no attribute {name!r}")


__all__ = ["FcclassError", *_LAZY]
