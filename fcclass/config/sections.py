"""The typed, validated config: pydantic v2 models, safe YAML loading and ``--set`` overrides.

Everything downstream takes these objects, never raw dicts. Unknown keys are errors with a
did-you-mean, and every problem in a file is reported at once with its full dotted path (worded by
config_errors.py). The layer config classes live in layers.py and are re-exported here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Iterable, Literal

import yaml
from pydantic import (
    BeforeValidator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fcclass.config.errors import short
from fcclass.config.layers import (
    Activation,
    LayerSpec,
)
from fcclass.config.registries import DATASETS, LAYER_ALIASES, OPTIMIZER_SHARED_KEYS, OPTIMIZERS, SCHEDULER_SHARED_KEYS, SCHEDULERS, Choice
from fcclass.config.schema import Size2, Strict
from fcclass.config.sweep import SweepConfig

Monitor = Literal["val_loss", "val_accuracy"]
Activation_ = Activation  # the layer's former name here, kept for imports written against it


# ----------------------------------------------------------------------------- model
LayerNames = Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]], Field(max_length=10_000)]


def _init_from(value: Any) -> Any:
    """``init_from: RUN_DIR`` is short for ``init_from: {path: RUN_DIR}``."""
    return {"path": value} if isinstance(value, str) else value


class InitFromConfig(Strict):
    """Weights from another run (fcclass.model.init_from): its best.pt, or a checkpoint file."""

    path: Annotated[str, Field(min_length=1)] | None = None  # a run directory (its best.pt) or a checkpoint file; --init-from sets it
    layers: LayerNames | None = None  # load only these layers (their names in this model); None: every one that fits
    exclude: LayerNames = []  # never load these, e.g. [dense_1] to train a new classifier
    freeze: bool = False  # the layers loaded stay fixed (as trainable: false) until train.unfreeze


class ModelConfig(Strict):
    input_shape: Annotated[list[PositiveInt], Field(min_length=1, max_length=3)] | None = None
    layers: Annotated[list[LayerSpec], Field(min_length=1)]
    init_from: Annotated[InitFromConfig | None, BeforeValidator(_init_from)] = None

    def with_init_from(self, path: str | Path) -> "ModelConfig":
        """This config starting from ``path`` (`fcclass train --init-from`), keeping init_from's other keys."""
        current = self.init_from or InitFromConfig(path=str(path))
        return self.model_copy(update={"init_from": current.model_copy(update={"path": str(path)})})

    @field_validator("input_shape")
    @classmethod
    def _shape_rank(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(v) == 2:
            raise ValueError("must be [channels, height, width] or [features], e.g. [1, 28, 28] or [784]")
        return v

    @field_validator("layers", mode="before")
    @classmethod
    def _canonical_types(cls, layers: Any) -> Any:
        # Accept Keras aliases and any capitalisation (conv2d, MaxPool2D, dense...).
        if isinstance(layers, list):
            out = []
            for layer in layers:
                if isinstance(layer, dict) and isinstance(layer.get("type"), str):
                    canonical = LAYER_ALIASES.get(layer["type"].lower().replace("_", ""))
                    if canonical:
                        layer = {**layer, "type": canonical}
                out.append(layer)
            return out
        return layers


# ----------------------------------------------------------------------------- data
class NormalizeStats(Strict):
    mean: Annotated[list[float], Field(min_length=1, max_length=3)]
    std: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1, max_length=3)]

    @model_validator(mode="after")
    def _same_length(self) -> "NormalizeStats":
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std need one value per channel each")
        return self


def _normalize(value: Any) -> str | NormalizeStats:
    """auto, none or {mean, std}, told apart by the value's shape, so that an error speaks of the form the user
    meant under data.normalize. The union in the annotation then only sees valid values: on its own, it would report
    one error per alternative, under pydantic's branch labels."""
    if isinstance(value, (dict, NormalizeStats)):
        return NormalizeStats.model_validate(value)  # its errors keep their paths: data.normalize.std[0]
    if isinstance(value, str) and value in ("auto", "none"):
        return value
    raise PydanticCustomError("normalize", "must be auto, none or a mapping {mean: [...], std: [...]} with one value per channel")


def _auto_or_off(value: Any) -> Any:
    """YAML reads a bare ``off`` as false (and ``on``/``yes`` as true): take them as the words the user wrote."""
    return ("auto" if value else "off") if isinstance(value, bool) else value


class AugmentConfig(Strict):
    random_crop_padding: Annotated[int, Field(ge=0, le=256)] = 0  # pixels on each side before the random crop
    horizontal_flip: bool = False
    rotation: float = Field(0.0, ge=0.0, le=180.0)  # degrees, uniform in [-rotation, rotation]


class DataConfig(Strict):
    dataset: Literal[tuple(DATASETS)] = "fashion_mnist"  # type: ignore[valid-type]
    root: str = "data"
    download: bool = True  # torchvision sets: download when data.root lacks them and the network allows
    path: str | None = None
    # shards: which version of the packed dataset at data.path (an id or a prefix of one); null: the newest, and the
    # run records the id it resolved to
    version: Annotated[str, Field(pattern=r"^[0-9a-f]{4,64}$")] | None = None
    val_split: float = Field(0.1, ge=0.0, lt=1.0)
    test_split: float = Field(0.1, gt=0.0, lt=1.0)  # imagefolder without a test/ folder
    limit_train: PositiveInt | None = None
    limit_test: PositiveInt | None = None
    image_size: Size2 | None = None  # [height, width]; 28 means [28, 28]
    channels: Literal[1, 3] | None = None
    normalize: Annotated[Literal["auto", "none"] | NormalizeStats, BeforeValidator(_normalize)] = "auto"
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    batch_size: Annotated[int, Field(gt=0, le=2**31)] = 128
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    num_workers: Annotated[int, Field(ge=0, le=256)] | None = None  # imagefolder loader processes; None: min(4, cores)
    # imagefolder: the decoded, resized images kept in one memory-mapped file per folder (fcclass/data/cache.py),
    # reused by later epochs, runs, sweep trials and eval; rebuilt when a file changes. Public keys (README, "Decoded
    # images are cached"); none of them changes a result, so --resume may change them (resume.RESUMABLE_KEYS).
    # auto: build or reuse the cache when it fits (else stream, with a note); off: decode the files every epoch
    cache: Annotated[Literal["auto", "off"], BeforeValidator(_auto_or_off)] = "auto"
    cache_dir: str | None = None  # null: $FCCLASS_CACHE_DIR, else $XDG_CACHE_HOME/fcclass, else ~/.cache/fcclass
    cache_max_gb: float = Field(8.0, gt=0)  # a larger cache is not built: the images are decoded every epoch instead
    # imagefolder files that cannot be read (not images, empty, truncated): error lists them all and stops; skip leaves
    # them out of the splits, lists them in the training header and the run record (README, "Your own images")
    on_unreadable: Literal["error", "skip"] = "error"

    @property
    def location_key(self) -> str:
        """The key that says where the data is: data.path for an image folder, data.root for torchvision sets."""
        return "path" if self.dataset in ("imagefolder", "shards") else "root"

    def moved_to(self, place: str | Path) -> "DataConfig":
        """This config with the data at ``place`` (made absolute; an s3:// URL as it is): how --data-root and
        `fcclass runs relocate` apply."""
        where = str(place) if str(place).startswith("s3://") else str(Path(place).expanduser().absolute())
        return self.model_copy(update={self.location_key: where})

    @model_validator(mode="after")
    def _imagefolder_needs_path(self) -> "DataConfig":
        if self.dataset == "imagefolder" and not self.path:
            raise ValueError(
                "dataset 'imagefolder' needs data.path: a folder with one sub-folder of images per class"
            )
        if self.dataset == "shards" and not self.path:
            raise ValueError("dataset 'shards' needs data.path: the folder or s3://bucket/prefix `fcclass data pack` wrote")
        if self.version is not None and self.dataset != "shards":
            raise ValueError("data.version applies to data.dataset: shards only (a packed dataset's version)")
        return self


# ----------------------------------------------------------------------------- optimisation
class _NamedChoice(Strict):
    """A section whose ``name`` picks an entry of a registry. Which keys each entry reads is declared there
    (registries.Choice.keys); a key the chosen entry does not read is an error rather than silently ignored, and
    to_dict() leaves such keys out, so a resolved config validates again."""

    section: ClassVar[str]
    registry: ClassVar[dict[str, Choice]]
    shared_keys: ClassVar[tuple[str, ...]]  # read by every entry

    @classmethod
    def keys_not_read(cls, name: Any, keys: Iterable[str]) -> list[str]:
        """Those of ``keys`` that entry ``name`` does not read; none for an unknown name (that is the name's error)."""
        choice = cls.registry.get(name) if isinstance(name, str) else None
        if choice is None:
            return []
        return [k for k in cls.model_fields if k in keys and k != "name" and k not in cls.shared_keys + choice.keys]

    @classmethod
    def drop_keys_not_read(cls, raw: dict[str, Any]) -> dict[str, Any]:
        unused = cls.keys_not_read(raw.get("name", cls.model_fields["name"].default), raw)
        return {k: v for k, v in raw.items() if k not in unused}

    @model_validator(mode="after")
    def _keys_apply(self) -> "_NamedChoice":
        unused = self.keys_not_read(self.name, self.model_fields_set)  # the keys the user wrote, not the defaults
        if unused:
            # a ValidationError raised here nests under the section, so each message sits at its own key
            raise ValidationError.from_exception_data(type(self).__name__, [
                {"type": PydanticCustomError("not_applicable", self._not_read_message(key)), "loc": (key,), "input": None}
                for key in unused
            ])
        return self

    def _not_read_message(self, key: str) -> str:
        users = [name for name, choice in self.registry.items() if key in choice.keys]
        names = users[0] if len(users) == 1 else f"{', '.join(users[:-1])} and {users[-1]}"
        return f"does not apply to {self.name}; it is used by {names}. Remove it, or change {self.section}.name"

    @model_serializer(mode="wrap")
    def _dump_keys_that_apply(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        unused = self.keys_not_read(self.name, data)
        return {k: v for k, v in data.items() if k not in unused}


class OptimizerConfig(_NamedChoice):
    section: ClassVar[str] = "optimizer"
    registry: ClassVar[dict[str, Choice]] = OPTIMIZERS
    shared_keys: ClassVar[tuple[str, ...]] = OPTIMIZER_SHARED_KEYS

    name: Literal[tuple(OPTIMIZERS)] = "adam"  # type: ignore[valid-type]
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    momentum: NonNegativeFloat = 0.0
    nesterov: bool = False
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] = [0.9, 0.999]
    eps: PositiveFloat | None = None  # None: torch's default for the optimizer
    rho: float = Field(0.9, gt=0, lt=1)  # RMSprop's alpha

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "OptimizerConfig":
        if self.name == "sgd" and self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov: true needs momentum > 0 (e.g. momentum: 0.9)")
        return self


class SchedulerConfig(_NamedChoice):
    section: ClassVar[str] = "scheduler"
    registry: ClassVar[dict[str, Choice]] = SCHEDULERS
    shared_keys: ClassVar[tuple[str, ...]] = SCHEDULER_SHARED_KEYS

    name: Literal[tuple(SCHEDULERS)] = "none"  # type: ignore[valid-type]
    warmup_epochs: NonNegativeInt = 0
    step_size: PositiveInt = 10  # epochs between decays
    milestones: list[PositiveInt] = [30, 60]
    gamma: PositiveFloat = 0.1
    min_lr: NonNegativeFloat = 0.0
    max_lr: PositiveFloat | None = None  # None: optimizer.lr
    pct_start: float = Field(0.3, gt=0, lt=1)
    factor: float = Field(0.1, gt=0, lt=1)
    patience: NonNegativeInt = 2
    monitor: Monitor = "val_loss"


# ----------------------------------------------------------------------------- training
class EarlyStoppingConfig(Strict):
    monitor: Monitor = "val_loss"
    patience: PositiveInt | None = None
    min_delta: NonNegativeFloat = 0.0


class CheckpointConfig(Strict):
    monitor: Monitor = "val_accuracy"


def _class_weight(value: Any) -> str | dict[str, float] | None:
    """balanced or {label: weight}. Labels are folder names, hence strings, but YAML reads {3: 5.0} with a number
    for key: the keys become strings (which label a key means, a name or an index as in Keras, is resolved against
    the data's labels: fcclass.data.weights.label_position). Checked here, before the annotation's union, to give one line
    per mistake."""
    if value is None or (isinstance(value, str) and value == "balanced"):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError("class_weight", "must be balanced or a mapping from label to weight, e.g. {Shirt: 2.0}")
    weights = {}
    for label, weight in value.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise PydanticCustomError("class_weight", "the weight of label {label} must be a number greater than 0 (got {weight})",
                                      {"label": short(str(label)), "weight": short(weight)})
        weights[str(label)] = float(weight)
    return weights


class UnfreezeConfig(Strict):
    """fastai's fine_tune: the layers frozen at the start (trainable: false, init_from.freeze) train from epoch
    ``epoch`` on, and from then the learning rate of every layer is the schedule's times ``lr_scale``."""

    epoch: Annotated[int, Field(ge=2, le=1_000_000)]  # the first epoch in which every layer trains
    lr_scale: float = Field(0.5, gt=0.0, le=1000.0)  # fastai fine_tune halves the rate


class TrainConfig(Strict):
    epochs: Annotated[int, Field(gt=0, le=1_000_000)] = 10
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    class_weight: Annotated[Literal["balanced"] | dict[str, PositiveFloat] | None, BeforeValidator(_class_weight)] = None
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: PositiveFloat | None = None
    test_at_end: bool = True  # evaluate the best checkpoint on the test split when training ends (--no-test: off)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    runs_dir: str = "runs"
    threads: Annotated[int, Field(gt=0, le=1024)] | None = None  # CPU threads; None: OMP_NUM_THREADS, else all cores
    keep_pruned: bool = False  # kernel weights that are exactly zero when training starts stay zero (fine-tuning after fcclass compress --prune)
    sync_batchnorm: bool = False  # torchrun on GPUs: BatchNormalization statistics over the whole job's batch (SyncBatchNorm)
    # A run of fewer optimizer steps than this at data.batch_size (a quick try) halves its batch, down to 16, and scales
    # the learning rate with it (training.schedule.plan_batch); 0: always data.batch_size
    short_run_steps: NonNegativeInt = 0
    unfreeze: UnfreezeConfig | None = None  # {epoch: N, lr_scale: S}: train the frozen layers too from epoch N

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError("must be one of auto, cpu, cuda, cuda:N (e.g. cuda:1), mps")
        return v


# ----------------------------------------------------------------------------- tracking
class MlflowConfig(Strict):
    uri: Annotated[str, Field(min_length=1)] | None = None  # None: MLFLOW_TRACKING_URI, else MLflow's default store
    experiment: Annotated[str, Field(min_length=1)] | None = None  # None: MLFLOW_EXPERIMENT_NAME, else the config's name


class TrackingConfig(Strict):
    mlflow: MlflowConfig | None = None  # a mapping ({} will do) logs the run to MLflow; so does MLFLOW_TRACKING_URI


class Config(Strict):
    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")] = "run"  # names run folders
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sweep: SweepConfig | None = None  # read by `fcclass sweep` only; `fcclass train` ignores it

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v: int) -> int:
        if not 0 <= v < 2**63:  # what torch's and the splits' generators take
            raise ValueError(f"must be a whole number from 0 to {2**63 - 1:,}, e.g. 42")
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


