"""How config errors read: one line per problem under its dotted key (model.layers[0].strides), a did-you-mean
for unknown keys, and the --set override a problem comes from, if any."""

from __future__ import annotations

import difflib
import re
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from fcclass.config.layers import LAYER_CLASSES

SetAt = dict[tuple[str | int, ...], str]  # where a --set override wrote (list indexes as ints) -> the item
MAX_SHOWN = 25  # problems listed; the rest are counted


def clip(text: str, limit: int = 120) -> str:
    """Text from the user (a --set item, a key) as a message quotes it: cut to ``limit`` characters."""
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text):,} chars)"


def short(value: Any, limit: int = 80) -> str:
    """A value as an error message quotes it: its repr, cut to ``limit`` characters. A config can hold anything,
    a megabyte-long string or a list of a million items among them; a message must stay a line."""
    if isinstance(value, (list, tuple, dict)) and len(value) > limit:  # never build the repr of a huge container
        return f"<a {type(value).__name__} of {len(value):,} items>"
    return clip(repr(value), limit)


def format_validation_error(exc: ValidationError, source: str, root: type[BaseModel], set_at: SetAt | None = None) -> str:
    """'<source> has N errors:' then one '  - path: problem' line each. ``set_at`` maps where each --set override
    wrote to its item: a problem at, under or above such a key says so, since the file is not the place to fix it.
    So does a key that does not apply to the optimizer/scheduler name a --set chose. ``root``: the model validated."""
    lines, switched = [], set()
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        sets = _set_by(err, set_at or {})
        lines.append(_problem(err, loc, root) + (f" (from {', '.join(f'--set {item}' for item in sets)})" if sets else ""))
        if err["type"] == "not_applicable":
            switched |= {item for at, item in (set_at or {}).items() if at == (loc[0], "name")}
    lines = list(dict.fromkeys(lines))
    n = len(lines)
    where = f"{source} with --set overrides" if any(" (from --set " in line for line in lines) else source
    more = [f"and {n - MAX_SHOWN:,} more"] if n > MAX_SHOWN else []
    text = f"{where} has {n:,} error{'s' if n != 1 else ''}:\n" + "\n".join(f"  - {line}" for line in lines[:MAX_SHOWN] + more)
    for item in sorted(switched):  # the file's keys belong to the old name: replace the section, not just the name
        section, value = item.split(".", 1)[0], item.partition("=")[2]
        text += (f"\nTo switch {section} from the command line, replace the whole section: "
                 f"--set '{section}={{name: {value}}}' (with any of its keys inside the braces).")
    return text


def _set_by(err: Any, set_at: SetAt) -> list[str]:
    """The --set items an error comes from: they wrote its key, a section around it or a value inside it, or, for a
    key that does not apply, chose its section's name."""
    key = _key_path(tuple(err["loc"]))
    keys = [key, key[:-1] + ("name",)] if err["type"] == "not_applicable" else [key]
    if len(key) >= 3 and key[0] == "model" and key[1] == "layers":  # a layer's type set: its other keys no longer fit
        keys.append(key[:3] + ("type",))
    return [item for at, item in set_at.items() if any(k[: len(at)] == at or (k and at[: len(k)] == k) for k in keys)]


def _problem(err: Any, loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    path = _dotted(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key. {_did_you_mean(loc, root)}"
    if kind == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag", "?")
        return f"{path}.type: unknown layer type {short(tag)}. {_close(tag, list(LAYER_CLASSES))}Valid layer types: {', '.join(LAYER_CLASSES)}."
    if kind == "union_tag_not_found":
        return f"{path}: a layer needs 'type', one of: {', '.join(LAYER_CLASSES)}."
    if kind == "missing":
        return f"{path}: required key is missing."
    got = err.get("input")
    if kind in ("literal_error", "enum"):
        valid = err["msg"].removeprefix("Input should be ")
        hint = _close(got, re.findall(r"'([^']*)'", valid)) if isinstance(got, str) else ""
        return f"{path}: got {short(got)}; {hint.replace('Did', 'did')}{'V' if hint else 'v'}alid values are {valid}."
    shown = "" if isinstance(got, dict) or got is None else f" (got {short(got)})"
    return f"{path}: {err['msg'].removeprefix('Value error, ')}{shown}."


def _key_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The location as config keys and list indexes, without the layer class pydantic chose by 'type' (the config
    has no other unions, which would add such labels)."""
    return tuple(
        part for i, part in enumerate(loc)
        if not (i >= 2 and loc[i - 2] == "layers" and isinstance(loc[i - 1], int) and part in LAYER_CLASSES)
    )


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in _key_path(loc):
        part = part if isinstance(part, int) or len(str(part)) <= 40 else f"{str(part)[:30]}..."  # a key can be any string
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "config"


def _close(bad: str, valid: list[str]) -> str:
    """'Did you mean 'x'? ' for the valid name closest to ``bad``, or nothing."""
    close = difflib.get_close_matches(str(bad)[:100], valid, n=1, cutoff=0.6)
    return f"Did you mean '{close[0]}'? " if close else ""


def _did_you_mean(loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    model = _model_at(loc[:-1], root)
    if model is None:
        return "Remove it."
    valid = list(model.model_fields)
    return f"{_close(str(loc[-1]), valid)}Valid keys here: {', '.join(valid)}."


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    current: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if isinstance(part, str) and part in LAYER_CLASSES:
            current = LAYER_CLASSES[part]
            continue
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = _inner_model(current.model_fields[part].annotation)
        else:
            continue
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    """The pydantic model inside Optional[...], list[...], Annotated[...] and unions, if exactly one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = [m for m in (_inner_model(a) for a in typing.get_args(annotation)) if m is not None]
    return found[0] if len(found) == 1 else None
