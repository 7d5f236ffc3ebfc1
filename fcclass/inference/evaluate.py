"""Evaluation: inference over a split and the per-label report built from it (torchmetrics)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fcclass.data import make_loader
from fcclass.errors import FcclassError
from fcclass.inference.load import load_for_inference
from fcclass.inference.metrics import average_precision, expected_calibration_error, predicted, rounded, score


@dataclass
class EvalReport:
    accuracy: float
    loss: float
    per_class: dict[str, dict[str, float | int]]  # accuracy (= recall), precision, f1, support
    num_samples: int
    class_names: list[str]
    predictions: torch.Tensor = field(repr=False)
    labels: torch.Tensor = field(repr=False)
    confusion: torch.Tensor = field(repr=False)  # [true, predicted] counts
    macro: dict[str, float] = field(default_factory=dict)
    weighted: dict[str, float] = field(default_factory=dict)
    top5_accuracy: float | None = None
    calibration_error: float = float("nan")  # ECE over 15 confidence bins (metrics.expected_calibration_error)
    probabilities: torch.Tensor | None = field(default=None, repr=False)  # softmax of the logits, N x classes
    checkpoint: str = ""
    split: str = "test"
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # how the run was chosen, data that changed since training
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}: left out as unreadable (on_unreadable: skip)

    def confused_pairs(self, n: int = 5) -> list[dict[str, Any]]:
        """The ``n`` largest off-diagonal cells: which label is most often taken for which."""
        off = self.confusion.clone()
        off.fill_diagonal_(0)
        flat = off.flatten()
        order = torch.argsort(flat, descending=True, stable=True)[:n]
        k = len(self.class_names)
        pairs = []
        for idx in order.tolist():
            count = int(flat[idx])
            if count == 0:
                break
            t, p = divmod(idx, k)
            support = int(self.confusion[t].sum())
            pairs.append({"true": self.class_names[t], "predicted": self.class_names[p], "count": count,
                          "fraction_of_true": _r(count / support) if support else 0.0})
        return pairs

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "per_class": self.per_class,
            "num_samples": self.num_samples,
            "split": self.split,
            "checkpoint": self.checkpoint,
            "top5_accuracy": self.top5_accuracy,
            "log_loss": self.loss,
            "expected_calibration_error": self.calibration_error,
            "macro_avg": self.macro,
            "weighted_avg": self.weighted,
            "labels": self.class_names,
            "confusion_matrix": self.confusion.tolist(),
            "most_confused": self.confused_pairs(10),
            "notes": self.notes,
            "skipped": self.skipped,
        }


_r = rounded


def compute_report(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> EvalReport:
    """Every figure of the report from the logits and the true labels: accuracy and loss as everywhere else
    (fcclass.inference.metrics), the per-label and averaged figures with torchmetrics."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    k = len(class_names)
    preds = predicted(logits)
    total = score(logits, labels)  # plain cross-entropy: the loss of a model, whatever label smoothing it trained with
    args = {"num_classes": k}
    recall = multiclass_recall(preds, labels, average=None, **args)
    precision = multiclass_precision(preds, labels, average=None, **args)
    f1 = multiclass_f1_score(preds, labels, average=None, **args)
    support = torch.bincount(labels, minlength=k)
    probs = logits.float().softmax(1)
    ap, macro_ap = label_average_precision(probs, labels)
    per_class = {
        name: {"accuracy": _r(recall[i]), "precision": _r(precision[i]), "f1": _r(f1[i]), "support": int(support[i]),
               "average_precision": ap[i]}
        for i, name in enumerate(class_names)
    }
    averages = {}
    for average in ("macro", "weighted"):
        averages[average] = {
            "precision": _r(multiclass_precision(preds, labels, average=average, **args)),
            "recall": _r(multiclass_recall(preds, labels, average=average, **args)),
            "f1": _r(multiclass_f1_score(preds, labels, average=average, **args)),
        }
    averages["macro"]["average_precision"] = macro_ap
    top5 = _r(multiclass_accuracy(logits, labels, average="micro", top_k=5, **args)) if k > 5 else None
    return EvalReport(
        accuracy=_r(total.accuracy),
        loss=_r(total.loss),
        per_class=per_class,
        num_samples=total.images,
        class_names=class_names,
        predictions=preds,
        labels=labels,
        confusion=multiclass_confusion_matrix(preds, labels, **args),
        macro=averages["macro"],
        weighted=averages["weighted"],
        top5_accuracy=top5,
        calibration_error=_r(expected_calibration_error(probs, labels)),
        probabilities=probs,
    )


def label_average_precision(probs: torch.Tensor, labels: torch.Tensor) -> tuple[list[float | None], float | None]:
    """Each label's one-vs-rest average precision (metrics.average_precision) and their mean over the labels with images
    (None for a label without any)."""
    out: list[float | None] = []
    for i in range(probs.shape[1]):
        target = labels == i
        out.append(_r(average_precision(probs[:, i], target)) if bool(target.any()) else None)
    present = [v for v in out if v is not None]
    return out, (_r(sum(present) / len(present)) if present else None)


def evaluate(run: str | Path | None = None, checkpoint: str | Path | None = None, *, split: str = "test",
             runs_dir: str | Path = "runs", data_root: str | Path | None = None, device: str = "auto",
             batch_size: int = 256, save: bool = False, misclassified: int = 0, allow_changed_data: bool = False,
             progress: Any = None) -> EvalReport:
    """Evaluate the best checkpoint of ``run`` (default: the newest trained run) or ``checkpoint``: see ``evaluate_split``."""
    return evaluate_split(run, checkpoint, split=split, runs_dir=runs_dir, data_root=data_root, device=device, batch_size=batch_size,
                          save=save, misclassified=misclassified, allow_changed_data=allow_changed_data, progress=progress)[0]


def evaluate_split(run: str | Path | None = None, checkpoint: str | Path | None = None, *, split: str = "test",
                   runs_dir: str | Path = "runs", data_root: str | Path | None = None, device: str = "auto",
                   batch_size: int = 256, save: bool = False, misclassified: int = 0, allow_changed_data: bool = False,
                   progress: Any = None) -> tuple[EvalReport, Callable[[torch.Tensor], torch.Tensor]]:
    """Evaluate the best checkpoint of ``run`` (default: the newest trained run) or ``checkpoint`` on the split the run
    recorded, and a function giving the split's images (uint8, N x C x H x W) at indices of the report's rows
    (``data_root``: where the run's data is now, if it moved; ``allow_changed_data``: use the recorded files as they are
    now, skipping vanished ones, instead of refusing).

    ``save`` writes ``eval.json`` and ``confusion_matrix.png`` beside the checkpoint (``eval-val.json``... for the
    validation split); ``misclassified`` > 0 also draws that many misclassified images to ``misclassified.png``.
    ``progress`` (a data.cache.Progress) shows an image folder being decoded into its cache.
    """
    if split not in ("test", "val"):
        raise FcclassError(f"--split must be test or val, not '{split}'.")
    inf = load_for_inference(run, checkpoint, runs_dir=runs_dir, device=device)
    ds = inf.dataset((split,), data_root, allow_changed_data, progress)
    part = ds.splits[split]
    if len(part) == 0:
        why = " (data.val_split was 0)" if split == "val" else ""
        raise FcclassError(f"The {split} split of this run is empty{why}; evaluate another split.")
    cfg = inf.config
    loader = make_loader(part, batch_size, False, cfg.seed, ds.channels, ds.size, device=inf.device, num_workers=cfg.data.num_workers,
                         skip=cfg.data.on_unreadable == "skip")
    logits, labels = inf.run_loader(loader)
    part, found = read_part(part, loader, ds)
    report = compute_report(logits, labels, inf.class_names)
    report.checkpoint, report.split = str(inf.path), split
    report.notes = [n for n in (inf.note, *ds.notes, found) if n]
    report.skipped = [{"path": str(path), "reason": why} for path, why in ds.skipped]
    if save or misclassified:
        _save_artifacts(report, part, ds, inf.path.parent, save, misclassified)
    return report, lambda idx: split_images(part, idx, ds)


def read_part(part: Any, loader: Any, ds: Any) -> tuple[Any, str | None]:
    """The part of a streamed split that was read, and a note naming the files that turned out unreadable as it was
    (data.on_unreadable: skip; they are added to ``ds.skipped``); the split and None when all were read."""
    from fcclass.data import describe_bad_files

    found = getattr(loader, "skipped", {})
    if not found:
        return part, None
    bad = [(part.files[i], why) for i, why in sorted(found.items())]
    ds.skipped += bad
    kept = part.subset(torch.tensor([i for i in range(len(part)) if i not in found], dtype=torch.long))
    return kept, (f"{len(bad):,} file(s) of the split cannot be decoded now and are left out (data.on_unreadable: skip): "
                  f"{describe_bad_files(bad, shown=3)}.")


def _save_artifacts(report: EvalReport, part: Any, ds: Any, out_dir: Path, save: bool, misclassified: int) -> None:
    from fcclass.files import write_json
    from fcclass.runs.plots import plot_confusion, plot_image_grid

    suffix = "" if report.split == "test" else f"-{report.split}"
    targets = {}
    try:
        if misclassified:
            wrong = (report.predictions != report.labels).nonzero().flatten()[:misclassified]
            images = split_images(part, wrong, ds)
            names = report.class_names
            captions = [f"true: {names[int(report.labels[i])]}\npred: {names[int(report.predictions[i])]}" for i in wrong.tolist()]
            targets["misclassified"] = plot_image_grid(images, captions, out_dir / f"misclassified{suffix}.png",
                                                       f"{len(captions)} misclassified {report.split} images")
        if save:
            targets["confusion_matrix"] = plot_confusion(report, out_dir / f"confusion_matrix{suffix}.png")
            targets["eval_json"] = out_dir / f"eval{suffix}.json"
            write_json(targets["eval_json"], report.to_dict())
    except OSError as e:
        raise FcclassError(f"Cannot write evaluation files into '{out_dir}': {e.strerror}. Make it writable or pass --no-save.") from None
    report.files = {k: str(v) for k, v in targets.items()}


def split_images(part: Any, idx: torch.Tensor, ds: Any) -> torch.Tensor:
    """uint8 (N, C, H, W) images of a split, as the model saw them before normalisation."""
    from fcclass.data import load_resized

    if part.images is not None:
        return part.take(idx)
    if not len(idx):
        return torch.zeros(0, ds.channels, *ds.size, dtype=torch.uint8)
    return torch.stack([load_resized(part.files[i], ds.channels, ds.size) for i in idx.tolist()])
