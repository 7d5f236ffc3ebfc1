"""Run directories and checkpoints: atomic writes, safe (weights-only) loading, finding the newest run."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from fcclass.errors import CheckpointError

CHECKPOINT_FORMAT = 1
BEST, LAST = "best.pt", "last.pt"
_UMASK = os.umask(0)
os.umask(_UMASK)


def create_run_dir(runs_dir: str | Path, name: str) -> Path:
    """A fresh ``runs/<name>-<YYYYmmdd-HHMMSS>`` directory (suffixed if that second is taken)."""
    base = Path(runs_dir)
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = base / (f"{name}-{stamp}" if i == 0 else f"{name}-{stamp}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise CheckpointError(f"Cannot create a run directory under '{base}': too many runs named '{name}' this second.")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync, rename: a crash leaves the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the user's usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"fcclass_checkpoint": CHECKPOINT_FORMAT, **payload}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain data only, never arbitrary objects."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' not found. Pass an existing .pt file written by `fcclass train`.")
    if path.is_dir():
        raise CheckpointError(f"'{path}' is a folder; pass a checkpoint file such as {path / BEST}, or the run directory without --checkpoint.")
    with path.open("rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch.save writes a zip archive; old files a pickle
        raise CheckpointError(f"'{path}' is not a checkpoint (not a file written by torch.save). Use best.pt or last.pt from a run directory.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes are noise next to our own error
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "weights only load failed" not in text.lower():
            raise CheckpointError(f"Cannot read checkpoint '{path}': the file is truncated or corrupt. Use another checkpoint of the run (last.pt or best.pt).") from None
        culprit = next((line.strip() for line in text.splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"Refused to load '{path}': it holds Python objects that safe (weights-only) loading does not allow"
            f"{f' ({culprit[:160]})' if culprit else ''}. Only checkpoints written by `fcclass train` can be loaded; nothing in the file was run."
        ) from None
    except Exception:  # noqa: BLE001 - truncated zip, bad records, I/O errors: all mean a damaged file
        raise CheckpointError(f"Cannot read checkpoint '{path}': the file is truncated or corrupt. Use another checkpoint of the run (last.pt or best.pt).") from None
    if not isinstance(ckpt, dict) or ckpt.get("fcclass_checkpoint") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"'{path}' is not a fcclass checkpoint (format {CHECKPOINT_FORMAT}). Use best.pt or last.pt from a run directory.")
    missing = [k for k in ("model_state", "config", "class_names", "input_shape", "mean", "std") if k not in ckpt]
    if missing:
        raise CheckpointError(f"Checkpoint '{path}' lacks {', '.join(missing)}; it is damaged. Use another checkpoint of the run.")
    return ckpt


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / BEST).is_file() or (path / LAST).is_file())


def newest_run(runs_dir: str | Path = "runs") -> Path:
    base = Path(runs_dir)
    runs = [p for p in base.iterdir() if is_run_dir(p)] if base.is_dir() else []
    if not runs:
        raise CheckpointError(f"No training runs found in '{base}'. Train one with `fcclass train`, or pass a run directory.")
    return max(runs, key=lambda p: (p / LAST).stat().st_mtime if (p / LAST).exists() else (p / BEST).stat().st_mtime)


def resolve_checkpoint(run: str | Path | None = None, checkpoint: str | Path | None = None, runs_dir: str | Path = "runs") -> Path:
    """The checkpoint to use: ``checkpoint`` if given, else the best (or last) of ``run`` or the newest run."""
    if checkpoint is not None:
        return Path(checkpoint)
    run_dir = Path(run) if run is not None else newest_run(runs_dir)
    if run_dir.is_file():
        raise CheckpointError(f"'{run_dir}' is a file, not a run directory; to use a checkpoint file pass --checkpoint {run_dir}.")
    if not run_dir.is_dir():
        raise CheckpointError(f"Run directory '{run_dir}' not found. List your runs with `ls {runs_dir}`.")
    for name in (BEST, LAST):
        if (run_dir / name).is_file():
            return run_dir / name
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"'{run_dir}' is not a run directory (no {BEST}, {LAST} or config.yaml). Pass a folder made by `fcclass train`, e.g. one in {runs_dir}/.")
    raise CheckpointError(f"'{run_dir}' has no checkpoint ({BEST} or {LAST}); its training did not finish an epoch.")


def load_trained(checkpoint: Path) -> tuple[Any, dict[str, Any]]:
    """Rebuild the model of a checkpoint and load its weights. Returns (model in eval mode, checkpoint dict)."""
    from fcclass.config import config_from_dict
    from fcclass.errors import FcclassError
    from fcclass.model import build_model

    ckpt = load_checkpoint(checkpoint)
    try:
        cfg = config_from_dict(ckpt["config"], source=f"config in {checkpoint}", stored=True)
        model = build_model(cfg.model, ckpt["input_shape"], len(ckpt["class_names"]))
        model.load_state_dict(ckpt["model_state"])
    except FcclassError as e:
        raise CheckpointError(f"Checkpoint '{checkpoint}' cannot be rebuilt: {e}") from None
    except (RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"Checkpoint '{checkpoint}' does not match its model: {str(e)[:300]}. The file is damaged.") from None
    model.eval()
    ckpt["config_obj"] = cfg
    return model, ckpt


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
