"""The trainer's human output through Rich: the header (model, data, device, precision, job) and the epoch lines."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fcclass.files import shown


def print_training_header(console: Console, trainer: Any) -> None:
    """The model table, device and run, and the data table (counts per label, class weights, the balanced sampler's
    draws) before training."""
    from fcclass.device import precision_name

    console.print(summary_table(trainer.model.summary()))
    for note in trainer.weight_notes:  # pretrained backbones: which weights, from where
        console.print(escape(note), highlight=False)
    print_start_weights(console, trainer)
    resumed = ""
    if trainer.resumed:
        resumed = f"   [yellow]resuming after epoch {trainer.state.epoch}[/yellow]"
        if trainer.replanned:
            resumed += f" [yellow](train.epochs is now {trainer.cfg.train.epochs}: the LR schedule is re-planned)[/yellow]"
    chosen = f"auto: {precision_reason(trainer.device.type)}" if trainer.cfg.train.precision == "auto" else "train.precision"
    job = getattr(trainer, "job", None)
    if job is not None and job.enabled:  # torchrun: the job, and what one batch is split into
        from fcclass.training.distributed import backend

        resumed = (f"   DDP: {job.world} processes on {job.nodes} machine(s), {backend(trainer.device.type)}, "
                   f"global batch {trainer.cfg.data.batch_size}{_dropped(trainer)}" + resumed)
    console.print(f"Device: [bold]{trainer.device}[/bold] ({precision_name(trainer.amp_dtype)}, {chosen})   "
                  f"Run: [bold]{escape(shown(trainer.run_dir))}[/bold]{resumed}", highlight=False)
    console.print(data_table(trainer))
    if trainer.cfg.data.sampler == "balanced":
        console.print(balanced_sampler_line(trainer.data.info.train_counts, trainer.class_weights is not None), highlight=False)
    if trainer.val_loader is None:
        t = trainer.cfg.train
        console.print(f"[yellow]No validation split (data.val_split is 0): best.pt keeps the epoch with the best "
                      f"{trainer.monitor_name(t.checkpoint.monitor)} and early stopping follows "
                      f"{trainer.monitor_name(t.early_stopping.monitor)} instead.[/yellow]")
    plan = trainer.batch
    if plan.adapted:
        cfg = trainer.cfg
        console.print(plan.describe(len(trainer.data.train), cfg.train.epochs, cfg.scheduler.max_lr or cfg.optimizer.lr,
                                    trainer.resumed), highlight=False)
    for note in trainer.data.notes:
        console.print(f"[yellow]{escape(note)}[/yellow]")
    print_skipped(console, trainer.skipped_files())


def print_start_weights(console: Console, trainer: Any) -> None:
    """Where a new run's weights come from (model.init_from: the table of loaded, skipped and new layers, and how the
    source's preprocessing differs), and the frozen layers' plan (train.unfreeze)."""
    init_from = trainer.init_from
    if init_from is not None:
        table = Table(title=f"Weights from {escape(shown(init_from.checkpoint))} (epoch {init_from.epoch})", title_justify="left")
        for name in ("Layer (type)", "Param #", "Weights", "From"):
            table.add_column(name, justify="right" if name == "Param #" else "left")
        colour = {"loaded": "green", "skipped": "yellow", "new": "cyan"}
        for t in init_from.transfer.layers:
            status = t.status + (" (frozen)" if t.name in init_from.fixed else "") + (f": {t.why}" if t.why else "")
            table.add_row(escape(f"{t.name} ({t.type})"), f"{t.params:,}", f"[{colour[t.status]}]{escape(status)}[/]",
                          escape(t.source or ""))
        console.print(table)
        for note in init_from.notes:
            console.print(f"[yellow]{escape(note)}[/yellow]", highlight=False)
    if trainer.cfg.train.unfreeze is not None:
        console.print(unfreeze_line(trainer), highlight=False)


def unfreeze_line(trainer: Any) -> str:
    u = trainer.cfg.train.unfreeze
    frozen = trainer.model.frozen_layers()
    if trainer.thawed:
        return f"Every layer trains (train.unfreeze from epoch {u.epoch}), at the scheduled learning rate x {u.lr_scale:g}."
    epochs = trainer.cfg.train.epochs
    if u.epoch > epochs:
        return (f"[yellow]train.unfreeze.epoch {u.epoch} comes after this run's last epoch ({epochs}): "
                f"{', '.join(frozen) or 'no layer'} stay{'s' if len(frozen) == 1 else ''} frozen throughout. Set train.unfreeze.epoch "
                f"to {epochs} or less, or train longer (--resume RUN --set train.epochs=N reaches it).[/yellow]")
    if not frozen:
        return (f"train.unfreeze: no layer is frozen, so from epoch {u.epoch} only the learning rate changes (x {u.lr_scale:g}).")
    return (f"Frozen until epoch {u.epoch} (train.unfreeze): {', '.join(frozen)}. From epoch {u.epoch} every layer trains, "
            f"at the scheduled learning rate x {u.lr_scale:g}.")


SHOWN_SKIPPED = 10  # unreadable files named on screen; the run record lists every one


def print_skipped(console: Console, files: list[Any], already: int = 0) -> None:
    """The files left out as unreadable (data.on_unreadable: skip), those after the first ``already`` (reported
    before): a count, then one line per file, the first SHOWN_SKIPPED of them."""
    new = files[already:]
    if not new:
        return
    when = "found in this epoch, left out of their batches" if already else "left out of the splits"
    console.print(f"[yellow]Skipped {len(new):,} unreadable image file(s) ({when}; data.on_unreadable: skip); the run record "
                  "(summary.json) lists every one:[/yellow]", highlight=False)
    for path, why in new[:SHOWN_SKIPPED]:
        console.print(f"[yellow]  {escape(shown(path))}: {escape(why)}[/yellow]", highlight=False)
    if len(new) > SHOWN_SKIPPED:
        console.print(f"[yellow]  and {len(new) - SHOWN_SKIPPED:,} more[/yellow]", highlight=False)


def _dropped(trainer: Any) -> str:
    """What every epoch leaves out so that each process takes part in every step: a last batch with fewer images
    than processes (each image is otherwise read once per epoch, by one process)."""
    from fcclass.data.loaders import epoch_batches

    n = len(trainer.data.train) if trainer.data.train is not None else 0
    left = n - sum(size for _, _, size in epoch_batches(n, trainer.batch.batch_size, trainer.job))
    return f" (the last batch, {left} image(s), is fewer than the processes: left out of every epoch)" if left else ""


def data_table(trainer: Any) -> Table:
    """Images per label in each split; with train.class_weight, each label's weight; with the balanced sampler, how
    many of each label an epoch draws."""
    info, weights = trainer.data.info, trainer.class_weights
    drawn = balanced_draws(info.train_counts) if trainer.cfg.data.sampler == "balanced" else None
    data = trainer.cfg.data
    packed = f" {data.path}, version {data.version}" if data.version else ""
    table = Table(title=f"Data: {escape(data.dataset + packed)}", title_justify="left")
    test = bool(info.test_counts)
    for name, wanted in (("Label", True), ("Train", True), ("Val", True), ("Test (held out)", test),
                         ("Class weight", weights is not None), ("Drawn / epoch", drawn is not None)):
        if wanted:
            table.add_column(name, justify="left" if name == "Label" else "right")
    for i, name in enumerate(info.class_names):
        row = [escape(name), f"{info.train_counts[i]:,}", f"{info.val_counts[i]:,}", *([f"{info.test_counts[i]:,}"] if test else [])]
        if weights is not None:
            row.append(f"{float(weights[i]):.3f}")
        if drawn is not None:
            row.append(f"≈{drawn[i]:,.0f}")
        table.add_row(*row)
    table.add_section()
    table.add_row("[bold]Total[/bold]", f"{sum(info.train_counts):,}", f"{sum(info.val_counts):,}",
                  *([f"{sum(info.test_counts):,}"] if test else []), *([""] if weights is not None else []),
                  *([f"{sum(info.train_counts):,}"] if drawn is not None else []))
    return table


def balanced_draws(train_counts: list[int]) -> list[float]:
    """How many images of each label an epoch of the balanced sampler draws, on average: as many draws as training
    images, with replacement, every label that has images equally likely (data.loaders.balanced_weights)."""
    present = sum(1 for c in train_counts if c > 0)
    return [sum(train_counts) / present if c > 0 else 0.0 for c in train_counts] if present else [0.0] * len(train_counts)


def balanced_sampler_line(train_counts: list[int], weighted: bool) -> str:
    """The header's note that data.sampler: balanced is on, and what it does."""
    drawn = max(balanced_draws(train_counts), default=0.0)
    both = (" train.class_weight applies on top of it, so a rare label counts more twice over (once drawn more often, "
            "once weighted more)." if weighted else "")
    return (f"Balanced sampler (data.sampler: balanced): each epoch draws {sum(train_counts):,} training images with replacement, "
            f"every label equally often (≈{drawn:,.0f} each, the 'Drawn / epoch' column), so rare labels' images repeat and "
            f"common ones' are partly left out.{both}")


def print_epoch(console: Console, row: dict[str, Any], epochs: int, is_best: bool) -> None:
    val = (f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.2%}  " if row.get("val_loss") is not None else "")
    console.print(
        f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  "
        f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2%}  {val}"
        f"lr {row['lr']:.2e}  {row['seconds']:.1f}s" + ("  [green]* best[/green]" if is_best else ""),
        highlight=False,
    )


def best_line(result: Any) -> str:
    """The closing line of `fcclass train`: the best epoch, where the run is, what to do next."""
    best = result.best
    val = (f"val accuracy {best['val_accuracy']:.2%}, val loss {best['val_loss']:.4f}" if best.get("val_loss") is not None
           else f"train accuracy {best['train_accuracy']:.2%}, train loss {best['train_loss']:.4f} (no validation split)")
    return (f"[bold]Best epoch {result.best_epoch}[/bold]: {val}. Run saved in [bold]{escape(shown(result.run_dir))}[/bold]\n"
            f"Next: fcclass eval {escape(shown(result.run_dir))}")


def precision_reason(device: str) -> str:
    """Why train.precision: auto chose what it did on ``device``, for captions and headers."""
    if device.startswith("cuda"):
        return "bf16 where the GPU supports it"
    if not device.startswith("cpu"):
        return "fp32"
    import os

    from fcclass.device import cpu_bf16_native

    if os.environ.get("FCCLASS_CPU_BF16", "").strip():
        return f"FCCLASS_CPU_BF16={os.environ['FCCLASS_CPU_BF16'].strip()}"
    return "this CPU has native bf16, AVX512-BF16/AMX" if cpu_bf16_native() else "this CPU has no native bf16"


def summary_table(summary: Any, title: str = "Model") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("Layer (type)")
    table.add_column("Output Shape")
    table.add_column("Param #", justify="right")
    table.add_row("input", "(None, " + ", ".join(str(s) for s in summary.input_shape) + ")", "0")
    for li in summary.layers:
        table.add_row(escape(f"{li.name} ({li.type})"), "(None, " + ", ".join(str(s) for s in li.output_shape) + ")", f"{li.params:,}")
    table.add_section()
    table.add_row("[bold]Total params[/bold]", "", f"[bold]{summary.total_params:,}[/bold]")
    table.add_row("Trainable params", "", f"{summary.trainable_params:,}")
    table.add_row("Non-trainable params", "", f"{summary.non_trainable_params:,}")
    return table
