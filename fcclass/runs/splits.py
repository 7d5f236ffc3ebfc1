"""RUN_DIR/splits.json: the run's recorded splits (fcclass.data's SplitRecord) on disk, written once when the run starts
(again when resume finds the data moved) and validated whenever it is read, so a damaged record is one message
before any data is touched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from fcclass.data.splits import SPLIT_NAMES, SplitRecord
from fcclass.errors import DataError
from fcclass.files import atomic_write_text
from fcclass.runs.layout import SPLITS
from fcclass.runs.records import DamagedRecord, Record, read_record

FORMAT = 1
LIMIT = 4 << 30  # bytes; a folder of ten million images records about 1.5 GB
Whole = Annotated[int, Field(ge=0)]


class TensorSplit(Record):
    """A split of a torchvision dataset: indices into one of its sets, and a digest of their labels."""

    pool: Literal["train", "test"]
    indices: list[Annotated[int, Field(ge=0, lt=2**40)]]
    labels_digest: str
    counts: list[Whole] | None = None  # images per label (records of fcclass 0.1 lack it)


class FileSplit(Record):
    """A split of an image folder: each file relative to the folder, its label, size, modification time and hash."""

    files: list[str]
    labels: list[Whole]  # below the number of classes
    sizes: list[Whole]
    mtimes_ns: list[int]
    blake2b: list[str]


def _kind(split: Any) -> str:
    """Which kind a recorded split is: an image folder's names its files."""
    keys = split if isinstance(split, dict) else getattr(split, "model_fields_set", ())
    return "files" if "files" in keys else "tensors"


AnySplit = Annotated[Annotated[TensorSplit, Tag("tensors")] | Annotated[FileSplit, Tag("files")], Discriminator(_kind)]


class SkippedFile(Record):
    """An image-folder file left out of the splits as unreadable (data.on_unreadable: skip), relative to the folder."""

    file: str
    reason: str


class SplitsFile(Record):
    """splits.json: the dataset, its root when the run started, the images' shape, every split's members and the files
    left out as unreadable (only when there are some)."""

    format: Literal[1]
    dataset: str
    root: str
    class_names: list[str]
    channels: Literal[1, 3]
    size: Annotated[list[Annotated[int, Field(gt=0, le=65536)]], Field(min_length=2, max_length=2)]
    splits: dict[str, AnySplit]
    skipped: list[SkippedFile] | None = None

    @model_validator(mode="after")
    def _members_fit(self) -> "SplitsFile":
        """Every split there, all of one kind, with one label (from 0 to the last class) per member."""
        missing = [name for name in SPLIT_NAMES if name not in self.splits]
        if missing:
            raise ValueError(f"split {missing[0]} is missing")
        if len({type(s) for s in self.splits.values()}) > 1:
            raise ValueError("its splits mix files and dataset indices")
        for name, split in self.splits.items():
            if isinstance(split, FileSplit):
                if not len(split.files) == len(split.labels) == len(split.sizes) == len(split.mtimes_ns) == len(split.blake2b):
                    raise ValueError(f"split {name}: files, labels, sizes, mtimes_ns and blake2b must be one per file")
                if any(v >= len(self.class_names) for v in split.labels):
                    raise ValueError(f"split {name}: labels must be from 0 to {len(self.class_names) - 1}")
        return self

    @classmethod
    def of(cls, record: SplitRecord) -> "SplitsFile":
        return cls.model_validate({"format": FORMAT, "dataset": record.dataset, "root": str(record.root), "class_names": record.class_names,
                                   "channels": record.channels, "size": record.size, "splits": record.splits,
                                   **({"skipped": record.skipped} if record.skipped else {})})

    def record(self) -> SplitRecord:
        splits = {name: split.model_dump(exclude_unset=True) for name, split in self.splits.items()}
        skipped = [s.model_dump() for s in self.skipped or []]
        return SplitRecord(self.dataset, Path(self.root), list(self.class_names), self.channels, list(self.size), splits, skipped)


def read_splits(run_dir: str | Path) -> SplitRecord | None:
    """The run's recorded splits, or None for a run made before splits were recorded. A damaged record is a DataError
    saying how to fix it."""
    path = Path(run_dir) / SPLITS
    try:
        recorded = read_record(path, SplitsFile, LIMIT)
    except DamagedRecord as e:
        raise DataError(f"{path} is damaged ({str(e)[:200]}); the run's recorded splits cannot be read. Restore it from a "
                        "copy of the run (fcclass writes it once, when the run starts).") from None
    return recorded.record() if recorded is not None else None


def write_splits(run_dir: str | Path, record: SplitRecord) -> None:
    """Atomically, as compact JSON (a folder's record names every file); raises OSError."""
    data = SplitsFile.of(record).model_dump(exclude_unset=True)
    atomic_write_text(Path(run_dir) / SPLITS, json.dumps(data, separators=(",", ":")) + "\n")
