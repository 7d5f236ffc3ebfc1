"""Prediction on image files, or on a split the run recorded, with exactly the preprocessing the model was trained
with (both through ``load_for_inference``)."""

from __future__ import annotations

import glob
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from fcclass.data import decode_resized, decode_threads, is_image_name, list_images, load_resized, make_loader
from fcclass.errors import DataError, FcclassError
from fcclass.inference.evaluate import read_part
from fcclass.inference.load import Inference, load_for_inference
from fcclass.inference.metrics import Score, ranked, rounded, score


@dataclass
class Prediction:
    path: str
    label: str | None = None
    probability: float | None = None
    top_k: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    true_label: str | None = None  # predictions on a recorded split know the answer

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        out = {"path": self.path, "label": self.label, "probability": self.probability, "top_k": self.top_k}
        return out | ({"true_label": self.true_label} if self.true_label is not None else {})


@dataclass
class PredictSummary:
    """What a prediction comes to: how many inputs, how many failed, the top-1 predictions per label and, where the
    true labels are known (a recorded split; a folder of label folders), the top-1 accuracy, scored as eval scores."""

    images: int = 0  # inputs: files given or found, the unreadable ones included
    failed: int = 0  # inputs that could not be read (or were not found)
    counts: dict[str, int] = field(default_factory=dict)  # top-1 predictions per label, every label of the model
    score: Score = field(default_factory=Score)  # against the true labels, of the images that have one
    skipped: list[tuple[str, str]] = field(default_factory=list)  # a recorded split: files left out as unreadable, why
    notes: list[str] = field(default_factory=list)  # about the recorded split's data (changed, added, skipped files)

    @property
    def accuracy(self) -> float | None:
        return self.score.accuracy if self.score.images else None

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "failed": self.failed, "predicted": self.counts, "labelled": self.score.images,
                "accuracy": rounded(self.accuracy) if self.accuracy is not None else None, "skipped": len(self.skipped)}


def summarize(preds: Sequence[Prediction], names: list[str], total: Score) -> PredictSummary:
    counts = dict.fromkeys(names, 0)
    for p in preds:
        if p.label is not None:
            counts[p.label] += 1
    return PredictSummary(len(preds), sum(p.error is not None for p in preds), counts, total)


def folder_labels(inputs: Sequence[str | Path], names: list[str]) -> dict[Path, str]:
    """The true label of the images under each folder given whose sub-folders are all named after labels of the model
    (an image folder's test/ part, say): the name of the sub-folder they are in. Keyed by resolved path."""
    out: dict[Path, str] = {}
    for item in inputs:
        folder = Path(item)
        if not folder.is_dir():
            continue
        subs = [d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
        if not subs or any(name not in names for name in subs):
            continue
        for f in list_images(folder):
            parts = f.relative_to(folder).parts
            if len(parts) > 1:
                out[f.resolve()] = parts[0]
    return out


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
            files = [m for m in sorted(Path(m) for m in glob.glob(str(item), recursive=True)) if m.is_file() and is_image_name(m)]
            for f in files:
                add(f)
            if not files:
                out.append((p, "file not found (and no image files match it as a pattern)"))
        else:
            out.append((p, "file not found"))
    return out


def _fill(preds: Sequence[Prediction], logits: torch.Tensor, names: list[str], k: int) -> None:
    """The ``k`` most probable labels of each image, ranked by logit with argmax's rule for ties (the first label), so
    that the top one is the prediction eval and compress count (inference.metrics.predicted)."""
    top_i = ranked(logits, k)
    top_p = torch.softmax(logits, dim=1).gather(1, top_i)
    for pred, ps, idx in zip(preds, top_p.tolist(), top_i.tolist()):
        pred.top_k = [{"label": names[i], "probability": rounded(p)} for p, i in zip(ps, idx)]
        pred.label, pred.probability = names[idx[0]], pred.top_k[0]["probability"]


def labelled(paths: Sequence[str], logits: torch.Tensor, names: list[str], top_k: int) -> list[Prediction]:
    """Predictions named ``paths`` from their images' logits, as ``predict`` gives them (a server's, say)."""
    if top_k < 1:
        raise FcclassError("top_k must be at least 1.")
    preds = [Prediction(path) for path in paths]
    _fill(preds, logits, names, min(top_k, len(names)))
    return preds


def decode_upload(inf: Inference, data: bytes, name: str) -> torch.Tensor:
    """An image file's bytes as ``predict`` reads the file: uint8 (C, H, W) at the model's input size. Raises
    DataError starting with ``name``."""
    channels, height, width = inf.image_shape
    return decode_resized(data, name, channels, (height, width))


def _decoded(inf: Inference, entries: list[Path | tuple[Path, str]], batch_size: int,
             truth: dict[Path, str]) -> Iterator[tuple[list[Prediction], list[torch.Tensor]]]:
    """Chunks of (predictions, images to run): files decoded on threads (Pillow releases the GIL)."""
    channels, height, width = inf.image_shape

    def decode(path: Path) -> torch.Tensor | str:
        try:
            return load_resized(path, channels, (height, width))
        except DataError as e:
            return str(e).removeprefix(f"{path}: ")

    with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
        for start in range(0, len(entries), batch_size):
            chunk = entries[start : start + batch_size]
            files = [e for e in chunk if not isinstance(e, tuple)]
            decoded = dict(zip(files, pool.map(decode, files)))
            preds, images = [], []
            for entry in chunk:
                if isinstance(entry, tuple):
                    preds.append(Prediction(str(entry[0]), error=entry[1]))
                    continue
                img = decoded[entry]
                preds.append(Prediction(str(entry), error=img if isinstance(img, str) else None,
                                        true_label=truth.get(entry.resolve()) if truth else None))
                if not isinstance(img, str):
                    images.append(img)
            yield preds, images


def predict(inputs: Sequence[str | Path], run: str | Path | None = None, checkpoint: str | Path | None = None, *,
            top_k: int = 3, runs_dir: str | Path = "runs", batch_size: int = 256, device: str = "auto",
            model: Inference | None = None) -> list[Prediction]:
    """Predict each image; unreadable files get a Prediction with ``error`` set and don't stop the others."""
    return predict_with_summary(inputs, run, checkpoint, top_k=top_k, runs_dir=runs_dir, batch_size=batch_size,
                                device=device, model=model)[0]


def predict_with_summary(inputs: Sequence[str | Path], run: str | Path | None = None, checkpoint: str | Path | None = None, *,
                         top_k: int = 3, runs_dir: str | Path = "runs", batch_size: int = 256, device: str = "auto",
                         model: Inference | None = None) -> tuple[list[Prediction], PredictSummary]:
    """``predict`` and its summary. Images in a folder of label folders (folder_labels) get their true label."""
    if top_k < 1:
        raise FcclassError("--top-k must be at least 1.")
    inf = model or load_for_inference(run, checkpoint, runs_dir=runs_dir, device=device)
    inf.image_shape  # noqa: B018 - refuses a model trained on feature vectors
    names, k = inf.class_names, min(top_k, len(inf.class_names))
    truth = folder_labels(inputs, names)
    results: list[Prediction] = []
    total = Score()
    for preds, images in _decoded(inf, expand_inputs(inputs), batch_size, truth):
        results += preds
        if images:
            read = [p for p in preds if p.error is None]
            logits = inf.logits(torch.stack(images))
            _fill(read, logits, names, k)
            known = [j for j, p in enumerate(read) if p.true_label is not None]
            if known:
                total += score(logits[known], torch.tensor([names.index(read[j].true_label or "") for j in known]))
    return results, summarize(results, names, total)


def predict_split(split: str, run: str | Path | None = None, checkpoint: str | Path | None = None, *, top_k: int = 3,
                  runs_dir: str | Path = "runs", batch_size: int = 256, device: str = "auto", data_root: str | Path | None = None,
                  allow_changed_data: bool = False, model: Inference | None = None) -> list[Prediction]:
    """Predict every image of a split the run recorded (train, val or test), each with its true label. Image-folder
    predictions are named by file; torchvision datasets' by their index there, e.g. ``fashion_mnist:train[4127]``."""
    return predict_split_with_summary(split, run, checkpoint, top_k=top_k, runs_dir=runs_dir, batch_size=batch_size, device=device,
                                      data_root=data_root, allow_changed_data=allow_changed_data, model=model)[0]


def predict_split_with_summary(split: str, run: str | Path | None = None, checkpoint: str | Path | None = None, *, top_k: int = 3,
                               runs_dir: str | Path = "runs", batch_size: int = 256, device: str = "auto",
                               data_root: str | Path | None = None, allow_changed_data: bool = False,
                               model: Inference | None = None) -> tuple[list[Prediction], PredictSummary]:
    """``predict_split`` and its summary (the split's notes and its files left out as unreadable included)."""
    if split not in ("train", "val", "test"):
        raise FcclassError(f"--split must be train, val or test, not '{split}'.")
    inf = model or load_for_inference(run, checkpoint, runs_dir=runs_dir, device=device)
    ds = inf.dataset((split,), data_root, allow_changed_data)
    part, names = ds.splits[split], inf.class_names
    loader = make_loader(part, batch_size, False, inf.config.seed, ds.channels, ds.size, num_workers=inf.config.data.num_workers,
                         skip=inf.config.data.on_unreadable == "skip")
    logits, labels = inf.run_loader(loader)
    part, found = read_part(part, loader, ds)
    paths = part.names or ([str(f) for f in part.files] if part.files is not None else [f"{ds.name}:{split}[{i}]" for i in range(len(part))])
    preds = [Prediction(path, true_label=names[int(y)]) for path, y in zip(paths, labels.tolist())]
    _fill(preds, logits, names, min(top_k, len(names)))
    summary = summarize(preds, names, score(logits, labels))
    summary.skipped = [(str(path), why) for path, why in ds.skipped]
    summary.notes = [n for n in (*ds.notes, found) if n]
    return preds, summary


def predictions_csv(preds: list[Prediction], top_k: int) -> str:
    """One row per input: path, label, probability, error, [true_label,] then top{i}_label / top{i}_probability."""
    import csv
    import io

    truth = any(p.true_label is not None for p in preds)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["path", "label", "probability", "error", *(["true_label"] if truth else [])]
    for i in range(1, top_k + 1):
        header += [f"top{i}_label", f"top{i}_probability"]
    writer.writerow(header)
    for p in preds:
        row: list[Any] = [p.path, p.label or "", "" if p.probability is None else f"{p.probability:.6f}", p.error or ""]
        row += [p.true_label or ""] if truth else []
        for t in p.top_k[:top_k]:
            row += [t["label"], f"{t['probability']:.6f}"]
        writer.writerow(row + [""] * (len(header) - len(row)))
    return buf.getvalue()
