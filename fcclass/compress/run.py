"""`fcclass compress`: a smaller, faster copy of a trained run, in a new run directory of its own.

Pruning (compress.pruning) and its optional fine-tuning make the float model; int8 quantization (compress.quantize)
makes an ONNX Runtime model from it. The new run has its own config (with the pruned sizes), classes, splits and
best.pt, so eval, predict, export, summary and resume treat it like any other run; with an int8 model,
``compress.json`` names it and eval, predict and export use it. Every figure of the before/after table is measured
here, on the run's own test split and on this machine's CPU.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from fcclass.compress.finetune import CompressInterrupted, check_overrides, finetune, finetune_config
from fcclass.compress.pruning import check_fraction, nonzero_parameters, prune_units, prune_weights
from fcclass.compress.quantize import calibration_notes, quantize_int8
from fcclass.config.sections import Config
from fcclass.data import Dataset, make_loader
from fcclass.data import data_root as data_location
from fcclass.errors import CheckpointError, FcclassError
from fcclass.files import RunWriteError, os_error_reason, write_json
from fcclass.inference.load import Inference, load_for_inference
from fcclass.inference.metrics import Score, rounded, score
from fcclass.inference.onnx import INT8_MODEL, OnnxNet
from fcclass.model.network import Network
from fcclass.runs.checkpoint import Checkpoint, lock_run
from fcclass.runs.create import create_run_dir, start_run
from fcclass.runs.layout import BEST, COMPRESSED, LOCK, SPLITS, SUMMARY
from fcclass.runs.splits import read_splits
from fcclass.runs.summary import Summary, TestFigures, command_line, now, read_summary, write_summary


@dataclass
class Row:
    """One model of the before/after table."""

    model: str  # "original", "pruned", "pruned + fine-tuned", "int8"
    runtime: str  # "torch fp32", "onnxruntime fp32", "onnxruntime int8"
    file: str
    file_bytes: int
    parameters: int
    nonzero_parameters: int
    test_accuracy: float | None  # on the run's test split, 0..1
    latency_ms_batch1: float  # per image
    latency_ms_batch256: float  # per image, in batches of 256


@dataclass
class CompressResult:
    source: str
    run_dir: str
    options: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    pruned_layers: dict[str, list[int]] = field(default_factory=dict)  # structured: layer -> [before, after]
    conv_layers: list[str] = field(default_factory=list)  # those of pruned_layers that are Conv2D (filters, not units)
    zeroed_weights: int = 0  # unstructured
    finetune: dict[str, Any] | None = None
    threads: int = 1
    test_images: int = 0
    started: str = ""
    clock: float = field(default=0.0, repr=False)
    notes: list[str] = field(default_factory=list)

    def change(self) -> dict[str, float]:
        """The compressed model (the last row) against the original in torch (the first): times smaller on disk,
        times faster per image, test accuracy gained (negative: lost) in points."""
        first, last = self.rows[0], self.rows[-1]
        return {"smaller_on_disk": round(first.file_bytes / last.file_bytes, 2),
                "faster_batch1": round(first.latency_ms_batch1 / last.latency_ms_batch1, 2),
                "faster_batch256": round(first.latency_ms_batch256 / last.latency_ms_batch256, 2),
                "accuracy_points": round(100 * ((last.test_accuracy or 0.0) - (first.test_accuracy or 0.0)), 2)}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("clock")
        return data | {"change": self.change()}


@dataclass
class Options:
    prune: float | None = None
    structured: bool = False
    conv: bool = False
    finetune: int = 0
    quantize: str | None = None
    calibration: int = 1000
    rounds: int = 3  # latency: the median of this many timing rounds per model

    def check(self) -> None:
        self.quantize = self.quantize.lower() if self.quantize else None
        if self.quantize not in (None, "int8"):
            raise FcclassError(f"--quantize takes int8 (ONNX Runtime static quantization), not '{self.quantize}'.")
        if self.prune is not None:
            check_fraction(self.prune)
        if self.prune is None and (self.structured or self.conv or self.finetune):
            flag = "--structured" if self.structured else "--conv" if self.conv else "--finetune"
            raise FcclassError(f"{flag} goes with --prune FRACTION (it says how pruning is done or recovered from).")
        if self.prune is None and self.quantize is None:
            raise FcclassError("Nothing to do: give --prune FRACTION (e.g. --prune 0.5 --structured) and/or --quantize int8.")
        if self.rounds < 1:
            raise FcclassError("--rounds takes the number of timing rounds per model (at least 1; default 3).")
        if self.calibration < 1:
            raise FcclassError("--calibration takes the number of training images to calibrate int8 ranges on, e.g. 1000.")


def compress(run: str | Path | None, options: Options, *, out: str | Path | None = None, runs_dir: str | Path = "runs",
             data_root: str | Path | None = None, overrides: Sequence[str] = (), console: Any = None,
             progress: Any = None) -> CompressResult:
    """Compress the best model of ``run`` (default: the newest trained run) into a new run directory (``out``, or
    ``<runs folder>/<name>-compressed-<time>`` beside the source run) and measure it against the original."""
    options.check()
    check_overrides(options.finetune, overrides)
    started, clock = now(), time.monotonic()
    if run is not None and Path(run).is_file():
        raise FcclassError(f"'{run}' is a file; fcclass compress takes a run directory (the folder with config.yaml, best.pt "
                           f"and splits.json), e.g. fcclass compress {Path(run).parent}.")
    src = load_for_inference(run, runs_dir=runs_dir, device="cpu")
    if isinstance(src.model, OnnxNet):
        raise FcclassError(f"'{src.run_dir}' is already an int8 model; compress the run it was made from.")
    assert src.run_dir is not None  # a run was resolved, never a bare checkpoint file
    ds = src.dataset(("train", "val", "test"), data_root, progress=progress)
    result = CompressResult(str(src.run_dir), "", asdict(options), threads=torch.get_num_threads(),
                            started=started, clock=clock, notes=[*([src.note] if src.note else []), *ds.notes])
    if not options.quantize and options.calibration != Options.calibration and not options.structured:
        result.notes.append("--calibration is used by --quantize int8 and --structured only; it was ignored.")
    sample = training_sample(ds, options.calibration, src.config.seed)
    result.notes += calibration_notes(len(sample), options.calibration, options.structured, bool(options.quantize))
    cfg, model = _pruned(src, options, result, sample)
    target = _new_run_dir(out, src)
    result.run_dir = str(target)
    with _held(target):
        _make(target, src, cfg, model, options, ds, overrides, console, result, data_root, sample)
    return result


@contextmanager
def _held(target: Path) -> Iterator[None]:
    """The new run's lock (runs.lock_run) for as long as compress writes it: two compresses given one --out would
    otherwise both write into it, and both report success over a mix of their files."""
    try:
        lock = lock_run(target)
    except CheckpointError:
        raise RunWriteError(f"--out '{target}' is being written by another fcclass process right now; give another "
                            "folder (each compress writes a run of its own).") from None
    try:
        if any(p.name != LOCK for p in target.iterdir()):
            raise RunWriteError(f"--out '{target}' was filled by another fcclass process meanwhile; fcclass writes the new "
                                "run into a new (or empty) folder and never over anything. Give a new folder name.")
        yield
    finally:
        lock.close()


def _make(target: Path, src: Inference, cfg: Config, model: torch.nn.Module, options: Options, ds: Dataset,
          overrides: Sequence[str], console: Any, result: CompressResult, data_root: str | Path | None,
          sample: torch.Tensor) -> None:
    """Write the new run, measure it, and remove it again if that fails before anything slow to make was made."""
    try:
        _write_run(target, src, cfg, model, options, ds, overrides, console, result, data_root)
        small = load_for_inference(checkpoint=target / BEST, device="cpu")  # the new run's float model, from its file
        if options.quantize:
            _quantize(target, small, sample)
        _measure(src, small if options.prune is not None else None, target, ds, options, result, console)
        _summarize(target, src, small, result)
        write_json(target / COMPRESSED, result.to_dict())
    except BaseException as e:
        if not (options.finetune and (target / BEST).is_file() and (target / SUMMARY).is_file()):
            shutil.rmtree(target, ignore_errors=True)  # nothing that took long to make: leave no half-made run behind
            raise
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, CompressInterrupted):
            raise CompressInterrupted(f"Stopped before compress finished: {target} holds the fine-tuned model (best.pt), with no "
                                      f"int8 model or measurements; go on with `fcclass compress {target} --quantize int8`.") from None
        if isinstance(e, FcclassError):
            raise type(e)(f"{e} The fine-tuned model is kept in {target} (best.pt); compress it from there "
                          f"(e.g. `fcclass compress {target} --quantize int8`).") from None
        raise


def _summarize(target: Path, src: Inference, small: Inference, result: CompressResult) -> None:
    """The new run's summary.json, for `fcclass runs`: the fine-tuning's own record, or the source run's with this
    run's facts; either way its test accuracy is that of its deployed model (the table's last row)."""
    summary = read_summary(target)
    if summary is None:  # not fine-tuned
        summary = read_summary(src.run_dir) or Summary()
        summary.started, summary.ended, summary.state = result.started, now(), "finished"
        summary.wall_seconds, summary.command = round(time.monotonic() - result.clock, 1), command_line()
        summary.best = summary.last = summary.git = None  # the original's validation figures are not this model's
    last = result.rows[-1]
    counts = small.model.summary()  # Keras's counts, as fcclass summary and the table show them (BatchNorm statistics included)
    summary.name, summary.run_dir = f"{src.config.name}-compressed", str(target.absolute())
    summary.params, summary.trainable_params = counts.total_params, counts.trainable_params
    summary.test = TestFigures(accuracy=last.test_accuracy, images=result.test_images, model=last.model, runtime=last.runtime)
    summary.compressed = {"from": result.source, "change": result.change()}
    write_summary(target, summary)


def _pruned(src: Inference, options: Options, result: CompressResult, sample: torch.Tensor) -> tuple[Config, torch.nn.Module]:
    cfg, model = src.config, copy.deepcopy(src.model).float().eval()
    if options.prune is None:
        return cfg, model
    if options.structured:
        cfg, model, plan = prune_units(model, cfg, options.prune, options.conv, src.preprocess(sample))
        result.pruned_layers = {name: list(sizes) for name, sizes in plan.sizes.items()}
        names = [li.name for li in src.model.infos]
        result.conv_layers = [names[i] for i in plan.keep if src.config.model.layers[i].type == "Conv2D"]
        result.notes += [f"left whole: {why}" for why in plan.skipped]
    else:
        result.zeroed_weights = prune_weights(model, cfg, options.prune, options.conv)
        if result.zeroed_weights == 0:
            result.notes.append(f"No weight was zeroed: the model already has {options.prune:.0%} or more of its weights at zero.")
        result.notes.append("Unstructured pruning zeroes weights but keeps the model's shape, so its file is as large and "
                            "about as fast; --structured removes whole units for a smaller, faster model, and --quantize int8 "
                            "makes the file 4x smaller.")
    return cfg, model


def _new_run_dir(out: str | Path | None, src: Inference) -> Path:
    if out is None:
        return create_run_dir(src.run_dir.parent, f"{src.config.name}-compressed"[:100])
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(p.name != LOCK for p in path.iterdir())):  # .lock: see _held
        what = "a file" if not path.is_dir() else "a folder with files in it"
        raise RunWriteError(f"--out '{path}' is {what}; fcclass writes the new run into a new (or empty) folder and never "
                            "over anything. Give a new folder name.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunWriteError(f"Cannot create --out '{path}': {os_error_reason(e)}. Give a writable folder.") from None
    return path


def _write_run(target: Path, src: Inference, cfg: Config, model: torch.nn.Module, options: Options, ds: Dataset,
               overrides: Sequence[str], console: Any, result: CompressResult, data_root: str | Path | None) -> None:
    record = read_splits(src.run_dir)
    if record is None:
        raise FcclassError(f"'{src.run_dir}' has no {SPLITS}, so its test split is unknown; compress a run trained by this fcclass.")
    cfg = finetune_config(cfg, options.finetune, options.prune is not None and not options.structured, target.parent, overrides)
    if data_root is not None:  # the data moved: the new run records where it is now, as a resumed run does
        cfg = cfg.model_copy(update={"data": cfg.data.moved_to(data_root)})
        record.root = data_location(cfg.data)
    c = src.checkpoint
    best = None if options.finetune else Checkpoint(model_state=model.state_dict(), config=cfg.to_dict(), class_names=list(c.class_names),
                                                    input_shape=list(c.input_shape), mean=list(c.mean), std=list(c.std),
                                                    epoch=int(c.epoch), metrics=None)
    start_run(target, cfg, src.class_names, record, best=best)
    if options.finetune:
        result.finetune = finetune(target, cfg, model, src, ds, console)


def training_sample(ds: Dataset, n: int, seed: int) -> torch.Tensor:
    """``n`` training images drawn at random (fixed by the run's seed), uint8: they rank units for structured pruning
    and calibrate the int8 ranges."""
    train = ds.splits["train"]
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    loader = make_loader(train.subset(idx), 256, False, seed, ds.channels, ds.size)
    return torch.cat([x for x, _ in loader])


def _quantize(target: Path, small: Inference, sample: torch.Tensor) -> None:
    from fcclass.inference.export import describe, export_model

    with tempfile.TemporaryDirectory(prefix="fcclass-compress-") as tmp:
        float_onnx = export_model(checkpoint=target / BEST, out=Path(tmp) / "float.onnx").model
        quantize_int8(float_onnx, target / INT8_MODEL, sample.float().div_(255.0).numpy())
    sidecar = describe(small, "onnx", INT8_MODEL) | {"quantization": quantization_facts(len(sample))}
    write_json(target / (INT8_MODEL + ".json"), sidecar)


def quantization_facts(images: int) -> dict[str, Any]:
    from fcclass.compress import quantize

    return {"method": "ONNX Runtime static quantization, QDQ format", "weights": "int8, per output channel",
            "int8_operators": list(quantize.INT8_OPS),
            "activations": "uint8" if quantize.ACTIVATIONS == "QUInt8" else "int8", "calibration": quantize.CALIBRATION,
            "calibration_images": quantize.calibrated(images), "float_operators": "the others (normalisation, Relu, BatchNormalization, Softmax...)"}


Predict = Callable[[np.ndarray], np.ndarray]


def _torch_predict(inf: Inference) -> Predict:
    from fcclass.inference.export import Deployable

    model = Deployable(inf.model.float(), list(inf.checkpoint.mean), list(inf.checkpoint.std)).eval()

    def predict(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(pixels)).numpy()

    return predict


def _parameters(model: Network) -> tuple[int, int]:
    """Keras's count (fcclass summary's Total params, BatchNorm statistics included) and how many are non-zero."""
    return model.summary().total_params, nonzero_parameters(model)


def _measure(src: Inference, small: Inference | None, target: Path, ds: Dataset, options: Options, result: CompressResult,
             console: Any) -> None:
    """Every row of the table: size, parameters, test accuracy (all of the run's test split) and CPU latency."""
    from fcclass.inference.export import export_model

    loader = make_loader(ds.splits["test"], 500, False, 0, ds.channels, ds.size)
    batches = [(x.float().div_(255.0).numpy(), y.numpy()) for x, y in loader]
    result.test_images = sum(len(y) for _, y in batches)
    status = console.status("Measuring accuracy and latency...") if console is not None else nullcontext()
    with status, tempfile.TemporaryDirectory(prefix="fcclass-compress-") as tmp:
        models: list[tuple[Row, Predict]] = []
        counts = _parameters(src.model)
        models.append((_row("original", "torch fp32", src.path, counts), _torch_predict(src)))
        if options.quantize:  # the same float model in ONNX Runtime: what the runtime alone gives, before int8
            reference = export_model(checkpoint=src.path, out=Path(tmp) / "original.onnx").model
            row = _row("original", "onnxruntime fp32", reference, counts)
            row.file = "(exported for comparison, not kept)"
            models.append((row, OnnxNet(reference).probabilities))
        name = "pruned" + (" + fine-tuned" if options.finetune else "")
        if small is not None:
            counts = _parameters(small.model)
            models.append((_row(name, "torch fp32", target / BEST, counts), _torch_predict(small)))
        if options.quantize:
            int8 = target / INT8_MODEL
            models.append((_row(name + " + int8" if small is not None else "int8", "onnxruntime int8", int8, counts),
                           OnnxNet(int8).probabilities))
        for row, predict in models:
            row.test_accuracy = _accuracy(predict, batches)
        pixels = np.concatenate([x for x, _ in batches])[:256]
        for (row, _), (b1, b256) in zip(models, latencies([p for _, p in models], pixels, options.rounds)):
            row.latency_ms_batch1, row.latency_ms_batch256 = b1, b256
    result.rows = [row for row, _ in models]
    lost = -result.change()["accuracy_points"]
    if lost > 2.0:
        result.notes.append(f"Test accuracy fell by {lost:.1f} points: prune a smaller fraction"
                            + ("" if options.finetune else ", or fine-tune (--finetune 2)") + ".")


def _row(model: str, runtime: str, path: Path, counts: tuple[int, int]) -> Row:
    return Row(model, runtime, str(path), path.stat().st_size, counts[0], counts[1], None, 0.0, 0.0)


def _accuracy(predict: Predict, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    total = sum((score(torch.from_numpy(predict(x)).clamp_min(1e-30).log(), torch.from_numpy(y)) for x, y in batches), Score())  # log: OnnxNet's logits
    return rounded(total.accuracy) if total.images else 0.0


def latencies(predicts: Sequence[Predict], pixels: np.ndarray, rounds: int = 3) -> list[tuple[float, float]]:
    """Milliseconds per image at batch 1 and at batch 256 for each model, the median of ``rounds`` rounds. Each model
    is timed on its own, after a pause and a warm-up: the threads of the one before (OpenMP's, ONNX Runtime's) spin
    for a while after their last call, and timed alongside them a model runs up to twice as slow."""
    one, full = pixels[:1], pixels[:256]
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in predicts]
    for _ in range(rounds):
        for predict, (t1, t256) in zip(predicts, times):
            time.sleep(0.2)
            for _ in range(3):
                predict(one), predict(full)
            t1.append(_timed(predict, one, 100))
            t256.append(_timed(predict, full, 3) / len(full))
    return [(round(statistics.median(t1) * 1e3, 4), round(statistics.median(t256) * 1e3, 4)) for t1, t256 in times]


def _timed(predict: Predict, x: np.ndarray, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        predict(x)
    return (time.perf_counter() - started) / calls
