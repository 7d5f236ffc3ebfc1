"""THE run directory: its files (``layout``), making one (``create``), its lock and checkpoint schema (``checkpoint``),
its JSON records as pydantic models (``records``: summary.json in ``summary``, splits.json in ``splits``,
tracking.json in ``tracking``), metrics.csv (``metrics``), resume rules (``resume``), listing (``listing``) and
figures (``plots``). Nobody else opens a run's files."""

from fcclass.runs.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    Resolved,
    lock_run,
    newest_trained_run,
    resolve_checkpoint,
    run_config,
    untrained_message,
)
from fcclass.runs.create import create_run_dir, start_run
from fcclass.runs.layout import is_run_dir, is_trained

__all__ = ['CHECKPOINT_FORMAT', 'create_run_dir', 'lock_run', 'Checkpoint', 'is_run_dir', 'is_trained', 'newest_trained_run', 'Resolved', 'resolve_checkpoint',
           'run_config', 'start_run', 'untrained_message']
