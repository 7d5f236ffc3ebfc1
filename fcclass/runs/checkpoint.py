"""The run's lock, the one checkpoint schema (safe, weights-only loading) and finding runs.

A run directory is self-contained (fcclass.runs.layout names its files): best.pt holds the best epoch so far and
last.pt the last completed epoch, with everything resume needs (epoch 0 until the first epoch completes). A run is
*trained* once an epoch has completed: best.pt exists."""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fcclass.errors import CheckpointError
from fcclass.files import RefusedFile, RunWriteError, atomic_write_bytes, open_regular, os_error_reason, read_regular
from fcclass.runs.layout import BEST, CONFIG, LAST, LOCK, is_run_dir, is_trained

CHECKPOINT_FORMAT = 2  # 1: fcclass 0.1 (kept loadable for evaluation; not resumable)


def lock_run(run_dir: Path) -> Any:
    """Hold the run directory for this process (an advisory lock on RUN_DIR/.lock, released when the returned file is
    closed or the process ends, kill -9 included): two processes training one run would overwrite each other."""
    import fcntl

    path = Path(run_dir) / LOCK
    try:
        # read-only: a lock held open for writing would keep the file system from going read-only; open_regular
        # refuses a FIFO or a folder put at the lock's path at once (opening a FIFO to read would wait for a writer)
        f = os.fdopen(open_regular(path, os.O_RDONLY | os.O_CREAT), "rb")
    except (RefusedFile, IsADirectoryError) as e:
        what = e.strerror if isinstance(e, RefusedFile) else "it is a folder, not a regular file"
        raise CheckpointError(f"Cannot lock run '{run_dir}': its lock file {path}: {what}. Remove it "
                              f"(rm -r '{path}'); fcclass makes a new one.") from None
    except OSError as e:
        raise RunWriteError(f"Cannot write to '{run_dir}': {os_error_reason(e)}.") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise CheckpointError(f"Run '{run_dir}' is being trained by another process right now. Wait for it to finish (or "
                              "stop it with Ctrl-C), then resume.") from None
    return f


# ----------------------------------------------------------------------------- the checkpoint
@dataclass
class Checkpoint:
    """Everything saved about a model. best.pt holds the inference part; last.pt also the training part."""

    model_state: dict[str, Any]
    config: dict[str, Any]  # the resolved config
    class_names: list[str]
    input_shape: list[int]  # what the model takes: [C, H, W] (or [features])
    mean: list[float]  # normalisation of pixels scaled to [0, 1]; empty: none
    std: list[float]
    epoch: int  # completed epochs these weights have seen; 0 = untrained
    metrics: dict[str, Any] | None = None  # the metrics row of that epoch
    optimizer_state: dict[str, Any] | None = None
    schedule_state: dict[str, Any] | None = None
    scaler_state: dict[str, Any] | None = None
    train_state: dict[str, Any] | None = None  # train.TrainState as a dict
    format: int = CHECKPOINT_FORMAT

    @property
    def resumable(self) -> bool:
        return self.format == CHECKPOINT_FORMAT and self.optimizer_state is not None and self.train_state is not None

    def save(self, path: Path) -> None:
        import io

        import torch

        buf = io.BytesIO()
        payload = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "format"}
        torch.save({"fcclass_checkpoint": self.format, **payload}, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        """Load with ``weights_only=True``: tensors and plain data only, never arbitrary objects."""
        raw = _safe_torch_load(Path(path))
        fmt = raw.get("fcclass_checkpoint") if isinstance(raw, dict) else None
        if fmt not in (1, CHECKPOINT_FORMAT):
            raise CheckpointError(f"'{path}' is not a fcclass checkpoint. Use best.pt or last.pt from a run directory.")
        missing = [k for k in _INFERENCE_FIELDS if k not in raw]
        if missing:
            raise CheckpointError(f"Checkpoint '{path}' lacks {', '.join(missing)}; it is damaged. Use another checkpoint of the run.")
        problem = _field_problem(raw)
        if problem:
            raise CheckpointError(f"Checkpoint '{path}' is damaged: {problem}. Use another checkpoint of the run (last.pt or best.pt).")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known}, format=fmt)


_INFERENCE_FIELDS = ("model_state", "config", "class_names", "input_shape", "mean", "std", "epoch")


def _field_problem(raw: dict[str, Any]) -> str | None:
    """What is wrong with the fields inference uses, if anything: a file can load safely and still be nonsense."""
    import math

    import torch

    state, shape = raw["model_state"], raw["input_shape"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        return "model_state is not a mapping of names to tensors"
    for name, t in state.items():
        if t.layout != torch.strided or (t.is_floating_point() and t.dtype != torch.float32) or t.is_complex():
            return f"weight {name} is {t.dtype} {t.layout}, not the dense float32 fcclass saves"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"weight {name} holds NaN or infinite values"
    if not isinstance(raw["config"], dict) or not isinstance(raw["class_names"], list) or not raw["class_names"] \
            or not all(isinstance(c, str) for c in raw["class_names"]):
        return "its config or class names are missing"
    if not isinstance(shape, (list, tuple)) or len(shape) not in (1, 3) or not all(type(s) is int and 0 < s <= 65536 for s in shape):
        return f"input_shape {str(shape)[:50]} is not [channels, height, width]"
    channels = shape[0] if len(shape) == 3 else 1
    for key in ("mean", "std"):
        values = raw[key]
        if not isinstance(values, (list, tuple)) or len(values) not in (0, channels) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            return f"{key} must be {channels} finite number(s), not {str(values)[:50]}"
    if any(v <= 0 for v in raw["std"]) or len(raw["mean"]) != len(raw["std"]):
        return "std must be positive, one per mean"
    if type(raw["epoch"]) is not int or raw["epoch"] < 0:
        return "epoch is not a whole number"
    return None


def _safe_torch_load(path: Path) -> Any:
    import torch

    if path.is_dir():
        raise CheckpointError(f"'{path}' is a folder, not a checkpoint file. If it is a run directory, give it as the run "
                              f"(`fcclass eval {path}`, `fcclass predict --run {path} ...`, `fcclass export {path}`) instead of --checkpoint.")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' not found. Pass an existing .pt file written by `fcclass train`.")
    with path.open("rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch.save writes a zip archive; old files a pickle
        raise CheckpointError(f"'{path}' is not a checkpoint (not a file written by torch.save). Use best.pt or last.pt from a run directory.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes are noise next to our own error
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "weights only load failed" not in text.lower():
            raise CheckpointError(f"Cannot read checkpoint '{path}': the file is truncated or corrupt. Use another checkpoint of "
                                  "the run (last.pt or best.pt).") from None
        culprit = next((line.strip() for line in text.splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"Refused to load '{path}': it holds Python objects that safe (weights-only) loading does not allow"
            f"{f' ({culprit[:160]})' if culprit else ''}. Only checkpoints written by `fcclass train` can be loaded; nothing in the file was run."
        ) from None
    except Exception:  # noqa: BLE001 - truncated zip, bad records, I/O errors: all mean a damaged file
        raise CheckpointError(f"Cannot read checkpoint '{path}': the file is truncated or corrupt. Use another checkpoint of the "
                              "run (last.pt or best.pt).") from None


# ----------------------------------------------------------------------------- finding runs
def _trained_at(run_dir: Path) -> float:
    """When training last wrote a checkpoint of the run (0: never, its first one is not written yet)."""
    return max(((run_dir / name).stat().st_mtime for name in (BEST, LAST) if (run_dir / name).is_file()), default=0.0)


def newest_trained_run(runs_dir: str | Path = "runs") -> tuple[Path, list[Path]]:
    """The run whose training last wrote a checkpoint, among the trained runs in ``runs_dir``, and the newer runs
    that were passed over because no epoch of theirs completed."""
    base = Path(runs_dir)
    runs = [p for p in base.iterdir() if is_run_dir(p)] if base.is_dir() else []
    trained = [p for p in runs if is_trained(p)]
    if not trained:
        untrained = f" ({len(runs)} run(s) there stopped before completing an epoch)" if runs else ""
        raise CheckpointError(f"No trained runs found in '{base}'{untrained}. Train one with `fcclass train`, or pass a run directory.")
    newest = max(trained, key=_trained_at)
    skipped = sorted((p for p in runs if not is_trained(p) and _trained_at(p) > _trained_at(newest)), key=_trained_at)
    return newest, skipped


@dataclass
class Resolved:
    """The checkpoint an inference command uses, its run directory (None for a bare file) and how it was chosen."""

    checkpoint: Path
    run_dir: Path | None
    note: str | None = None  # e.g. which run "the newest" turned out to be


def resolve_checkpoint(run: str | Path | None = None, checkpoint: str | Path | None = None,
                       runs_dir: str | Path = "runs") -> Resolved:
    """``checkpoint`` if given; else the best checkpoint of ``run``, or of the newest trained run in ``runs_dir``."""
    if checkpoint is not None:
        path = Path(checkpoint)
        return Resolved(path, path.parent if (path.parent / CONFIG).is_file() else None)
    note = None
    if run is None:
        run_dir, skipped = newest_trained_run(runs_dir)
        note = f"Run: {run_dir} (the newest trained run in {runs_dir}"
        if skipped:
            note += f"; passed over {len(skipped)} newer run(s) with no completed epoch: {', '.join(p.name for p in skipped[:3])}"
        note += ")"
    else:
        run_dir = Path(run)
    if run_dir.is_file():
        raise CheckpointError(f"'{run_dir}' is a file, not a run directory; to use a checkpoint file pass --checkpoint {run_dir}.")
    if not run_dir.is_dir():
        raise CheckpointError(f"Run directory '{run_dir}' not found. List your runs with `ls {runs_dir}`.")
    if is_trained(run_dir):
        return Resolved(run_dir / BEST, run_dir, note)
    if (run_dir / LAST).is_file():
        raise CheckpointError(untrained_message(run_dir))
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"'{run_dir}' is not a run directory (no {BEST}, {LAST} or {CONFIG}). Pass a folder made by `fcclass train`, e.g. one in "
                              f"{runs_dir}/.")
    raise CheckpointError(f"'{run_dir}' has no checkpoint ({BEST} or {LAST}); its training never started an epoch. Train again or name another run.")


CONFIG_LIMIT = 4 << 20  # bytes; a run's resolved config.yaml is a few KB


def raw_config(run_dir: str | Path) -> Any:
    """A run's config.yaml as the YAML it holds (None: there is none), read through files.read_regular (a regular file
    of at most CONFIG_LIMIT bytes) and parse_yaml (alias, depth and size caps); a damaged one is a CheckpointError or ConfigError."""
    from fcclass.config.yaml_load import parse_yaml

    path = Path(run_dir) / CONFIG
    try:
        text = read_regular(path, CONFIG_LIMIT).decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"Cannot read {path} ({why[:100]}); it is damaged. Restore it from a copy of the run.") from None
    return parse_yaml(text, str(path))  # a ConfigError names the file and the problem


def run_config(run_dir: str | Path) -> Any:
    """The resolved config a run was trained with (its config.yaml)."""
    from fcclass.config.load import config_from_dict

    path = Path(run_dir) / CONFIG
    raw = raw_config(run_dir)
    if raw is None:
        raise CheckpointError(f"'{run_dir}' is not a run directory (no {CONFIG}). Pass a folder made by `fcclass train`.")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is damaged: it does not hold a config mapping.")
    return config_from_dict(raw, source=str(path), stored=True)


def untrained_message(run_dir: Path) -> str:
    return (f"Run '{run_dir}' has no trained model: it stopped during its first epoch, before any epoch completed, so its "
            f"weights are the random initial ones. Resume it with `fcclass train --resume {run_dir}`, or name another run.")
