"""The InternVL meta JSON: dataset name -> {root, annotation, data_augment, max_dynamic_patch,
repeat_time, length}, plus our optional ``domain``.

Relative ``root`` and ``annotation`` paths are resolved against the meta file's folder (InternVL
resolves them against the working directory; a meta file that works there also works here when
run from the same place, since absolute paths pass through unchanged).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from curate.core.errors import CurateError

KNOWN_KEYS = {
    "root",
    "annotation",
    "data_augment",
    "max_dynamic_patch",
    "repeat_time",
    "length",
    "domain",
    "min_dynamic_patch",
}


class MetaError(CurateError):
    """The meta JSON is unusable as a whole (not a per-line problem)."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: str  # absolute folder that every image path must stay inside
    annotation: str  # absolute path of the .jsonl or .parquet file
    data_augment: bool = False
    max_dynamic_patch: int | None = None  # None: the run's default n_max
    min_dynamic_patch: int = 1
    repeat_time: float = 1.0
    length: int | None = None
    domain: str = "general"

    def to_dict(self) -> dict:
        return asdict(self)


def _resolve(base: Path, value: str) -> str:
    p = Path(value)
    return str((p if p.is_absolute() else base / p).resolve())


def _spec(name: str, entry: dict, base: Path) -> DatasetSpec:
    unknown = set(entry) - KNOWN_KEYS
    if unknown:
        raise MetaError(f"dataset {name!r}: unknown keys {sorted(unknown)}")
    for key in ("root", "annotation"):
        if not isinstance(entry.get(key), str):
            raise MetaError(f"dataset {name!r}: {key!r} must be a path string")
    repeat = entry.get("repeat_time", 1)
    if not isinstance(repeat, int | float) or repeat <= 0:
        raise MetaError(f"dataset {name!r}: repeat_time must be a positive number, got {repeat!r}")
    annotation = _resolve(base, entry["annotation"])
    if not Path(annotation).is_file():
        raise MetaError(f"dataset {name!r}: annotation file not found: {annotation}")
    return DatasetSpec(
        name=name,
        root=_resolve(base, entry["root"]),
        annotation=annotation,
        data_augment=bool(entry.get("data_augment", False)),
        max_dynamic_patch=entry.get("max_dynamic_patch"),
        min_dynamic_patch=int(entry.get("min_dynamic_patch", 1)),
        repeat_time=float(repeat),
        length=entry.get("length"),
        domain=str(entry.get("domain", "general")),
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
