"""The `fcclass` command line: parse, call the library, render with Rich. No torch import at module level.

``common`` holds the app and what the commands share; each command module registers its commands on the app when
imported here, in the order --help lists them."""

from fcclass.cli import (
    bench_command,
    compress_command,
    data_command,
    model_commands,
    report_command,
    run_commands,
    runs_command,
    serve_command,
    sweep_command,
)
from fcclass.cli.common import app

__all__ = ["app", "main", "run_commands", "model_commands", "compress_command", "bench_command", "runs_command",
           "sweep_command", "serve_command", "report_command", "data_command"]


def main() -> None:  # pragma: no cover
    app()
