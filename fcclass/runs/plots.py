"""Training curves with matplotlib: loss and accuracy (train vs val) and the learning rate, per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fcclass.errors import CheckpointError
from fcclass.runs.metrics import read_metrics


def _figure(**kwargs: Any) -> Any:
    """A matplotlib Figure of its own, not pyplot's: drawing one changes neither the caller's backend nor pyplot's
    list of open figures, so a library user's notebook or GUI session is left as it was."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


IMAGE_FORMATS = ("png", "jpg", "jpeg", "pdf", "svg")


def _save(fig: Any, target: Path, dpi: int = 100) -> Path:
    """Write the figure atomically, in the format the file name asks for."""
    import io

    from fcclass.files import check_output, write_output

    fmt = target.suffix.lower().lstrip(".") or "png"
    if fmt not in IMAGE_FORMATS:
        raise CheckpointError(f"Cannot write the figure to '{target}': use one of .{', .'.join(IMAGE_FORMATS)}.")
    check_output(target, "the figure")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    write_output(target, buf.getvalue(), "the figure")
    return target


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``curves.png`` (or ``out``) for a run directory and return its path."""
    try:
        return _plot_curves(Path(run_dir), out)
    except (ValueError, OverflowError) as e:  # matplotlib on values no training writes (1e308...)
        raise CheckpointError(f"{Path(run_dir) / 'metrics.csv'} holds values that cannot be plotted ({str(e)[:80]}); "
                              "it was edited or damaged. Resuming the run or training again rewrites it.") from None


def _plot_curves(run_dir: Path, out: str | Path | None) -> Path:
    import matplotlib

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    epochs = [r["epoch"] for r in rows]
    fig = _figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    for ax, key, title in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "o-", label="train")
        ax.plot(epochs, [r.get(f"val_{key}", float("nan")) for r in rows], "o-", label="val")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[2].plot(epochs, [r["lr"] for r in rows], "o-", color="tab:green")
    axes[2].set_title("Learning rate (mean per epoch)")
    axes[2].set_xlabel("epoch")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[2].grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    return _save(fig, Path(out) if out is not None else run_dir / "curves.png")


def plot_confusion(report: Any, target: Path) -> Path:
    """Row-normalised confusion matrix with labelled axes; counts are written in the cells up to 20 labels."""
    names = report.class_names
    k = len(names)
    counts = report.confusion.double()
    rows = counts / counts.sum(1, keepdim=True).clamp_min(1)
    side = max(6.0, 0.16 * k + 3)
    fig = _figure(figsize=(side + 1.5, side))
    ax = fig.subplots()
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true label")
    font = 9 if k <= 20 else max(4, int(9 - k / 20))
    ax.set_xticks(range(k), names, rotation=90, fontsize=font)
    ax.set_yticks(range(k), names, fontsize=font)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"Confusion matrix, {report.split} split (accuracy {report.accuracy:.2%})")
    if k <= 20:
        for t in range(k):
            for p in range(k):
                if counts[t, p]:
                    ax.text(p, t, int(counts[t, p]), ha="center", va="center", fontsize=7,
                            color="white" if rows[t, p] > 0.5 else "black")
    fig.tight_layout()
    return _save(fig, target, dpi=100 if k <= 20 else 150)


def plot_image_grid(images: Any, captions: list[str], target: Path, title: str) -> Path:
    """uint8 (N, C, H, W) images in a grid, one caption under each."""
    n = max(1, len(captions))
    cols = min(8, n)
    rows = (n + cols - 1) // cols
    fig = _figure(figsize=(1.9 * cols, 2.2 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, caption in zip(axes.flat, images, captions):
        arr = img.permute(1, 2, 0).numpy()
        ax.imshow(arr[:, :, 0] if arr.shape[2] == 1 else arr, cmap="gray" if arr.shape[2] == 1 else None, vmin=0, vmax=255)
        ax.set_title(caption, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, target)


def plot_comparison(runs: list[Path], target: Path) -> Path:
    """The validation accuracy and loss per epoch of several runs, overlaid (training curves for a run that had no
    validation split, dashed)."""
    import matplotlib

    from fcclass.runs.metrics import metrics_rows

    fig = _figure(figsize=(13, 4.6))
    axes = fig.subplots(1, 2)
    for run in runs:
        rows = metrics_rows(run)
        split = "val" if any("val_accuracy" in r for r in rows) else "train"
        style = "o-" if split == "val" else "o--"
        epochs = [r.get("epoch", i + 1) for i, r in enumerate(rows)]
        label = run.name if split == "val" else f"{run.name} (train)"
        for ax, key in zip(axes, ("accuracy", "loss")):
            ax.plot(epochs, [r.get(f"{split}_{key}", float("nan")) for r in rows], style, label=label, markersize=3)
    for ax, title in zip(axes, ("Validation accuracy", "Validation loss")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return _save(fig, target)
