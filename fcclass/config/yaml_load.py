"""Reading YAML for configs and --set values: safe loading only, and nothing that could make validation or an
error message explode."""

from __future__ import annotations

from typing import Any

import yaml

from fcclass.errors import ConfigError

MAX_VALUES = 100_000  # what a config may expand to; real ones hold a few hundred values
MAX_DEPTH = 64


def parse_yaml(text: str, source: str) -> Any:
    """Safe-load YAML, then refuse what would make validation or an error message explode: aliases that expand to
    more than MAX_VALUES values (a "billion laughs" bomb is nine short lines), a structure that contains itself,
    nesting deeper than MAX_DEPTH."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply to read. A config needs a few levels of sections.") from None
    except yaml.constructor.ConstructorError as e:
        where = _mark(e)
        raise ConfigError(
            f"{source}{where}: {e.problem or e}. Configs are read with YAML safe loading, so tags such as "
            "'!!python/object' are refused and never executed; write plain values instead."
        ) from None
    except yaml.YAMLError as e:
        where = _mark(e)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"YAML syntax error in {source}{where}: {problem}. Fix the YAML at that position.") from None


    _check_size(data, source)
    return data


def _check_size(root: Any, source: str) -> None:
    """Count the values ``root`` holds once its aliases are expanded, without expanding them: each list or mapping
    is sized once (by identity), however many times aliases repeat it. Iterative, so depth cannot overflow."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if not isinstance(node, (list, dict)):
            continue
        children = list(node.values()) if isinstance(node, dict) else node
        key = id(node)
        if done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in children)
            if sizes[key] > MAX_VALUES:
                raise ConfigError(f"{source} expands to more than {MAX_VALUES:,} values through YAML aliases (*name repeating "
                                  "&name); a config holds a few hundred. Write the values out instead of nesting aliases.")
        elif key in on_path:
            raise ConfigError(f"{source}: a YAML alias makes a section contain itself (&name ... *name inside it). Remove that alias.")
        elif key not in sizes:
            if depth > MAX_DEPTH:
                raise ConfigError(f"{source}: the YAML is nested more than {MAX_DEPTH} levels deep; a config needs a few levels of sections.")
            on_path.add(key)
            stack.append((node, depth, True))
            stack.extend((c, depth + 1, False) for c in children)


def _mark(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
