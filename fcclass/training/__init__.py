"""Training: the loop (``trainer``), its callbacks, the learning-rate schedule, distributed data-parallel training, the
run record and MLflow tracking, and ``fit``, the one call that trains or resumes a run."""

from fcclass.training.fit import fit, resume_config

__all__ = ['fit', 'resume_config']
