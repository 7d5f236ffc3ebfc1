"""`fcclass sweep`: hyperparameter search on Optuna, each trial a normal run in the sweep folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from fcclass.cli.common import ConfigOpt, JsonOpt, SetOpt, _check_json_target, _emit_json, _handle_errors, _human_console, app, err_console
from fcclass.errors import FcclassError


@app.command()
@_handle_errors
def sweep(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", metavar="KEY=SPEC", help="KEY=SPEC to search, KEY a dotted config key as for --set; SPEC "
                                              "0.1,0.01 (values) | uniform(a,b) | loguniform(a,b) | int(a,b). Repeatable."),
    trials: Optional[int] = typer.Option(None, "--trials", "-n", help="How many trials the study runs in all (default 20); a rerun continues to it."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="grid | random | tpe (default tpe)"),
    pruner: Optional[str] = typer.Option(None, "--pruner", help="none | median | hyperband (default median): stop trials that fall behind."),
    metric: Optional[str] = typer.Option(None, "--metric", help="val_accuracy (default) | val_loss | train_accuracy | train_loss: the best epoch's value is "
                                                                "the trial's."),
    seed: Optional[int] = typer.Option(None, "--seed", help="The sampler's seed: the same command proposes the same trials (default 0)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage shared by several machines: an RDB URL (postgresql://..., "
                                          "sqlite:///...) or a journal file on a shared disk (default: SWEEP_DIR/study.db)."),
    study: Optional[str] = typer.Option(None, "--study", help="The study's name (default: the config's name)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Trials run at once on this machine, each with cores/K threads (default 1)."),
    oversubscribe: bool = typer.Option(False, "--oversubscribe", help="Allow more --workers than this machine has cores."),
    heartbeat: Optional[int] = typer.Option(None, "--heartbeat", metavar="SECONDS", help="RDB storages: a running trial's heartbeat interval (default 60, "
                                            "recorded by the study); a trial silent for twice that (its worker lost, on any machine) is failed and run again."),
    sweep_dir: Optional[Path] = typer.Option(None, "--sweep-dir", help="Where the trials' runs go (default: RUNS_DIR/sweep-STUDY)."),
    status: bool = typer.Option(False, "--status", help="Show the study's leaderboard without training."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Search hyperparameters with Optuna: every trial is a normal run; at the end a leaderboard and the best config."""
    _check_json_target(json_out)
    if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        raise FcclassError("fcclass sweep does not run under torchrun: each trial is one process. Run trials in parallel "
                           "with --workers K, or start `fcclass sweep` on several machines with one shared --storage.")
    from fcclass.config.load import load_config
    from fcclass.experiments.sweep import is_rdb, open_study, plan, storage_warnings
    from fcclass.experiments.sweep_checks import check_storage, check_workers
    from fcclass.experiments.sweep_run import leaderboard, run, write_best
    from fcclass.runs.metrics import rounded_row

    cli: dict[str, Any] = {"trials": trials, "sampler": sampler, "pruner": pruner, "metric": metric, "seed": seed,
                           "storage": storage, "study": study, "workers": workers, "heartbeat": heartbeat,
                           "oversubscribe": True if oversubscribe else None}
    plan_ = plan(load_config(config, set_), param or [], cli, sweep_dir, status=status)
    check_storage(plan_)  # before anything is written: a storage in memory, a file of something else, a FIFO
    if not status:
        check_workers(plan_)  # more workers than cores, or than memory holds
    console = _human_console(json_out)
    for warning in storage_warnings(plan_) if not status else []:
        err_console.print(f"[yellow]Warning: {escape(warning)}[/yellow]", highlight=False)
    for note in plan_.notes if not status else []:
        err_console.print(f"[yellow]Note: {escape(note)}[/yellow]", highlight=False)
    found = open_study(plan_)  # before any worker starts: a study that searches something else stops the command here
    if not status:
        space = ", ".join(f"{p.key} in {p.describe()}" for p in plan_.params)
        beat = f", heartbeat {plan_.opts.heartbeat} s" if plan_.opts.heartbeat and is_rdb(plan_) else ""
        console.print(f"Sweep '{escape(plan_.name)}': {plan_.opts.trials} trials of {escape(space)}; {plan_.opts.sampler} sampler, "
                      f"{plan_.opts.pruner} pruner, {plan_.opts.metric}, seed {plan_.opts.seed}, {plan_.opts.workers} worker(s)"
                      f"{beat}. Runs in {escape(str(plan_.folder))}", highlight=False)
        found = run(plan_, lambda e: console.print(_trial_line(e, plan_), highlight=False))
    board = leaderboard(found, plan_.direction)
    best, why_not = write_best(plan_, board) if board else (None, None)
    if json_out != "-":
        from fcclass.cli.tables import leaderboard_table

        console.print(leaderboard_table(board, plan_, ranked_by(board, plan_.opts.metric)))
        if best is not None:
            console.print(f"Best config: [bold]{escape(str(best))}[/bold] (reproduce with: fcclass train -c {escape(str(best))})",
                          highlight=False)
    if why_not is not None:
        err_console.print(f"[yellow]Note: {escape(why_not)}[/yellow]", highlight=False)
    _emit_json(json_out, {"study": plan_.name, "sweep_dir": str(plan_.folder), "metric": plan_.opts.metric,
                          "trials": [rounded_row(e.to_dict()) for e in board], "best_config": str(best) if best else None})
    if not status and board and all(e.state == "fail" for e in board):
        raise FcclassError(all_failed(board))


def all_failed(board: list[Any]) -> str:
    """Why a sweep whose every trial failed failed: the first trial's reason (with the trials that share it)."""
    first = board[0].fail_reason or "no reason recorded"
    same = [e.number for e in board if (e.fail_reason or "no reason recorded") == first]
    who = f"Trial {same[0]}" if len(same) == 1 else f"Trials {', '.join(map(str, same[:5]))}{', ...' if len(same) > 5 else ''}"
    others = len(board) - len(same)
    rest = f" ({others} other trial(s) for other reasons: the Note column, fail_reason in --json)" if others else ""
    return (f"All {len(board)} trials of the sweep failed, none gave a result. {who}: {_clip(first, 300).rstrip('.')}{rest}. Fix the cause, "
            "then run it as a new study (--study NAME or another --sweep-dir): the failed trials keep their places in this one.")


def _trial_line(e: Any, plan_: Any) -> str:
    params = "  ".join(f"{k}={_short(v)}" for k, v in e.params.items())
    value = f"{e.metric or plan_.opts.metric} {e.value:.4f}" if e.value is not None else _clip(e.fail_reason or "", 160)
    took = f"  {e.seconds:.0f}s" if e.seconds is not None else ""
    retry = f" (retry of {e.retry_of})" if e.retry_of is not None else ""
    return f"trial {e.number}{retry}  {escape(params)}  {e.state}  {escape(value)}{took}"


def ranked_by(board: list[Any], metric: str) -> str:
    """What the trials' values are: the sweep's metric, or the training metric that stands in for it where a trial
    had no validation split (all of them: its name; some: both names)."""
    other = sorted({e.metric for e in board if e.metric} - {metric})
    if not other:
        return metric
    return other[0] if all(e.metric in (None, other[0]) for e in board) else f"{metric} ({other[0]} without a validation split)"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3].rstrip() + "..."


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
