"""The InternVL meta JSON: dataset name -> {root, annotation, data_augment, max_dynamic_patch,
repeat_time, length}, plus our optional ``domain`` and ``min_dynamic_patch``.

One schema (``MetaEntry``) checks every field's name and type when the file is loaded, so a
``"max_dynamic_patch": "6"`` stops ingest with the dataset and field named instead of failing
in a later stage. Types are strict: a number in quotes is not a number.

Relative ``root`` and ``annotation`` paths are resolved against the meta file's folder (InternVL
resolves them against the working directory; a meta file that works there also works here when
run from the same place, since absolute paths pass through unchanged).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from curate.core.errors import CurateError


class MetaError(CurateError):
    """The meta JSON is unusable as a whole (not a per-line problem)."""


class MetaEntry(BaseModel):
    """One dataset of the meta JSON, as written there (the schema every entry is checked
    against)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    root: str  # image folder
    annotation: str  # .jsonl, .json (an array of samples, or JSONL) or .parquet file
    data_augment: bool = False
    max_dynamic_patch: int | None = Field(None, ge=1)  # None: the pipeline's budget setting
    min_dynamic_patch: int | None = Field(None, ge=1)  # None: the pipeline's budget setting
    repeat_time: float = Field(1.0, gt=0)
    length: int | None = Field(None, ge=0)
    domain: str = "general"

    @model_validator(mode="after")
    def _min_below_max(self) -> MetaEntry:
        lo, hi = self.min_dynamic_patch, self.max_dynamic_patch
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_dynamic_patch {lo} is above max_dynamic_patch {hi}")
        return self


KNOWN_KEYS = tuple(MetaEntry.model_fields)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: str  # absolute folder that every image path must stay inside
    annotation: str  # absolute path of the .jsonl, .json or .parquet file
    data_augment: bool = False
    max_dynamic_patch: int | None = None  # None: the pipeline's stages.budget value
    min_dynamic_patch: int | None = None  # None: the pipeline's stages.budget value
    repeat_time: float = 1.0
    length: int | None = None
    domain: str = "general"

    def to_dict(self) -> dict:
        return asdict(self)


def _resolve(base: Path, value: str) -> str:
    p = Path(value)
    return str((p if p.is_absolute() else base / p).resolve())


def _schema_message(name: str, error: ValidationError) -> str:
    """One line naming the dataset and every bad field."""
    errors = error.errors()
    unknown = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"]
    problems = [f"unknown keys {unknown} (known: {', '.join(KNOWN_KEYS)})"] if unknown else []
    for e in errors:
        field = ".".join(str(part) for part in e["loc"])
        if e["type"] == "extra_forbidden":
            continue
        if e["type"] == "missing":
            problems.append(f"{field!r} is missing")
        elif field:
            problems.append(f"field {field!r}: {e['msg'].lower()}, got {e['input']!r:.80}")
        else:
            problems.append(e["msg"].removeprefix("Value error, "))
    return f"dataset {name!r}: " + "; ".join(problems)


def _spec(name: str, raw: object, base: Path) -> DatasetSpec:
    if not isinstance(raw, dict):
        raise MetaError(f"dataset {name!r}: must be a JSON object, got {type(raw).__name__}")
    try:
        entry = MetaEntry.model_validate(raw)
    except ValidationError as e:
        raise MetaError(_schema_message(name, e)) from None
    annotation = _resolve(base, entry.annotation)
    if not Path(annotation).is_file():
        raise MetaError(f"dataset {name!r}: annotation file not found: {annotation}")
    return DatasetSpec(
        name=name,
        root=_resolve(base, entry.root),
        annotation=annotation,
        data_augment=entry.data_augment,
        max_dynamic_patch=entry.max_dynamic_patch,
        min_dynamic_patch=entry.min_dynamic_patch,
        repeat_time=entry.repeat_time,
        length=entry.length,
        domain=entry.domain,
    )


def load_meta(path: str | Path) -> list[DatasetSpec]:
    """Read a meta JSON into dataset specs, in file order; raises MetaError with the reason."""
    path = Path(path)
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise MetaError(f"meta file not found: {path}") from e
    except orjson.JSONDecodeError as e:
        raise MetaError(f"meta file {path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or not raw:
        raise MetaError(f"meta file {path} must be a non-empty JSON object of datasets")
    base = path.resolve().parent
    return [_spec(name, entry, base) for name, entry in raw.items()]
