"""What every command shares: the Typer ``app`` they register on, the common options, error handling and output
helpers. The commands import this module; ``fcclass.cli`` imports the commands, and nothing imports it back."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import escape

from fcclass.errors import FcclassError
from fcclass.files import check_output, is_stdout, write_output


def _plug_closed_streams() -> bool:
    """Started with stdout or stderr closed (``fcclass ... >&-``), Python has None for them, and the next file
    opened would take descriptor 1 or 2, where anything printed at the C level would land. Open /dev/null there
    instead. Returns whether stdout was closed: commands then refuse to run, since their results would be lost."""
    closed = sys.stdout is None
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))
        try:  # a terminal or pipe that cannot encode a file name shows it escaped instead of failing
            getattr(sys, name).reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    return closed


_STDOUT_CLOSED = _plug_closed_streams()

app = typer.Typer(
    help="Train, evaluate and serve conv-pool-flatten-dense image classifiers from Keras-style YAML configs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    # Click's plain help: Typer's boxed help shows every flag with a '<bool>' value it does not take, and cuts lines at
    # 80 columns in a pipe; usage errors then read 'Error: ...' like fcclass's own.
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
)


def _console(stderr: bool = False) -> Console:
    """A Rich console. Writing to a file or pipe there is no terminal width to follow, and Rich would wrap at 80
    columns (epoch lines broken in two, labels cut short in tables): lay such output out 160 wide instead, unless
    COLUMNS says otherwise."""
    stream = sys.stderr if stderr else sys.stdout
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) >= 40:
        width = int(columns)
    else:  # no COLUMNS, or nonsense like 0: the terminal's width, or 160 in a file or pipe
        width = None if stream.isatty() and not columns else 160 if not stream.isatty() else 80
    # soft_wrap: a message is never broken by inserted newlines (a resume command must stay one line to copy);
    # tables are still laid out to the width.
    return Console(stderr=stderr, width=width, soft_wrap=True)


err_console = _console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from fcclass.version import __version__

        print(f"fcclass {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print fcclass's version and exit.")) -> None:
    """Train, evaluate and serve conv-pool-flatten-dense image classifiers from Keras-style YAML configs."""

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file, or a shipped config by name (fashion_mnist, mlp, cifar10, imagefolder, "
                                                      "pytorch_examples_mnist; default: fashion_mnist).")
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override a config key: dotted.key=value (value parsed as YAML). Repeatable.")
JsonOpt = typer.Option(None, "--json", help="Write the result as JSON to FILE, or '-' for stdout (then nothing else goes to stdout).")
RunsDirOpt = typer.Option(Path("runs"), "--runs-dir", help="Where runs are looked up.")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N | mps")
DataRootOpt = typer.Option(None, "--data-root", help="Where the run's data is now, if it moved: the dataset root (data.root) for "
                           "torchvision sets, the image folder (data.path) for imagefolder runs.")
AllowChangedOpt = typer.Option(False, "--allow-changed-data", help="Use the run's recorded files as they are now even if some "
                               "changed or vanished since training (vanished ones are skipped), instead of refusing.")


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            try:
                os.getcwd()
            except FileNotFoundError:
                raise FcclassError("The current folder no longer exists (it was deleted after this shell entered it); "
                                   "cd to an existing folder and run the command again.") from None
            if _STDOUT_CLOSED:
                raise FcclassError("Standard output is closed (as with `>&-`), and fcclass writes its results there. "
                                   "Redirect it to a file or to /dev/null instead.")
            return fn(*args, **kwargs)
        except FcclassError as e:
            rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1") else "0"
            where = f" (rank {escape(rank)})" if rank != "0" else ""  # under torchrun: which process says so
            err_console.print(f"[bold red]Error{where}:[/bold red] [red]{escape(str(e))}[/red]", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]Interrupted.[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


def _human_console(*targets: str | Path | None) -> Console:
    """Human output goes to stdout unless machine output does (--json -, --json /dev/stdout, --csv /dev/stdout)."""
    return err_console if any(t is not None and is_stdout(t) for t in targets) else _console()


def _check_json_target(target: str | None) -> None:
    """Fail before the work, not after it, when --json FILE cannot be written."""
    if target not in (None, "-"):
        check_output(target, "JSON")


def _emit_json(target: str | None, data: Any) -> None:
    if target is None:
        return
    text = json.dumps(_finite(data), indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        _write_file(Path(target), text, "JSON")


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: JSON has no such numbers (json.dumps would write NaN, which no
    strict parser reads), so --json writes null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_file(path: Path, text: str, what: str) -> None:
    write_output(path, text, what)


def _print_notes(console: Console, notes: list[str]) -> None:
    for note in notes:
        console.print(f"[yellow]{escape(note)}[/yellow]" if not note.startswith("Run: ") else escape(note), highlight=False)
