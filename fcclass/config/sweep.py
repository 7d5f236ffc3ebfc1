"""The `sweep:` section of a config and the search-space specs of `fcclass sweep --param KEY=SPEC` (pydantic and
the standard library only: reading a config must not import Optuna).

SPEC forms: ``0.1,0.01`` or a YAML list (categorical: every value; the grid sampler's grid), ``uniform(a,b)``,
``loguniform(a,b)``, ``int(a,b)`` (both ends included). KEY is a dotted key as for ``--set``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator

from fcclass.config.schema import Strict
from fcclass.config.yaml_load import parse_yaml
from fcclass.errors import ConfigError

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "hyperband")
METRICS = ("val_accuracy", "val_loss", "train_accuracy", "train_loss")
MAX_GRID = 100_000  # grid points at most: as many as trials may be (Optuna's grid sampler holds them all in memory)
_RANGE = re.compile(r"^\s*(uniform|loguniform|int)\s*\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)\s*$")


@dataclass(frozen=True)
class Param:
    key: str
    kind: Literal["choice", "uniform", "loguniform", "int"]
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0

    def candidates(self) -> list[Any]:
        """The values that must all make a valid config: every choice, or both ends of a range."""
        if self.kind == "choice":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "choice":
            return ", ".join(_yaml(v) for v in self.choices)
        return f"{self.kind}({_yaml(self.candidates()[0])}, {_yaml(self.candidates()[1])})"


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def parse_param(key: str, spec: Any) -> Param:
    """A search-space entry from the config (a list, or a string) or from --param (a string)."""
    if not is_utf8(key) or (isinstance(spec, str) and not is_utf8(spec)):
        raise ConfigError(f"sweep parameter {printable(key)}={printable(str(spec))}: not valid UTF-8 text (bytes from the "
                          "command line that no UTF-8 text has); write the key and values in UTF-8.")
    where = f"sweep parameter {key}"
    if not key or not re.fullmatch(r"[A-Za-z0-9_.\-]+", key):
        raise ConfigError(f"{where}: the key must be a dotted config key such as optimizer.lr or model.layers.3.units.")
    if isinstance(spec, list):
        values = spec
    elif isinstance(spec, str) and (m := _RANGE.match(spec)):
        kind, a, b = m.group(1), _number(m.group(2), where), _number(m.group(3), where)
        if kind == "int" and not (float(a).is_integer() and float(b).is_integer()):
            raise ConfigError(f"{where}: int(a,b) takes whole numbers, e.g. int(32,256).")
        if not a < b or (kind == "loguniform" and a <= 0):
            need = "0 < a < b" if kind == "loguniform" else "a < b"
            raise ConfigError(f"{where}: {kind}({a},{b}) needs {need}.")
        return Param(key, kind, low=float(a), high=float(b))  # type: ignore[arg-type]
    elif isinstance(spec, str) and re.match(r"^\s*\w+\s*\(", spec):
        raise ConfigError(f"{where}: '{spec}' is not a range this knows; use uniform(a,b), loguniform(a,b) or int(a,b).")
    elif isinstance(spec, str):
        values = [_value(part, where) for part in spec.split(",")]
    else:
        values = [spec]
    if not values or len({_yaml(v) for v in values}) != len(values):
        raise ConfigError(f"{where}: list each value once, e.g. 0.1,0.01.")
    return Param(key, "choice", choices=tuple(values))


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: '{text}' is not a number.") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}: the range ends must be finite numbers.")
    return value


def _value(text: str, where: str) -> Any:
    try:
        return parse_yaml(text.strip(), where)
    except ConfigError:
        raise ConfigError(f"{where}: '{text.strip()}' is not a valid YAML value.") from None


class SweepConfig(Strict):
    """The sweep: section; every key can also be given on the `fcclass sweep` command line, which wins."""

    params: dict[str, Any] = Field(default_factory=dict)  # KEY: SPEC (a list, or a string as for --param)
    trials: Annotated[int, Field(gt=0, le=100_000)] = 20
    sampler: Literal["grid", "random", "tpe"] = "tpe"
    pruner: Literal["none", "median", "hyperband"] = "median"
    metric: Literal["val_accuracy", "val_loss", "train_accuracy", "train_loss"] = "val_accuracy"
    seed: int = Field(0, ge=0, lt=2**63)
    storage: str | None = None  # an Optuna RDB URL (sqlite:///..., postgresql://...) or a journal file path
    study: str | None = None  # default: the config's name
    workers: int = Field(1, ge=1, le=64)
    oversubscribe: bool = False  # run more workers than cores
    heartbeat: int | None = Field(None, ge=1, le=86_400)  # seconds; None: the study's recorded interval, or 60

    @field_validator("study")
    @classmethod
    def _study_name(cls, v: str | None) -> str | None:
        if v is not None:
            check_study_name(v)
        return v

    @field_validator("params")
    @classmethod
    def _specs(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, spec in v.items():
            try:
                parse_param(str(key), spec)
            except ConfigError as e:
                raise ValueError(str(e).rstrip(".")) from None
        return v


def check_study_name(name: str) -> None:
    """A study's name names a folder (RUNS_DIR/sweep-NAME) too: a name, not a path. Raises ValueError."""
    shown = printable(name)
    if not is_utf8(name):
        raise ValueError(f"the study name '{shown}' is not valid UTF-8 text; give a name such as my-study")
    if not name or len(name) > 100:
        raise ValueError("the study name must be 1 to 100 characters long, e.g. my-study")
    if name in (".", "..") or any(c in "/\\" or not c.isprintable() for c in name):
        raise ValueError(f"the study name {shown!r} is not a plain name (no '/', '\\', control characters, '.' or '..'): it "
                         "also names the sweep's folder RUNS_DIR/sweep-NAME. Give a name such as my-study, and --sweep-dir to "
                         "put the sweep elsewhere")


def is_utf8(text: str) -> bool:
    """False for text with lone surrogates: bytes from the command line that are not UTF-8 (Python's surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """``text`` as a message can show it: bytes that are not UTF-8 as \\xff escapes."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")
