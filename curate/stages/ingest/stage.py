"""The ingest stage: annotation files -> ``samples/`` shards + ``ledger/ingest``.

Planning reads each annotation file once to find its lines, cut it into shards of
``shard_lines`` lines, and mark exact duplicate lines (same sample id) so that the first
occurrence is kept wherever the shards are processed. A shard's inputs are its dataset's spec,
the hash of its lines' bytes and its duplicate map, so fixing one line redoes one shard. Each
shard then parses its lines independently (in parallel when asked).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from curate.core.folder import RunFolder
from curate.core.records import SAMPLE_SCHEMA, LedgerEntry, ledger_table, sample_id
from curate.core.stage import ShardInput, ShardOutput, ShardStage
from curate.stages.ingest.config import IngestConfig
from curate.stages.ingest.meta import DatasetSpec, MetaError, load_meta
from curate.stages.ingest.normalize import parse_line

STAGE = "ingest"
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class ShardTask:
    spec: DatasetSpec
    first_line: int  # 1-based number of the shard's first line
    lines: int
    byte_start: int | None  # JSONL: where the shard starts; Parquet: None
    duplicates: dict[int, int] = field(default_factory=dict)  # line -> first line with same id
    content: str = ""  # xxh3 of the shard's lines: a fixed line redoes this shard only


def _slug(name: str) -> str:
    """A file-name prefix for a dataset's shards, distinct for distinct names.

    A name that is not already a plain, visible file name (spaces, slashes, a leading dot,
    very long) gets a hash of itself: ``a b`` and ``a_b`` must not share shard files, and a
    ``.hidden`` shard would never be listed."""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]
    if slug != name or slug.startswith(".") or not slug:
        slug = f"{slug.lstrip('.')[:71] or 'dataset'}-{xxhash.xxh3_64_hexdigest(name.encode())[:8]}"
    return slug


def _read_lines(spec: DatasetSpec) -> tuple[list[bytes], list[bool], int]:
    """All lines of an annotation file as bytes, whether each ended in CRLF, and where the
    first line starts (3 after a UTF-8 byte order mark, which Windows tools write: it is not
    part of the first line).

    Parquet rows become canonical JSON lines, so both formats share one parser.
    """
    path = Path(spec.annotation)
    if path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
        lines = [orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in rows]
        return lines, [False] * len(lines), 0
    data = path.read_bytes()
    start = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    lines = data[start:].split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # a final newline ends the last line; it does not start another
    crlf = [ln.endswith(b"\r") for ln in lines]
    return [ln[:-1] if c else ln for ln, c in zip(lines, crlf, strict=True)], crlf, start


def _duplicates(spec: DatasetSpec, lines: list[bytes]) -> dict[int, int]:
    """Map each duplicate line number to the first line with the same content (same id)."""
    prefix = spec.name.encode() + b"\x00"
    hashes = np.fromiter(
        (xxhash.xxh3_64_intdigest(prefix + ln.strip()) for ln in lines),
        dtype=np.uint64,
        count=len(lines),
    )
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    first_of = first[inverse]
    blank = np.fromiter((not ln.strip() for ln in lines), dtype=bool, count=len(lines))
    dup = np.nonzero((first_of != np.arange(len(lines))) & ~blank)[0]
    return {int(i) + 1: int(first_of[i]) + 1 for i in dup}


def _line_starts(lines: list[bytes], crlf: list[bool], first: int = 0) -> np.ndarray:
    """Byte offset of every line, the first at ``first``."""
    sizes = np.fromiter(
        (len(ln) + 1 + c for ln, c in zip(lines, crlf, strict=True)),
        dtype=np.int64,
        count=len(lines),
    )
    if not len(lines):
        return np.zeros(0, np.int64)
    return first + np.concatenate([[0], np.cumsum(sizes)[:-1]])


def plan(specs: list[DatasetSpec], shard_lines: int) -> tuple[dict[str, ShardTask], dict[str, int]]:
    """Cut every dataset into shard tasks; also return each dataset's line count."""
    tasks: dict[str, ShardTask] = {}
    line_counts: dict[str, int] = {}
    for spec in specs:
        lines, crlf, first = _read_lines(spec)
        starts = _line_starts(lines, crlf, first)
        line_counts[spec.name] = len(lines)
        dups = _duplicates(spec, lines)
        is_jsonl = not spec.annotation.endswith(".parquet")
        for k, start in enumerate(range(0, max(len(lines), 1), shard_lines)):
            n = min(shard_lines, len(lines) - start)
            shard_dups = {ln: f for ln, f in dups.items() if start < ln <= start + n}
            byte_start = int(starts[start]) if is_jsonl and n > 0 else None
            content = xxhash.xxh3_64_hexdigest(b"\n".join(lines[start : start + n]))
            shard = f"{_slug(spec.name)}-{k:05d}"
            if shard in tasks:  # never silently drop a dataset's lines
                raise MetaError(
                    f"datasets {tasks[shard].spec.name!r} and {spec.name!r} "
                    f"would share shard {shard}: rename one"
                )
            tasks[shard] = ShardTask(spec, start + 1, n, byte_start, shard_dups, content)
    return tasks, line_counts


def _shard_lines(task: ShardTask) -> list[bytes]:
    """The task's lines: JSONL files are read from the shard's byte offset, not from the top."""
    if task.lines == 0:
        return []
    if task.byte_start is None:
        return _parquet_rows(task.spec.annotation, task.first_line - 1, task.lines)
    out = []
    with open(task.spec.annotation, "rb") as f:
        f.seek(task.byte_start)
        for _ in range(task.lines):
            out.append(f.readline().rstrip(b"\n").removesuffix(b"\r"))
    return out


def _parquet_rows(path: str, start: int, n: int) -> list[bytes]:
    """Rows [start, start + n) of a Parquet file as canonical JSON lines, reading only the row
    groups that hold them (a shard does not re-read the whole file)."""
    f = pq.ParquetFile(path)
    groups, first_row, row = [], None, 0
    for g in range(f.metadata.num_row_groups):
        size = f.metadata.row_group(g).num_rows
        if row + size > start and row < start + n:
            groups.append(g)
            first_row = row if first_row is None else first_row
        row += size
    if not groups:
        return []
    table = f.read_row_groups(groups).slice(start - first_row, n)
    return [orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in table.to_pylist()]


def process_shard(task: ShardTask, options: IngestConfig) -> ShardOutput:
    """Parse one shard's lines into sample rows and ledger entries."""
    spec = task.spec
    lines = _shard_lines(task)
    rows: list[dict] = []
    entries: list[LedgerEntry] = []
    for offset, line in enumerate(lines):
        number = task.first_line + offset
        sid = sample_id(spec.name, line)
        if number in task.duplicates:
            first = task.duplicates[number]
            entries.append(
                LedgerEntry(
                    sid,
                    spec.name,
                    number,
                    STAGE,
                    "duplicate_sample",
                    detail=f"same content as line {first}",
                )
            )
            continue
        parsed = parse_line(
            line,
            spec,
            max_image_pixels=options.max_image_pixels,
            max_line_bytes=options.max_line_bytes,
        )
        if parsed.row is None:
            entries += [_problem_entry(spec, sid, number, p) for p in parsed.problems]
            continue
        rows.append({"sample_id": sid, "dataset": spec.name, "line": number, **parsed.row})
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    return ShardOutput(table, ledger_table(entries), rows_in=len(lines))


def _problem_entry(spec: DatasetSpec, sid: str, number: int, p) -> LedgerEntry:
    return LedgerEntry(
        sid,
        spec.name,
        number,
        STAGE,
        p.rule,
        "reject",
        _float(p.value),
        _float(p.threshold),
        f"{spec.annotation}:{number}: {p.detail}",
    )


def _float(x: float | None) -> float | None:
    return None if x is None else float(x)


class IngestStage(ShardStage):
    """Annotation files named by a meta JSON -> ``samples/`` (the source of every run)."""

    name = STAGE

    def __init__(self, config: IngestConfig, meta: str | Path) -> None:
        super().__init__(config)
        self.meta = str(Path(meta).resolve())
        self.workers = config.workers
        self._tasks: dict[str, ShardTask] | None = None
        self._line_counts: dict[str, int] = {}
        self._specs: list[DatasetSpec] = []

    @property
    def table(self) -> str:
        return "samples"

    def tasks(self) -> dict[str, ShardTask]:
        if self._tasks is None:  # reads every annotation file once per command
            self._specs = load_meta(self.meta)
            self._tasks, self._line_counts = plan(self._specs, self.config.shard_lines)
        return self._tasks

    def shards(self, run: RunFolder) -> list[str]:
        return list(self.tasks())

    def shard_inputs(self, run: RunFolder, shard: str) -> dict[str, str]:
        task = self.tasks()[shard]
        dups = sorted(task.duplicates.items())
        return {
            "annotation": xxhash.xxh3_64_hexdigest(
                orjson.dumps([task.spec.to_dict(), task.first_line, task.lines, dups])
            )
            + task.content
        }

    def prepare(self, run: RunFolder) -> None:
        self.tasks()
        datasets = {
            s.name: {**s.to_dict(), "lines": self._line_counts[s.name]} for s in self._specs
        }
        run.record_info(
            meta=self.meta, datasets=datasets, dataset_order=[s.name for s in self._specs]
        )

    def process(self, shard: ShardInput) -> ShardOutput:
        return process_shard(self.tasks()[shard.shard], self.config)

    def __getstate__(self) -> dict:
        # Ship only the tasks to worker processes (not the planning's line lists).
        self.tasks()
        return {**self.__dict__, "_specs": [], "_line_counts": {}}
