"""Reading README.md's examples for tests/test_readme.py: the shown commands with their output, the Python
snippets, the JSON shapes the prose promises, and the comparison of shown output with real output (key lines,
with run timestamps, install paths and, where asked, numbers abstracted)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent.parent / "README.md"

_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


@dataclass
class Block:
    """A fenced block: its language, its lines (indentation of the fence removed), the README line it starts on and
    the ``## `` section it is in."""

    lang: str
    lines: list[str]
    line: int
    section: str


@dataclass
class Example:
    """A command shown in the README (``$ ...`` in a block, or an fcclass line of a ``bash`` block) and the output
    lines shown under it."""

    command: str
    output: list[str] = field(default_factory=list)
    line: int = 0


def blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text() if text is None else text).splitlines()
    found: list[Block] = []
    section, start, indent, lang, body = "", None, "", "", []
    for number, line in enumerate(lines, 1):
        if start is None:
            if line.startswith("## "):
                section = line[3:].strip()
            fence = _FENCE.match(line)
            if fence:
                start, indent, lang, body = number, fence.group(1), fence.group(2), []
        elif line.strip() == "```":
            found.append(Block(lang, body, start, section))
            start = None
        else:
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
    return found


def command_key(command: str) -> str:
    """A command line without its trailing ``# comment`` and surplus spaces: how the registry names an example."""
    return re.split(r"\s+#\s", command, maxsplit=1)[0].strip()


def examples(text: str | None = None) -> list[Example]:
    """Every ``$ command`` of every block with the lines under it (up to the next ``$`` line, a blank line or the
    block's end), and every command of a ``bash`` block that runs fcclass (continuation lines joined)."""
    found: list[Example] = []
    for block in blocks(text):
        current: Example | None = None
        for offset, line in enumerate(block.lines, 1):
            if line.startswith("$ "):
                current = Example(command_key(line[2:]), [], block.line + offset)
                found.append(current)
            elif current is not None and line.strip():
                current.output.append(line.rstrip())
            else:
                current = None
        if block.lang == "bash":
            joined = "\n".join(block.lines).replace("\\\n", " ")
            for offset, line in enumerate(joined.splitlines(), 1):
                if re.search(r"(^|[\s/])fcclass\b", line) and not line.lstrip().startswith("#"):
                    found.append(Example(command_key(" ".join(line.split())), [], block.line + offset))
    return found


def shown_blocks(text: str | None = None) -> list[Block]:
    """The blocks that show something without a ``$`` command: output, configs, JSON, Python (not ``bash``)."""
    return [b for b in blocks(text) if b.lang != "bash" and not any(line.startswith("$ ") for line in b.lines)]


def block_key(block: Block) -> str:
    """How the registry names a shown block: its language and first two lines, normalised, cut to 100 characters."""
    return f"{block.lang or 'text'}: " + " / ".join(normalise(line) for line in block.lines[:2])[:100]


def paragraphs(text: str | None = None) -> list[str]:
    """The README's paragraphs and list items outside fenced blocks, each joined into one line."""
    out: list[str] = []
    current: list[str] = []
    in_block = False
    for line in (README.read_text() if text is None else text).splitlines():
        if _FENCE.match(line) or (in_block and line.strip() == "```"):
            in_block = not in_block
            line = ""
        if in_block:
            continue
        starts_item = re.match(r"^\s*- ", line) is not None
        if not line.strip() or starts_item:
            if current:
                out.append(" ".join(current))
            current = [line.strip()] if starts_item else []
        else:
            current.append(line.strip())
    if current:
        out.append(" ".join(current))
    return out


# ----------------------------------------------------------------------------- comparing shown and real output
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?(?!\d|\.\d)")
_RUN = re.compile(r"[\w.]+(?:-[\w.]+)*-\d{8}-\d{6}(?:-\d+)?")  # a run directory's name: <name>-<date>-<time>
_SHAPE = re.compile(r"\b\d+(x\d+)+\b")  # 3x64x64
_SIZE = re.compile(r"# (bytes|KB|MB|GB|TB|PB)\b")
_HASH = re.compile(r"\b[0-9a-f]{8,}\b")
_BOX_RUNS = re.compile(r"([━─═])\1+")
LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_PREDICTED = re.compile(r"(?:%s) \(" % "|".join(re.escape(label) for label in LABELS))


def normalise(line: str, replace: dict[str, str] | None = None, numbers: bool = True, labels: bool = False) -> str:
    """One line as compared: ``replace`` applied (real paths -> the README's), run names and hashes, with ``numbers``
    every number made '#', with ``labels`` every predicted Fashion-MNIST label ('Bag (12.3%)'), an epoch line's
    '* best' left out, runs of spaces and of table rules made one."""
    for real, shown in (replace or {}).items():
        line = line.replace(real, shown)
    line = _HASH.sub("<hash>", _RUN.sub("<run>", line))
    if labels:
        line = _PREDICTED.sub("<label> (", line)
    if numbers:
        line = _SIZE.sub("# <size>", _NUMBER.sub("#", _SHAPE.sub("#x#", line)))
    line = _BOX_RUNS.sub(r"\1", line).removesuffix("* best")  # whether an epoch is the best so far is the numbers' doing
    return " ".join(line.split())


def is_elision(line: str) -> bool:
    """'...', '...  (the confusion matrix)' or a table row of '...' cells: the README left lines out there."""
    return line.lstrip().startswith("...") or re.search(r"│ *\.\.\. *│", line) is not None


def missing_lines(shown: list[str], real: str, *, replace: dict[str, str] | None = None, numbers: bool = True,
                  labels: bool = False, skip: tuple[str, ...] = ()) -> list[str]:
    """The shown lines (other than elisions and those matching a ``skip`` regex) that no line of ``real`` matches
    once both are normalised."""
    have = {normalise(line, replace, numbers, labels) for line in real.splitlines()}
    return [line for line in shown if not is_elision(line) and not any(re.search(p, line) for p in skip)
            and normalise(line, None, numbers, labels) not in have]


# ----------------------------------------------------------------------------- the JSON shapes the prose promises
@dataclass
class Shape:
    """``{"a", "b": {...}, ...}`` as written in the README: the keys (with the shape of their value, if written),
    whether more keys may follow (``...``); ``many`` for ``[{...}]`` (a list of such objects)."""

    keys: dict[str, "Shape | None"]
    open: bool = False
    many: bool = False


def parse_shape(text: str) -> Shape:
    tokens = re.findall(r'"[^"]*"|\.\.\.|[{}\[\]:,]', text)
    shape, rest = _parse_object(tokens)
    assert not rest, f"trailing text after the JSON shape: {rest}"
    return shape


def _parse_object(tokens: list[str]) -> tuple[Shape, list[str]]:
    many = tokens[0] == "["
    if many:
        tokens = tokens[1:]
    assert tokens[0] == "{", tokens
    shape, tokens = Shape({}), tokens[1:]
    while tokens[0] != "}":
        token, tokens = tokens[0], tokens[1:]
        if token == "...":
            shape.open = True
        elif token.startswith('"'):
            value = None
            if tokens[0] == ":":
                value, tokens = _parse_object(tokens[1:])
            shape.keys[token.strip('"')] = value
        if tokens[0] == ",":
            tokens = tokens[1:]
    tokens = tokens[1:]
    if many:
        assert tokens[0] == "]", tokens
        tokens = tokens[1:]
    shape.many = many
    return shape, tokens


def shape_errors(data: Any, shape: Shape, where: str = "") -> list[str]:
    """How ``data`` differs from ``shape``: missing keys, and (for a closed shape) keys the README does not list."""
    if shape.many:
        if not isinstance(data, list) or not data:
            return [f"{where or 'top level'}: expected a non-empty list, got {type(data).__name__}"]
        return [e for i, item in enumerate(data) for e in shape_errors(item, Shape(shape.keys, shape.open), f"{where}[{i}]")]
    if not isinstance(data, dict):
        return [f"{where or 'top level'}: expected an object, got {type(data).__name__}"]
    wildcard = [k for k in shape.keys if k.startswith("<")]
    errors = []
    if wildcard:
        sub = shape.keys[wildcard[0]]
        return [e for k, v in data.items() for e in (shape_errors(v, sub, f"{where}.{k}") if sub else [])]
    missing = sorted(set(shape.keys) - set(data))
    extra = sorted(set(data) - set(shape.keys))
    if missing:
        errors.append(f"{where or 'top level'}: the README lists {missing}, the output lacks them")
    if extra and not shape.open:
        errors.append(f"{where or 'top level'}: the output has {extra}, which the README does not list")
    for key, sub in shape.keys.items():
        if sub is not None and key in data:
            errors += shape_errors(data[key], sub, f"{where}.{key}")
    return errors


def shape_after(paragraph: str, anchor: str) -> Shape:
    """The first ``{...}`` code span from ``anchor`` on in a paragraph, parsed."""
    rest = paragraph[paragraph.index(anchor):]
    span = re.search(r"`(\[?\{[^`]*\}\]?)`", rest)
    assert span, f"no `{{...}}` code span after {anchor!r}"
    return parse_shape(span.group(1))
