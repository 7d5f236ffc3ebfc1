"""What a report shows about one run, gathered once: the evaluation (``fcclass eval``'s own pass and numbers), the
run's records (summary, splits, metrics.csv, config) and the images of the evaluated split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

GALLERY_CAP = 120  # misclassified thumbnails shown at most: a 10,000-image split stays far under 5 MB
PR_POINTS = 120  # points kept per precision-recall curve


@dataclass
class RunData:
    run_dir: Path
    report: Any  # fcclass.inference.evaluate.EvalReport
    images: Callable[[Any], Any] = field(repr=False)  # indices of the report's rows -> uint8 images
    summary: Any = None  # fcclass.runs.summary.Summary, or None when missing
    history: list[dict[str, float]] = field(default_factory=list)  # metrics.csv
    history_problem: str | None = None
    config_yaml: str = ""
    config: Any = None
    split_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def best_epoch(self) -> int | None:
        best = getattr(self.summary, "best", None)
        return getattr(best, "epoch", None)


def gather(run: str | Path | None, *, split: str = "test", runs_dir: str | Path = "runs", data_root: str | Path | None = None,
           device: str = "auto", allow_changed_data: bool = False, progress: Any = None, evaluated: Any = None) -> RunData:
    """Evaluate ``run`` (default: the newest trained run) on ``split`` and read what its page shows (``evaluated``: the
    (report, images) that fcclass.inference.evaluate.evaluate_split already gave, as `fcclass eval --html` has)."""
    from fcclass.errors import FcclassError
    from fcclass.inference.evaluate import evaluate_split
    from fcclass.runs.metrics import read_metrics
    from fcclass.runs.splits import read_splits
    from fcclass.runs.summary import read_summary

    report, images = evaluated or evaluate_split(run, split=split, runs_dir=runs_dir, data_root=data_root, device=device,
                                                 allow_changed_data=allow_changed_data, progress=progress)
    run_dir = Path(report.checkpoint).parent
    data = RunData(run_dir, report, images, summary=read_summary(run_dir))
    try:
        data.history = read_metrics(run_dir)
    except FcclassError as e:
        data.history_problem = str(e)
    from fcclass.runs.checkpoint import run_config

    try:
        data.config = run_config(run_dir)
        data.config_yaml = data.config.to_yaml()
    except FcclassError as e:
        data.config_yaml = f"# {e}"
    recorded = read_splits(run_dir)
    if recorded is not None:
        data.split_sizes = {name: len(s.get("indices") or s.get("files") or []) for name, s in recorded.splits.items()}
    return data


def per_image_loss(report: Any) -> Any:
    """Each image's cross-entropy, -log p(true label), from the report's probabilities."""
    import torch

    p = report.probabilities.gather(1, report.labels.view(-1, 1)).flatten()
    return -torch.log(p.clamp_min(1e-12))


def misclassified(report: Any, cap: int = GALLERY_CAP) -> tuple[list[int], int]:
    """The rows predicted wrong, highest loss first, at most ``cap`` of them, and how many there are in all."""
    import torch

    wrong = (report.predictions != report.labels).nonzero().flatten()
    order = torch.argsort(per_image_loss(report)[wrong], descending=True, stable=True)
    return wrong[order][:cap].tolist(), int(wrong.numel())


def pr_curves(report: Any, points: int = PR_POINTS) -> list[tuple[str, list[float], list[float], float | None]]:
    """Each label's one-vs-rest precision-recall curve (the one its average precision is the area under), thinned to
    about ``points`` points, and that average precision (the report's)."""
    from fcclass.inference.metrics import precision_recall_curve

    out = []
    for i, name in enumerate(report.class_names):
        target = report.labels == i
        if not bool(target.any()):
            continue
        precision, recall = precision_recall_curve(report.probabilities[:, i], target)
        step = max(1, len(recall) // points)
        keep = [0, *range(step, len(recall), step), len(recall) - 1]
        out.append((name, [0.0] + [float(recall[k]) for k in keep], [float(precision[0])] + [float(precision[k]) for k in keep],
                    report.per_class[name]["average_precision"]))
    return out
