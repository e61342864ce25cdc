"""Benchmark items from disk: questions and image pHashes, whatever the format.

Formats, told apart by what is at ``path``:

- an InternVL meta JSON (``{name: {root, annotation}}``) or one annotation ``.jsonl`` / LLaVA
  ``.json`` array: each line's ``id`` (else its line number), its human turns, its images
  (relative to the entry's ``root``, or to ``root``/the file's folder);
- a Parquet file or a folder of them, or a Hugging Face ``save_to_disk`` folder (Arrow files,
  a ``DatasetDict``'s splits included): the ``question`` column, the ``image`` column (an HF
  ``Image`` struct of bytes/path, raw bytes, a path, or a list of those), the ``id`` column
  (else the row number).

A missing path, an unknown format or a missing column stops the run with one line naming the
benchmark. An image that cannot be decoded leaves that item to the text check (counted in
``BenchmarkItems.unreadable_images``).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.errors import CurateError
from curate.stages.decontaminate.config import Benchmark


class BenchmarkError(CurateError):
    """A benchmark that cannot be read as configured."""


@dataclass
class BenchmarkItems:
    """Every item of every benchmark: its questions (texts) and its images' pHashes."""

    benchmark: list[str] = field(default_factory=list)
    item: list[str] = field(default_factory=list)
    questions: list[list[str]] = field(default_factory=list)
    image_hashes: list[list[int]] = field(default_factory=list)
    unreadable_images: dict[str, int] = field(default_factory=dict)
    items_per_benchmark: dict[str, int] = field(default_factory=dict)

    def add(self, bench: str, item: str, questions: list[str], hashes: list[int]) -> None:
        self.benchmark.append(bench)
        self.item.append(item)
        self.questions.append(questions)
        self.image_hashes.append(hashes)
        self.items_per_benchmark[bench] = self.items_per_benchmark.get(bench, 0) + 1


def benchmark_files(bench: Benchmark) -> list[Path]:
    """The files a benchmark is read from (their sizes and times say when it changed)."""
    path = bench.path
    if not path.exists():
        raise BenchmarkError(f"benchmark {bench.name!r}: no file or folder at {path}")
    if path.is_file():
        files = [path]
        if path.suffix == ".json":
            files += [Path(e["annotation"]) for e in _meta_entries(bench, path)]
        return files
    return sorted(p for p in path.rglob("*") if p.is_file())


def load_benchmarks(benchmarks: list[Benchmark]) -> BenchmarkItems:
    """Read every benchmark; images are hashed as they are read (nothing large is kept)."""
    items = BenchmarkItems()
    for bench in benchmarks:
        path = bench.path
        if not path.exists():
            raise BenchmarkError(f"benchmark {bench.name!r}: no file or folder at {path}")
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            _read_internvl(bench, items)
        else:
            _read_tables(bench, items)
        items.items_per_benchmark.setdefault(bench.name, 0)
    return items


# -- InternVL annotations ------------------------------------------------------------------------


def _meta_entries(bench: Benchmark, path: Path) -> list[dict]:
    """The (annotation, root) pairs of a meta JSON; [] for an annotation file itself."""
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError:
        return []  # a .json holding one object per line: an annotation file
    if not isinstance(data, dict):
        return []
    entries = []
    for name, spec in data.items():
        if not isinstance(spec, dict) or "annotation" not in spec:
            raise BenchmarkError(
                f"benchmark {bench.name!r}: {path} entry {name!r} has no 'annotation'"
            )
        base = path.parent
        entries.append(
            {
                "annotation": str(base / spec["annotation"]),
                "root": str(base / spec.get("root", "")),
            }
        )
    return entries


def _read_internvl(bench: Benchmark, items: BenchmarkItems) -> None:
    path = bench.path
    entries = _meta_entries(bench, path) if path.suffix == ".json" else []
    if not entries:
        entries = [{"annotation": str(path), "root": str(bench.root or path.parent)}]
    for entry in entries:
        ann = Path(entry["annotation"])
        if not ann.is_file():
            raise BenchmarkError(f"benchmark {bench.name!r}: annotation file {ann} not found")
        for number, record in _records(bench, ann):
            _add_record(bench, items, record, number, Path(entry["root"]))


def _records(bench: Benchmark, ann: Path):
    data = ann.read_bytes()
    stripped = data.lstrip()
    if ann.suffix == ".json" and stripped.startswith(b"["):
        try:
            yield from enumerate(orjson.loads(data), start=1)
        except orjson.JSONDecodeError as e:
            raise BenchmarkError(f"benchmark {bench.name!r}: {ann} is not valid JSON: {e}") from e
        return
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise BenchmarkError(
                f"benchmark {bench.name!r}: {ann} line {number} is not valid JSON: {e}"
            ) from e


def _add_record(
    bench: Benchmark, items: BenchmarkItems, record: dict, number: int, root: Path
) -> None:
    if not isinstance(record, dict):
        raise BenchmarkError(f"benchmark {bench.name!r}: item {number} is not an object")
    turns = record.get("conversations") or []
    questions = [
        t.get("value", "") for t in turns if isinstance(t, dict) and t.get("from") == "human"
    ]
    if not questions and isinstance(record.get(bench.question), str):
        questions = [record[bench.question]]
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else images
    hashes = _hash_images(bench, items, [root / p for p in images])
    item = record.get("id", number)
    items.add(bench.name, str(item), questions, hashes)


# -- Parquet and Hugging Face folders -----------------------------------------------------------


def _table_files(bench: Benchmark) -> list[Path]:
    path = bench.path
    if path.is_file():
        return [path]
    arrow = sorted(path.rglob("*.arrow"))
    if arrow:  # save_to_disk: Arrow IPC streams (a DatasetDict: one folder per split)
        return arrow
    parquet = sorted(path.rglob("*.parquet"))
    if parquet:
        return parquet
    raise BenchmarkError(
        f"benchmark {bench.name!r}: {path} holds no .parquet or .arrow files "
        "(expected a Parquet file/folder or a save_to_disk folder)"
    )


def _read_table(bench: Benchmark, path: Path) -> pa.Table:
    try:
        if path.suffix == ".arrow":
            with pa.memory_map(str(path)) as source:
                try:
                    return pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    return pa.ipc.open_file(source).read_all()
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise BenchmarkError(f"benchmark {bench.name!r}: cannot read {path}: {e}") from e


def _read_tables(bench: Benchmark, items: BenchmarkItems) -> None:
    row = 0
    for path in _table_files(bench):
        table = _read_table(bench, path)
        names = table.column_names
        # question and image must be there when named (a typo must not turn a check off
        # silently: set them to null for a benchmark without one); id falls back to the row.
        missing = [c for c in (bench.question, bench.image) if c and c not in names]
        if missing:
            raise BenchmarkError(
                f"benchmark {bench.name!r}: {path.name} has no column(s) {missing}; "
                f"columns: {names} (set question/image/id in its entry)"
            )
        questions = _column(table, bench.question)
        images = _column(table, bench.image)
        ids = _column(table, bench.id)
        for k in range(table.num_rows):
            row += 1
            q = questions[k] if questions is not None else None
            found = _images_of(images[k] if images is not None else None, path.parent)
            hashes = _hash_images(bench, items, found)
            item = ids[k] if ids is not None and ids[k] is not None else row
            items.add(bench.name, str(item), [q] if isinstance(q, str) else [], hashes)


def _column(table: pa.Table, name: str | None) -> list | None:
    if not name or name not in table.column_names:
        return None
    return table.column(name).to_pylist()


def _images_of(value, base: Path) -> list:
    """Image sources of one cell: bytes, or paths (relative ones from the table's folder)."""
    if value is None:
        return []
    if isinstance(value, list):
        return [x for v in value for x in _images_of(v, base)]
    if isinstance(value, dict):  # HF Image: {"bytes", "path"}
        if value.get("bytes"):
            return [value["bytes"]]
        return _images_of(value.get("path"), base)
    if isinstance(value, bytes):
        return [value]
    if isinstance(value, str) and value:
        return [value if os.path.isabs(value) else base / value]
    return []


def _hash_images(bench: Benchmark, items: BenchmarkItems, sources: list) -> list[int]:
    from curate.stages.neardup.images import ImageHashError, phash_file

    hashes = []
    for src in sources:
        try:
            target = io.BytesIO(src) if isinstance(src, bytes) else str(src)
            hashes.append(phash_file(target))
        except ImageHashError:
            items.unreadable_images[bench.name] = items.unreadable_images.get(bench.name, 0) + 1
    return hashes
