"""RUN_DIR/tracking.json: where the run is logged in MLflow (store, experiment, run id), written when its MLflow run is
made, so a resumed run continues the same MLflow run (fcclass.training.tracking)."""

from __future__ import annotations

from pathlib import Path

from fcclass.runs.layout import TRACKING
from fcclass.runs.records import DamagedRecord, Record, read_record, write_record

LIMIT = 1 << 20  # bytes; a record is a few hundred


class TrackingRecord(Record):
    tracking_uri: str | None = None
    experiment: str | None = None
    experiment_id: str | None = None
    run_id: str


def read_tracking(run_dir: str | Path) -> TrackingRecord | None:
    """The run's tracking.json, or None when it has none or it is damaged (then a resume logs to a new MLflow run)."""
    try:
        return read_record(Path(run_dir) / TRACKING, TrackingRecord, LIMIT)
    except DamagedRecord:
        return None


def write_tracking(run_dir: str | Path, record: TrackingRecord) -> None:
    """Atomically; raises OSError."""
    write_record(Path(run_dir) / TRACKING, record)
