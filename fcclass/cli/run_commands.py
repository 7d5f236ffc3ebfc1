"""`fcclass train`, `fcclass config` and `fcclass init`: runs and their configs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from fcclass.cli.common import (
    ConfigOpt,
    JsonOpt,
    SetOpt,
    _check_json_target,
    _console,
    _emit_json,
    _handle_errors,
    _human_console,
    _write_file,
    app,
    err_console,
)
from fcclass.errors import FcclassError


@app.command()
@_handle_errors
def train(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a run directory from its last completed epoch, with its own config "
                                          "(--set may change only train.epochs, early stopping, device, precision, threads and data locations)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="With --resume: where the run's data is now, if it moved (the image "
                                             "folder for imagefolder runs, the dataset root otherwise)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the fully resolved config (YAML) and exit without training."),
    log_interval: float = typer.Option(10.0, "--log-interval", min=0, help="Written to a file or pipe: a progress line every N seconds during an epoch (0: "
                                                                           "none)."),
    test: bool = typer.Option(True, "--test/--no-test", help="At the end, evaluate the best checkpoint on the test split "
                              "(eval.json, confusion_matrix.png, the test figures in summary.json); same as train.test_at_end."),
    nproc: Optional[int] = typer.Option(None, "--nproc-per-node", min=1, max=1024, help="Train with N processes on this machine "
                                        "(DistributedDataParallel, started through torchrun: one per GPU, or gloo on CPUs). "
                                        "data.batch_size is the global batch. For several machines run torchrun yourself (README)."),
    oversubscribe: bool = typer.Option(False, "--oversubscribe", help="With --nproc-per-node: start more processes than CPU cores."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from the weights of a trained run (its best.pt) or a "
                                             "checkpoint file: same as model.init_from (its layers/exclude/freeze keys still apply)."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Train a model from a YAML config (default: the Fashion-MNIST CNN) into runs/<name>-<timestamp>/."""
    _check_json_target(json_out)
    if init_from is not None:
        if resume is not None:
            raise FcclassError(f"--init-from starts a new run from '{init_from}'s weights; --resume continues a run from its own, "
                               "so they cannot be combined.")
        set_ = [*(set_ or []), f"model.init_from.path={json.dumps(str(init_from))}"]
    if nproc is not None and "WORLD_SIZE" not in os.environ and not print_config:
        _launch(nproc, config, set_, resume, data_root, log_interval, test, json_out, oversubscribe)
        return
    set_ = [*(set_ or []), "train.test_at_end=false"] if not test else set_
    if resume is not None and config is not None:
        raise FcclassError(f"--resume continues '{resume}' with the config it was trained with ({resume / 'config.yaml'}), so -c/--config "
                           f"cannot be combined with it. To train {config}, leave out --resume; to change a setting of the run on "
                           "resume, use --set (see `fcclass train --help`).")
    if data_root is not None and resume is None:
        raise FcclassError("--data-root goes with --resume; for a new run set the data's place in the config "
                           "(--set data.root=DIR, or --set data.path=DIR for imagefolder).")
    if print_config:
        _print_config(_resolved_config(config, set_, resume, data_root), json_out)
        return
    from fcclass.config.load import load_config

    cfg = None if resume is not None else load_config(config, set_)
    from fcclass.runs.resume import RunFinished
    from fcclass.training.fit import fit

    rank0, console, json_out = _reporting(json_out)
    try:
        result = fit(cfg, resume=resume, overrides=set_ if resume is not None else None, console=console,
                     log_interval=log_interval, data_root=data_root)
    except RunFinished as e:
        console.print(f"[yellow]{escape(str(e))}[/yellow]", highlight=False)
        _emit_json(json_out, {"run_dir": str(resume), "finished": True, "message": str(e)})
        return
    if not rank0:  # rank 0 reports the job's results
        raise typer.Exit(130 if result.interrupted else 0)
    for warning in result.warnings:
        err_console.print(f"[yellow]Warning: {escape(warning)}[/yellow]", highlight=False)
    if result.removed:
        raise typer.Exit(130)
    best = result.best or {}
    if best:
        from fcclass.training.console import best_line

        console.print(best_line(result), highlight=False)
    if result.test is not None:
        t = result.test
        console.print(f"Test split ({t['images']:,} images, best epoch {t['epoch']}): accuracy [bold]{t['accuracy']:.2%}[/bold], "
                      f"loss {t['loss']:.4f}", highlight=False)
    from fcclass.runs.metrics import rounded_row

    _emit_json(json_out, {"run_dir": str(result.run_dir), "epochs": len(result.history), "best_epoch": result.best_epoch,
                          "best": rounded_row(best) if best else {}, "stopped_early": result.stopped_early,
                          "interrupted": result.interrupted is not None, "device": result.device, "precision": result.precision,
                          "batch_size": result.batch_size,
                          "test": rounded_row(result.test) if result.test is not None else None,
                          "history": [rounded_row(r) for r in result.history]})
    if result.interrupted:
        raise typer.Exit(130)


def _reporting(json_out: Optional[str]) -> tuple[bool, Console, Optional[str]]:
    """Whether this process reports (under torchrun only rank 0 does; the others train quietly), its console and JSON
    target. RANK without a job is refused here, before anything is trained."""
    from fcclass.runs.summary import LAUNCH_COMMAND
    from fcclass.training.distributed import from_env

    job = from_env()
    if job.rank == 0:
        return True, _human_console(json_out), json_out
    if json_out is not None and LAUNCH_COMMAND not in os.environ:  # torchrun run by hand: say where the JSON is
        err_console.print(f"{job.label}: the JSON (--json {escape(json_out)}) is written by rank 0 only; this process "
                          "prints nothing.", highlight=False)
    return False, Console(quiet=True), None


def _launch(nproc: int, config: Optional[Path], set_: Optional[list[str]], resume: Optional[Path], data_root: Optional[str],
            log_interval: float, test: bool, json_out: Optional[str], oversubscribe: bool = False) -> None:
    """--nproc-per-node: this same command, started N times by torchrun (after checking that they fit here)."""
    args = ["train", *(["-c", str(config)] if config is not None else []), *(f"--set={item}" for item in set_ or []),
            *(["--resume", str(resume)] if resume is not None else []), *(["--data-root", str(data_root)] if data_root else []),
            f"--log-interval={log_interval}", *([] if test else ["--no-test"]), *(["--json", json_out] if json_out else [])]
    if resume is None:
        from fcclass.config.load import load_config

        cfg = load_config(config, set_)  # a config mistake is reported once, here, rather than by every process
        from fcclass.training.distributed import SYNC_BATCHNORM_NEEDS_CUDA

        if cfg.train.sync_batchnorm and not (cfg.train.device != "cpu" and _cuda_available()):
            raise FcclassError(SYNC_BATCHNORM_NEEDS_CUDA)
    else:
        cfg = _recorded_config(resume)
    from fcclass.training.distributed import check_launch, launch

    check_launch(nproc, cfg, oversubscribe)
    launch(nproc, args)


def _recorded_config(run_dir: Path) -> Any:
    """A run's config, or None when unreadable (the processes then report why)."""
    from fcclass.runs.checkpoint import run_config

    try:
        return run_config(run_dir)
    except FcclassError:
        return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _resolved_config(config: Optional[Path], set_: Optional[list[str]], run: Optional[Path], data_root: Optional[str] = None) -> Any:
    """The config a command would use: a run's (with resume's --set), or -c/--set (default: the shipped default)."""
    if run is not None:
        from fcclass.training.fit import resume_config

        return resume_config(run, set_ or [], data_root)
    from fcclass.config.load import load_config

    return load_config(config, set_)


def _print_config(cfg: Any, json_out: Optional[str]) -> None:
    if json_out is not None:
        _emit_json(json_out, cfg.to_dict())
    if json_out != "-":
        sys.stdout.write(cfg.to_yaml())


@app.command("config")
@_handle_errors
def config_(
    run_dir: Optional[Path] = typer.Argument(None, help="A run directory: print the config it was trained with."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Print a fully resolved config (every key, defaults filled in): of -c/--set, or of a run directory."""
    _check_json_target(json_out)
    if run_dir is not None and config is not None:
        raise FcclassError("Give either a run directory or -c/--config, not both.")
    if run_dir is not None and set_:
        raise FcclassError("--set does not apply to a run's config; to see what a resume would use: fcclass train --resume RUN --set ... --print-config.")
    if run_dir is not None:
        from fcclass.runs.checkpoint import run_config

        _print_config(run_config(run_dir), json_out)
    else:
        _print_config(_resolved_config(config, set_, None), json_out)


@app.command()
@_handle_errors
def init(
    directory: Path = typer.Argument(Path("."), help="Folder to write the config into (created if needed)."),
    template: str = typer.Option("fashion_mnist", "--template", "-t", help="Which shipped config to start from (see the list in the error for an "
                                  "unknown name)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write an editable starter config (a commented copy of a shipped config) and say how to train it."""
    from fcclass.config.load import shipped_configs

    configs = shipped_configs()
    if template not in configs:
        raise FcclassError(f"Unknown --template '{template}': the shipped configs are {', '.join(sorted(configs))}.")
    target = directory / f"{template}.yaml"
    if os.path.lexists(target) and not force:  # a dangling symlink too: writing would create its target elsewhere
        raise FcclassError(f"'{target}' already exists; pass --force to overwrite it, or choose another folder.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FcclassError(f"Cannot create '{directory}': {e.strerror}.") from None
    _write_file(target, configs[template].read_text(encoding="utf-8"), "the config")
    console = _console()
    console.print(f"Wrote [bold]{escape(str(target))}[/bold]. Edit it, then:", highlight=False)
    console.print(f"  fcclass summary -c {escape(str(target))}\n  fcclass train -c {escape(str(target))}", highlight=False)
