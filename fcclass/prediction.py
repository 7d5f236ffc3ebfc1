"""Prediction on image files with exactly the preprocessing the model was trained with."""

from __future__ import annotations

import glob
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from fcclass.data import BatchPreprocess, list_images, load_resized
from fcclass.device import select_device
from fcclass.errors import DataError, FcclassError
from fcclass.runs import load_trained, resolve_checkpoint


@dataclass
class Prediction:
    path: str
    label: str | None = None
    probability: float | None = None
    top_k: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "label": self.label, "probability": self.probability, "top_k": self.top_k}


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path | tuple[Path, str]]:
    """Files as given, folders recursively, globs expanded; missing ones become (path, error) entries."""
    out: list[Path | tuple[Path, str]] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:  # a file named twice (say by its folder and a glob) is predicted once
            seen.add(key)
            out.append(path)

    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                out.append((p, "folder has no image files"))
            for f in found:
                add(f)
        elif p.exists():
            add(p)
        elif glob.has_magic(str(item)):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            files = [m for m in matches if m.is_file()]
            for f in files:
                add(f)
            if not files:
                out.append((p, "file not found (and no files match it as a pattern)"))
        else:
            out.append((p, "file not found"))
    return out


def predict(inputs: Sequence[str | Path], run: str | Path | None = None, checkpoint: str | Path | None = None, *,
            top_k: int = 3, runs_dir: str | Path = "runs", batch_size: int = 256, device: str = "auto") -> list[Prediction]:
    """Predict each image; unreadable files get a Prediction with ``error`` set and don't stop the others."""
    if top_k < 1:
        raise FcclassError("--top-k must be at least 1.")
    path = resolve_checkpoint(run, checkpoint, runs_dir)
    model, ckpt = load_trained(path)
    names = list(ckpt["class_names"])
    shape = [int(s) for s in ckpt["input_shape"]]
    if len(shape) != 3:
        raise FcclassError(f"Checkpoint '{path}' was trained on feature vectors {shape}, not images; predict needs an image model.")
    channels, height, width = shape
    dev = select_device(device)
    model.to(dev)
    prep = BatchPreprocess(ckpt["mean"], ckpt["std"])
    k = min(top_k, len(names))

    results: list[Prediction] = []
    pending: list[tuple[Prediction, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([t for _, t in pending]).to(dev)
        with torch.inference_mode():
            probs = model.predict_proba(prep(batch)).cpu()
        top_p, top_i = probs.topk(k, dim=1)
        for (pred, _), ps, idx in zip(pending, top_p.tolist(), top_i.tolist()):
            pred.top_k = [{"label": names[i], "probability": round(p, 6)} for p, i in zip(ps, idx)]
            pred.label, pred.probability = names[idx[0]], pred.top_k[0]["probability"]
        pending.clear()

    def decode(path: Path) -> torch.Tensor | str:
        try:
            return load_resized(path, channels, (height, width))
        except DataError as e:
            return str(e).removeprefix(f"{path}: ")

    entries = expand_inputs(inputs)
    # Pillow releases the GIL while decoding, so threads overlap the file reading and decoding.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        for start in range(0, len(entries), batch_size):
            chunk = entries[start : start + batch_size]
            files = [e for e in chunk if not isinstance(e, tuple)]
            decoded = dict(zip(files, pool.map(decode, files)))
            for entry in chunk:
                if isinstance(entry, tuple):
                    results.append(Prediction(str(entry[0]), error=entry[1]))
                    continue
                pred = Prediction(str(entry))
                results.append(pred)
                img = decoded[entry]
                if isinstance(img, str):
                    pred.error = img
                else:
                    pending.append((pred, img))
            flush()
    return results


def predictions_csv(preds: list[Prediction], top_k: int) -> str:
    """One row per input: path, label, probability, error, then top{i}_label / top{i}_probability."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["path", "label", "probability", "error"]
    for i in range(1, top_k + 1):
        header += [f"top{i}_label", f"top{i}_probability"]
    writer.writerow(header)
    for p in preds:
        row: list[Any] = [p.path, p.label or "", "" if p.probability is None else f"{p.probability:.6f}", p.error or ""]
        for t in p.top_k[:top_k]:
            row += [t["label"], f"{t['probability']:.6f}"]
        writer.writerow(row + [""] * (len(header) - len(row)))
    return buf.getvalue()
