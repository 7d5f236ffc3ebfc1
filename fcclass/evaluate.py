"""Evaluation: inference over a split and the per-label report built from it (torchmetrics)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from fcclass.data import BatchPreprocess, load_dataset, make_loader
from fcclass.device import autocast, select_device, select_precision
from fcclass.errors import FcclassError
from fcclass.runs import load_trained, resolve_checkpoint


def predict_loader(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], prep: BatchPreprocess,
                   device: torch.device, amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels for every batch of ``loader``, in order."""
    was_training = model.training
    model.eval()
    outs, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            with autocast(device, amp_dtype):
                logits = model(prep(x.to(device, non_blocking=True)))
            outs.append(logits.float().cpu())
            labels.append(y.cpu())
    model.train(was_training)
    if not outs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(labels)


@dataclass
class EvalReport:
    accuracy: float
    loss: float
    per_class: dict[str, dict[str, float | int]]
    num_samples: int
    class_names: list[str]
    predictions: torch.Tensor = field(repr=False)
    labels: torch.Tensor = field(repr=False)
    checkpoint: str = ""
    split: str = "test"

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "loss": self.loss, "per_class": self.per_class, "num_samples": self.num_samples}


def compute_report(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> EvalReport:
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_recall

    k = len(class_names)
    preds = logits.argmax(1)
    recall = multiclass_recall(preds, labels, num_classes=k, average=None)
    accuracy = multiclass_accuracy(preds, labels, num_classes=k, average="micro")
    support = torch.bincount(labels, minlength=k)
    per_class = {name: {"accuracy": float(recall[i]), "support": int(support[i])} for i, name in enumerate(class_names)}
    loss = float(nn.functional.cross_entropy(logits, labels))
    return EvalReport(float(accuracy), loss, per_class, int(labels.numel()), class_names, preds, labels)


def evaluate(run: str | Path | None = None, checkpoint: str | Path | None = None, *, split: str = "test",
             runs_dir: str | Path = "runs", data_root: str | None = None, device: str = "auto",
             batch_size: int = 256) -> EvalReport:
    """Evaluate the best checkpoint of ``run`` (default: the newest run) or ``checkpoint`` on a split of its dataset."""
    if split not in ("test", "val"):
        raise FcclassError(f"--split must be test or val, not '{split}'.")
    path = resolve_checkpoint(run, checkpoint, runs_dir)
    model, ckpt = load_trained(path)
    cfg = ckpt["config_obj"]
    data_cfg = cfg.data.model_copy(update={"root": data_root}) if data_root else cfg.data
    ds = load_dataset(data_cfg, cfg.seed, splits=(split,) if split == "test" else ("val",))
    part = ds.test if split == "test" else ds.val
    if part is None or len(part) == 0:
        raise FcclassError(f"The {split} split of '{cfg.data.dataset}' is empty.")
    if list(ds.info.class_names) != list(ckpt["class_names"]):
        raise FcclassError(f"The data's labels {ds.info.class_names} differ from the checkpoint's {ckpt['class_names']}; evaluate on the dataset the model was trained on.")
    dev = select_device(device)
    model.to(dev)
    loader = make_loader(part, batch_size, False, cfg.seed, ds.channels, ds.size, device=dev, num_workers=cfg.data.num_workers)
    logits, labels = predict_loader(model, loader, BatchPreprocess(ckpt["mean"], ckpt["std"]), dev,
                                    select_precision("auto", dev))
    report = compute_report(logits, labels, list(ckpt["class_names"]))
    report.checkpoint, report.split = str(path), split
    return report
