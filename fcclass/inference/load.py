"""One way to load a trained model for inference: checkpoint -> model on its device, precision, preprocessing,
label names, config and the run's recorded data. Evaluation, prediction and export all go through
``load_for_inference``, so they cannot drift apart."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from fcclass.config.load import config_from_dict
from fcclass.config.sections import Config
from fcclass.data import BatchPreprocess, Dataset, dataset_from_record, load_dataset
from fcclass.device import autocast, select_device, select_precision
from fcclass.errors import CheckpointError, DataError, FcclassError
from fcclass.model.network import Network, build_model
from fcclass.runs.checkpoint import Checkpoint, resolve_checkpoint, untrained_message
from fcclass.runs.layout import COMPRESSED
from fcclass.runs.splits import read_splits

# The precision every evaluation runs in: eval, predict, export, and training's validation and test passes, so that the
# best epoch's val accuracy is what `fcclass eval --split val` gives on best.pt (bf16 autocast moves it by a few images).
INFERENCE_PRECISION = "fp32"


@contextmanager
def _exact_fp32(device: torch.device, amp_dtype: torch.dtype | None) -> Iterator[None]:
    """fp32 on an NVIDIA GPU means fp32: PyTorch lets cuDNN convolutions use TF32 by default, which moves
    probabilities in the fourth decimal against the CPU and the exported model."""
    if device.type != "cuda" or amp_dtype is not None:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run_model(model: Network, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], prep: BatchPreprocess,
              device: torch.device, amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels for every batch of ``loader``, in order, in eval mode, under ``amp_dtype``
    autocast (None: fp32; ``inference_dtype`` gives the one evaluation uses)."""
    was_training = model.training
    model.eval()
    outs, labels = [], []
    with torch.inference_mode(), _exact_fp32(device, amp_dtype):
        for x, y in loader:
            with autocast(device, amp_dtype):
                logits = model(prep(x.to(device, non_blocking=True)))
            outs.append(logits.float().cpu())
            labels.append(y.cpu())
    model.train(was_training)
    if not outs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(labels)


def inference_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of INFERENCE_PRECISION on ``device`` (None: fp32)."""
    return select_precision(INFERENCE_PRECISION, device)


@dataclass
class Inference:
    model: Network  # in eval mode, on ``device``
    checkpoint: Checkpoint
    path: Path  # the checkpoint file
    run_dir: Path | None  # None for a checkpoint file outside a run directory
    config: Config
    device: torch.device
    amp_dtype: torch.dtype | None
    preprocess: BatchPreprocess
    note: str | None = None  # how the run was chosen ("the newest trained run ...")

    @property
    def class_names(self) -> list[str]:
        return list(self.checkpoint.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        shape = [int(s) for s in self.checkpoint.input_shape]
        if len(shape) != 3:
            raise FcclassError(f"'{self.path}' was trained on feature vectors {shape}, not images; this needs an image model.")
        return shape[0], shape[1], shape[2]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) images -> float32 logits on the CPU."""
        return run_model(self.model, [(images, torch.zeros(0))], self.preprocess, self.device, self.amp_dtype)[0]

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(images), dim=1)

    def run_loader(self, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels for every batch of ``loader`` (a recorded split's), in order."""
        try:
            return run_model(self.model, loader, self.preprocess, self.device, self.amp_dtype)
        except DataError as e:  # a file of the split that cannot be decoded now
            raise DataError(f"{e} To go on without them, remove them and pass --allow-changed-data.") from None

    def dataset(self, splits: Sequence[str], data_root: str | Path | None = None, allow_changed: bool = False,
                progress: Any = None) -> Dataset:
        """The run's recorded splits, read from the data as it is now (``data_root``: where the data is now;
        ``progress``: a data.cache.Progress shown while an image folder is decoded into its cache)."""
        record = read_splits(self.run_dir) if self.run_dir is not None else None
        if record is not None:
            try:
                ds = dataset_from_record(self.config.data, record, splits, root=data_root, allow_changed=allow_changed,
                                         fetch=data_root is None, progress=progress)  # never unpack or download into a folder named by --data-root
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                raise CheckpointError(f"The run's splits.json ({record.dataset}) does not fit its checkpoint '{self.path}' "
                                      f"({self.config.data.dataset}; {type(e).__name__}: {str(e)[:100]}): the files come from "
                                      "different runs. Put the run's own best.pt and splits.json back together.") from None
        else:
            ds = self._redraw(splits, data_root)
        if ds.info.class_names != self.class_names:
            raise DataError(f"The data's labels {ds.info.class_names} differ from the model's {self.class_names}; "
                            "evaluate on the dataset the model was trained on.")
        return ds

    def _redraw(self, splits: Sequence[str], data_root: str | Path | None) -> Dataset:
        """No recorded splits (a checkpoint file on its own, or a run made before fcclass recorded them): draw them
        again from the config, as that run's training did."""
        update: dict[str, Any] = {}
        if data_root is not None:
            update[self.config.data.location_key] = str(data_root)
        if len(self.checkpoint.input_shape) == 3:
            c, h, w = self.image_shape
            update |= {"channels": c, "image_size": [h, w]}
        ds = load_dataset(self.config.data.model_copy(update=update), self.config.seed, splits)
        if self.config.data.dataset == "imagefolder":
            ds.notes.append("This run has no recorded splits (no splits.json: made by an earlier fcclass, or a checkpoint file "
                            "on its own), so the split was drawn again from the folder as it is now; if files were added or "
                            "removed since training, it is not the split the model was tested against.")
        return ds


def load_for_inference(run: str | Path | None = None, checkpoint: str | Path | None = None, *, runs_dir: str | Path = "runs",
                       device: str = "auto", precision: str = INFERENCE_PRECISION) -> Inference:
    """The trained model of ``run`` (its best checkpoint), of the file ``checkpoint``, or of the newest trained run.

    ``precision``: fp32 by default, so that evaluation, prediction and an exported model give the same probabilities
    on any device (bf16 autocast on a GPU moves them in the third decimal); auto, bf16 or fp16 trade that for speed."""
    dev = select_device(device)  # a bad --device is named before anything is looked for
    resolved = resolve_checkpoint(run, checkpoint, runs_dir)
    ckpt = Checkpoint.load(resolved.checkpoint)
    if int(ckpt.epoch) < 1:
        raise CheckpointError(untrained_message(resolved.run_dir) if resolved.run_dir is not None else
                              f"Checkpoint '{resolved.checkpoint}' holds untrained weights (epoch 0: saved when its run started, "
                              "before any epoch completed). Resume that run with `fcclass train --resume RUN_DIR`, or use another checkpoint.")
    cfg, model = rebuild(ckpt, resolved.checkpoint)
    loaded = Inference(model.to(dev).eval(), ckpt, resolved.checkpoint, resolved.run_dir, cfg, dev,
                       select_precision(precision, dev), BatchPreprocess(ckpt.mean, ckpt.std), resolved.note)
    if checkpoint is None and resolved.run_dir is not None:
        from fcclass.inference.onnx import INT8_MODEL

        int8 = resolved.run_dir / INT8_MODEL
        # A run made by `fcclass compress --quantize int8`: its model is the int8 one. compress.json is written last,
        # so a compression that did not finish is never used.
        if int8.is_file() and (resolved.run_dir / COMPRESSED).is_file():
            return with_onnx_model(loaded, int8, f"Model: {int8} (int8, ONNX Runtime on the CPU); its float weights: "
                                                 f"--checkpoint {resolved.run_dir / 'best.pt'}")
    return loaded


def with_onnx_model(inf: Inference, path: Path, said: str) -> Inference:
    """``inf`` with its model replaced by the ONNX file ``path`` (an int8 model of compress, or export's model.onnx:
    pixels in [0, 1] in, probabilities out), run by ONNX Runtime on the CPU; ``said`` is added to its note. The model
    must take the run's images and give its classes' scores (OnnxNet.check_fits)."""
    from fcclass.inference.onnx import OnnxNet

    net = OnnxNet(path)
    net.check_fits(inf.checkpoint.input_shape, inf.class_names, inf.run_dir or path.parent)
    return Inference(net, inf.checkpoint, inf.path, inf.run_dir, inf.config, torch.device("cpu"), None,
                     BatchPreprocess([], []), f"{inf.note}. {said}" if inf.note else said)


def rebuild(ckpt: Checkpoint, path: Path) -> tuple[Config, Network]:
    """The checkpoint's config and model, with its weights loaded (on the CPU). The model is built on the meta
    device and takes the checkpoint's tensors as they are: nothing is allocated for weights that a damaged or
    tampered config could make any size."""
    try:
        cfg = config_from_dict(ckpt.config, source=f"config in {path}", stored=True)
        model = build_model(cfg.model, ckpt.input_shape, len(ckpt.class_names), device="meta")
        model.load_state_dict(ckpt.model_state, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise ValueError("some of the model's tensors are not in the checkpoint")
        if model.channels_last:
            model.to(memory_format=torch.channels_last)
    except FcclassError as e:
        raise CheckpointError(f"Checkpoint '{path}' cannot be rebuilt: {e}") from None
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"Checkpoint '{path}' does not match its model: {str(e)[:300]}. The file is damaged.") from None
    return cfg, model
