"""Loading a config: the shipped configs, YAML files and ``--set`` overrides into a validated Config (with the errors
users see), back from a dict (a run's config.yaml or checkpoint), and flattened to dotted keys."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
)

from fcclass.config.errors import clip, format_validation_error
from fcclass.config.sections import Config, OptimizerConfig, SchedulerConfig
from fcclass.config.yaml_load import parse_yaml
from fcclass.errors import ConfigError

SHIPPED_CONFIGS = Path(__file__).parent.parent / "configs"  # package data: found wherever fcclass is installed


DEFAULT_CONFIG = SHIPPED_CONFIGS / "fashion_mnist.yaml"


# ----------------------------------------------------------------------------- loading
def shipped_configs() -> dict[str, Path]:
    """The example configs inside the package, by name without .yaml: {'fashion_mnist': Path(...), 'mlp': ...}."""
    return {p.stem: p for p in sorted(SHIPPED_CONFIGS.glob("*.yaml"))}


def resolve_config_path(path: str | Path | None) -> Path:
    """The config file to read. None: the shipped fashion_mnist.yaml. An existing file: itself. Otherwise a shipped
    config that ``path`` names (``mlp``, ``mlp.yaml``, ``configs/mlp.yaml``), so that the names the docs use work
    from any folder once fcclass is installed; a file of that name in the current folder still comes first."""
    if path is None:
        return DEFAULT_CONFIG
    path = Path(path)
    shipped = shipped_configs()
    names = f"{', '.join(shipped)} (e.g. -c {DEFAULT_CONFIG.stem})"
    if path.is_dir():
        raise ConfigError(f"'{path}' is a folder; pass a YAML config file with -c/--config, or a shipped config by name: {names}.")
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"'{path}' is not a regular file (a pipe or device?); pass a YAML config file with -c/--config.")
    if not path.suffix and path.with_suffix(".yaml").is_file():  # -c fashion_mnist finds the copy `fcclass init` wrote
        return path.with_suffix(".yaml")
    name = path.name.removesuffix(".yaml")
    if path.parent in (Path("."), Path("configs")) and name in shipped:
        return shipped[name]
    raise ConfigError(
        f"Config file '{path}' not found. Check the path, or pass a shipped config by name: {names}; "
        "`fcclass init` writes an editable copy of one."
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (a file or a shipped config's name, see resolve_config_path; None: the shipped
    fashion_mnist.yaml), apply ``key=value`` overrides, validate."""
    path = resolve_config_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"Cannot read config file '{path}': {e}.") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections (name, data, model, ...), not a {type(raw).__name__}.")
    return config_from_dict(raw, source=str(path), overrides=overrides)


def config_from_dict(
    raw: dict[str, Any], source: str = "config", *, stored: bool = False, overrides: list[str] | None = None
) -> Config:
    """Validate a config mapping (left unchanged), after applying ``overrides`` (``--set`` items).

    ``stored``: the mapping was written by fcclass into a run directory or checkpoint, perhaps by an earlier version,
    which recorded every optimizer and scheduler key whatever the name (momentum: 0.0 under adam). Keys that the
    chosen name does not read are then dropped instead of refused; the overrides apply after that, so a key the user
    sets is never dropped.
    """
    raw = copy.deepcopy(raw)
    if stored:
        for section in (OptimizerConfig, SchedulerConfig):
            if isinstance(raw.get(section.section), dict):
                raw[section.section] = section.drop_keys_not_read(raw[section.section])
    set_at = {}
    for item in [None, *(overrides or [])]:  # a key set twice: the last --set counts
        if item is not None:
            set_at[apply_override(raw, item)] = clip(item)
        model = raw.get("model")
        if isinstance(model, dict) and isinstance(model.get("init_from"), str):  # the short form, so --set reaches its keys
            model["init_from"] = {"path": model["init_from"]}
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, Config, set_at)) from None


def apply_override(raw: dict[str, Any], item: str) -> tuple[str | int, ...]:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML (``3``, ``0.01``, ``[1, 28, 28]``).

    Returns where it wrote, list indexes as ints (``('model', 'layers', 0, 'units')``), for error messages."""
    key, sep, value_text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set '{clip(item)}' must look like dotted.key=value, e.g. --set train.epochs=3.")
    value = parse_yaml(value_text, f"--set {clip(item)}")
    if len(key) > 200:
        raise ConfigError(f"--set key '{clip(key)}' is {len(key):,} characters long; config keys are short dotted names like train.epochs.")
    parts = key.split(".")
    node: Any = raw
    loc: list[str | int] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        loc.append(part)
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise ConfigError(f"--set {key}: '{where}' indexes a list of {len(node)} items; use an index from 0 to {len(node) - 1}.")
            loc[-1] = int(part) % len(node)
            if last:
                node[loc[-1]] = value
            else:
                node = node[loc[-1]]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"--set {key}: '{'.'.join(parts[:i])}' is a value, not a section, so it has no key '{part}'.")
    return tuple(loc)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: {'optimizer.lr': 0.001, 'model.layers.0.filters': 24, ...}."""
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, v in items:
        out.update(flatten(v, f"{prefix}.{key}" if prefix else key))
    return out
