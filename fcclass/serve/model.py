"""The served model: a run loaded once through ``load_for_inference`` (in the runtime asked for), what ``/v1/info``
says about it, and the service's life: loading in the background (``/readyz`` says 503 until it is done), then the
batching thread, closed on shutdown."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fcclass.errors import FcclassError

if TYPE_CHECKING:
    from fcclass.inference.load import Inference

RUNTIMES = ("torch", "onnx")


@dataclass(frozen=True)
class Limits:
    """What a request may hold and how it is batched (the command's options)."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_upload_mb: float = 20.0
    max_files: int = 64
    timeout_s: float = 30.0  # a request waiting longer for the model is answered 503, not left hanging

    def check(self) -> None:
        for name, value, low in (("--max-batch", self.max_batch, 1), ("--max-wait-ms", self.max_wait_ms, 0),
                                 ("--max-upload-mb", self.max_upload_mb, 0.001), ("--max-files", self.max_files, 1),
                                 ("--timeout", self.timeout_s, 0.001)):
            if not value >= low:
                raise FcclassError(f"{name} must be at least {low}, not {value}.")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass
class Served:
    inference: Inference
    runtime: str  # torch | onnx
    precision: str  # fp32 | bf16 | fp16 | int8
    model_file: Path
    sha256: str

    def warm_up(self) -> None:
        """A prediction for a blank image, before the first client's: the first forward pass sets kernels up and the
        first prediction imports what it uses (together about 0.2 s on a CPU)."""
        import torch

        from fcclass.inference.predict import labelled

        logits = self.inference.logits(torch.zeros(1, *self.inference.image_shape, dtype=torch.uint8))
        labelled(["blank"], logits, self.inference.class_names, 1)

    def info(self) -> dict[str, Any]:
        from fcclass.inference.export import describe

        inf = self.inference
        described = describe(inf, "onnx", self.model_file.name)["input"]
        return {"labels": inf.class_names, "input_shape": list(inf.image_shape), "preprocessing": described["preprocessing"],
                "normalization": described["normalization_inside_model"], "run": str(inf.run_dir.absolute()) if inf.run_dir else None,
                "model_file": str(self.model_file.absolute()), "model_sha256": self.sha256, "runtime": self.runtime,
                "precision": self.precision, "device": str(inf.device), "report": "/report" if self.report_file() else None}

    def report_file(self) -> Path | None:
        """The run's `fcclass report` page (report.html), when one has been written."""
        from fcclass.runs.layout import REPORT

        run_dir = self.inference.run_dir
        path = run_dir / REPORT if run_dir is not None else None
        return path if path is not None and path.is_file() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_runtime(runtime: str | None) -> None:
    if runtime is not None and runtime not in RUNTIMES:
        raise FcclassError(f"--runtime must be {' or '.join(RUNTIMES)}, not '{runtime}'.")


def load_served(run: str | Path | None, runtime: str | None = None, *, runs_dir: str | Path = "runs",
                device: str = "auto", threads: int | None = None) -> Served:
    """The run's model as ``fcclass predict`` uses it (``runtime`` None: a compressed run's int8 ONNX model, else the
    PyTorch checkpoint), or in the runtime asked for: torch (a compressed run's float weights) or onnx (a compressed
    run's int8 model, else the run's model.onnx written by ``fcclass export``). ``threads``: the model's threads
    (PyTorch's, and ONNX Runtime's, which takes PyTorch's number); None leaves PyTorch's setting."""
    import torch

    from fcclass.device import precision_name
    from fcclass.inference.export import FORMATS
    from fcclass.inference.load import load_for_inference, with_onnx_model
    from fcclass.inference.onnx import INT8_MODEL, OnnxNet

    check_runtime(runtime)
    if threads is not None:
        torch.set_num_threads(threads)
    inf = load_for_inference(run, runs_dir=runs_dir, device=device)
    inf.image_shape  # noqa: B018 - refuses a model trained on feature vectors
    if runtime == "torch" and isinstance(inf.model, OnnxNet):
        note = inf.note
        inf = load_for_inference(run=None, checkpoint=inf.path, device=device)
        inf.note = note
    if runtime == "onnx" and not isinstance(inf.model, OnnxNet):
        where = inf.run_dir if inf.run_dir is not None else inf.path.parent
        path = where / FORMATS["onnx"]
        if not path.is_file():
            raise FcclassError(f"--runtime onnx: {where} has no ONNX model ({path} not found). Write it with `fcclass export {where}`, "
                               f"or compress the run to int8 with `fcclass compress {where} --quantize int8` and serve the compressed run.")
        if path.stat().st_mtime < inf.path.stat().st_mtime:
            raise FcclassError(f"--runtime onnx: {path} is older than the run's checkpoint {inf.path} (trained further since it "
                               f"was exported). Export it again with `fcclass export {where}`.")
        inf = with_onnx_model(inf, path, f"Model: {path} (ONNX Runtime on the CPU)")
    if isinstance(inf.model, OnnxNet):
        model_file = Path(inf.model.path)
        return Served(inf, "onnx", "int8" if model_file.name == INT8_MODEL else "fp32", model_file, _sha256(model_file))
    return Served(inf, "torch", precision_name(inf.amp_dtype), inf.path, _sha256(inf.path))


@dataclass
class Service:
    """The server's model: loading (in a thread, so that /healthz and /readyz answer meanwhile), ready, or failed."""

    load: Callable[[], Served]
    limits: Limits = field(default_factory=Limits)
    served: Served | None = None
    batcher: Any = None
    error: BaseException | None = None
    loaded: threading.Event = field(default_factory=threading.Event)  # set when loading ends, well or not

    @property
    def state(self) -> str:
        return "ready" if self.served is not None else "failed" if self.error is not None else "loading"

    def start(self, done: Callable[[Service], None] = lambda s: None) -> None:
        """Load the model in a thread; ``done`` is called there when that ends (``state``: ready or failed)."""
        threading.Thread(target=self._load, args=(done,), name="fcclass-load", daemon=True).start()

    def _load(self, done: Callable[[Service], None]) -> None:
        from fcclass.serve.batching import Batcher

        try:
            served = self.load()
            served.warm_up()
            self.batcher = Batcher(served.inference.logits, self.limits.max_batch, self.limits.max_wait_ms / 1000)
            self.served = served
        except BaseException as e:  # noqa: B036 - reported by the command (an FcclassError as usual); the server stops
            self.error = e
        self.loaded.set()
        done(self)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close(timeout=self.limits.timeout_s)
