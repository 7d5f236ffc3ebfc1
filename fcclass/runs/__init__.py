"""THE run directory: its layout, lock and checkpoint schema (``checkpoint``), summary.json (``summary``), metrics.csv
(``metrics``), resume rules (``resume``), listing (``listing``) and figures (``plots``)."""

from fcclass.runs.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    Resolved,
    create_run_dir,
    is_run_dir,
    is_trained,
    lock_run,
    newest_trained_run,
    resolve_checkpoint,
    run_config,
    untrained_message,
)

__all__ = ['CHECKPOINT_FORMAT', 'create_run_dir', 'lock_run', 'Checkpoint', 'is_run_dir', 'is_trained', 'newest_trained_run', 'Resolved', 'resolve_checkpoint', 'run_config', 'untrained_message']
