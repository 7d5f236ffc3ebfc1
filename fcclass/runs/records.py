"""The run's JSON files as pydantic models (summary.json, splits.json, tracking.json): each read through one guarded
reader and validated on read, so a damaged, tampered or half-written file is one short reason, never a crash deep in
a command. Keys a model does not declare (written by another fcclass version) are kept and written back as they were;
a declared key of the wrong type makes the file damaged."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from fcclass.files import read_regular, write_json


class Record(BaseModel):
    """The base of the run's JSON records: strict types (a JSON file has no excuse for "3" where 3 is meant), extra keys
    allowed, assignments validated."""

    model_config = ConfigDict(extra="allow", strict=True, validate_assignment=True)


R = TypeVar("R", bound=Record)


class DamagedRecord(ValueError):
    """A run's JSON file that cannot be used; the message is the reason, in a few words."""


def read_record(path: Path, model: type[R], limit: int) -> R | None:
    """The record in ``path``, or None when there is no such file. Raises DamagedRecord when it is not a regular file
    (a FIFO is never opened: reading it would wait forever), is larger than ``limit`` bytes, or does not hold valid
    JSON of the model's shape."""
    try:
        data = read_regular(path, limit)
    except FileNotFoundError:
        return None
    except OSError as e:  # RefusedFile (a FIFO, a device, too large) included
        raise DamagedRecord(e.strerror or str(e)) from None
    try:
        return model.model_validate_json(data)
    except ValidationError as e:
        raise DamagedRecord(problem(e)) from None
    except RecursionError:  # JSON nested thousands of levels deep
        raise DamagedRecord("it is nested too deeply") from None


def problem(error: ValidationError) -> str:
    """A validation error in one line: the first problem and where it is ('size.0: Input should be greater than 0')."""
    errors = error.errors(include_url=False, include_input=False)
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{where + ': ' if where else ''}{first['msg'][:200]}{more}"


def write_record(path: Path, record: Record) -> None:
    """Atomically, as indented JSON; keys that were never set (absent from the file it was read from) stay absent."""
    write_json(path, record.model_dump(exclude_unset=True))
