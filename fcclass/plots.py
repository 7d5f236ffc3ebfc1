"""Training curves with matplotlib: loss and accuracy (train vs val) and the learning rate, per epoch."""

from __future__ import annotations

import csv
from pathlib import Path

from fcclass.errors import CheckpointError


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise CheckpointError(f"'{run_dir}' has no metrics.csv; give a run directory made by `fcclass train` that finished an epoch.")
    with path.open(newline="") as f:
        rows = [{k: float(v) for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(f)]
    if not rows:
        raise CheckpointError(f"{path} has no epochs yet; train at least one epoch first.")
    return rows


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``curves.png`` (or ``out``) for a run directory and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fcclass.runs import atomic_write_bytes

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
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
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    target = Path(out) if out is not None else run_dir / "curves.png"
    atomic_write_bytes(target, buf.getvalue())
    return target
