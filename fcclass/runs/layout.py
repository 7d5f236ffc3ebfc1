"""The run directory's file names, and what makes a folder a run directory.

A run directory holds config.yaml (the resolved config), classes.json, splits.json (the recorded splits),
metrics.csv, summary.json (the run record), best.pt and last.pt (the checkpoints), tracking.json (its MLflow run,
when tracked), report.html (`fcclass report`) and .lock (held while a process trains it). Runs of earlier versions may lack summary.json and
splits.json; a run listed from its summary alone may have nothing else."""

from __future__ import annotations

from pathlib import Path

CONFIG, CLASSES, SPLITS = "config.yaml", "classes.json", "splits.json"
SUMMARY, METRICS, TRACKING = "summary.json", "metrics.csv", "tracking.json"
BEST, LAST, LOCK = "best.pt", "last.pt", ".lock"
COMPRESSED = "compress.json"  # a compressed run's before/after record; with model.int8.onnx, its deployed model
REPORT = "report.html"  # `fcclass report`'s page of the test split (report-val.html: of the validation split); `fcclass serve` links it


def is_run_dir(path: Path) -> bool:
    """A folder fcclass made a run in: it holds a run's config, record or checkpoint (trained or not)."""
    return path.is_dir() and any((path / name).is_file() for name in (CONFIG, SUMMARY, BEST, LAST))


def is_trained(path: Path) -> bool:
    """An epoch has completed: best.pt is written at the end of the first epoch, never before."""
    return (path / BEST).is_file()
