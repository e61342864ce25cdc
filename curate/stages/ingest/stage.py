"""The ingest stage: annotation files -> ``samples/`` shards + ``ledger/ingest``.

Planning reads each annotation file once to find its lines (or, for a ``.json`` array, its
elements: see ``jsonarray``), cut it into shards of ``shard_lines`` lines, and number repeated
lines: the first copy is kept wherever the shards are processed, each further copy is a
``duplicate_sample`` with an id of its own. A shard's inputs are its dataset's spec, the hash
of its lines' bytes and its duplicate map, so fixing one line redoes one shard. Each shard then
parses its lines independently (in parallel when asked).
"""

from __future__ import annotations

import io
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from curate.core.folder import RunFolder
from curate.core.io import write_bytes_atomic
from curate.core.records import SAMPLE_SCHEMA, LedgerEntry, ledger_table, sample_id
from curate.core.stage import ShardInput, ShardOutput, ShardStage, cpu_workers
from curate.stages.ingest.config import IngestConfig
from curate.stages.ingest.jsonarray import (
    CHUNK_BYTES,
    UTF8_BOM,
    first_byte,
    looks_like_jsonl,
    scan_array,
)
from curate.stages.ingest.meta import DatasetSpec, MetaError, load_meta
from curate.stages.ingest.normalize import Problem, parse_line

RAW_EXCERPT_CHARS = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
STAGE = "ingest"


@dataclass
class ShardTask:
    spec: DatasetSpec
    first_line: int  # 1-based number of the shard's first line (.json arrays: element)
    lines: int
    byte_start: int | None  # JSONL and .json arrays: where the shard starts; Parquet: None
    duplicates: dict[int, int] = field(default_factory=dict)  # line -> first line, same content
    content: str = ""  # xxh3 of the shard's lines: a fixed line redoes this shard only
    copies: dict[int, int] = field(default_factory=dict)  # line -> k: the k-th further copy
    spans: np.ndarray | None = None  # .json arrays: (lines, 2) byte spans of the elements
    truncated: bool = False  # .json arrays: the last element is the tail of a cut-off file


def _slug(name: str) -> str:
    """A file-name prefix for a dataset's shards, distinct for distinct names.

    A name that is not already a plain, visible file name (spaces, slashes, a leading dot,
    very long) gets a hash of itself: ``a b`` and ``a_b`` must not share shard files, and a
    ``.hidden`` shard would never be listed."""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]
    if slug != name or slug.startswith(".") or not slug:
        slug = f"{slug.lstrip('.')[:71] or 'dataset'}-{xxhash.xxh3_64_hexdigest(name.encode())[:8]}"
    return slug


def _read_lines(spec: DatasetSpec, jsonl: bool) -> tuple[list[bytes], list[bool], int]:
    """All lines of an annotation file as bytes, whether each ended in CRLF, and where the
    first line starts (3 after a UTF-8 byte order mark, which Windows tools write: it is not
    part of the first line).

    Parquet rows become canonical JSON lines, so both formats share one parser.
    """
    path = Path(spec.annotation)
    if not jsonl:
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


def _prefix(spec: DatasetSpec) -> bytes:
    return spec.name.encode() + b"\x00"  # as sample_id hashes: the ids are these hashes


def _line_hashes(spec: DatasetSpec, lines: list[bytes]) -> np.ndarray:
    prefix = _prefix(spec)
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(prefix + ln.strip()) for ln in lines),
        dtype=np.uint64,
        count=len(lines),
    )


def _copies(hashes: np.ndarray, blank: np.ndarray) -> tuple[dict[int, int], dict[int, int]]:
    """Repeated content, by line number: each duplicate's first line (blank lines are left to
    the ``blank_line`` rule), and ``k`` for the k-th further copy of any line, blank or not
    (its sample id's seed, so every line has an id of its own)."""
    n = len(hashes)
    order = np.argsort(hashes, kind="stable")  # stable: copies stay in file order
    ordered = hashes[order]
    new = np.ones(n, dtype=bool)
    new[1:] = ordered[1:] != ordered[:-1]
    del ordered
    group_start = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    copy, first = np.empty(n, np.int64), np.empty(n, np.int64)
    copy[order] = np.arange(n) - group_start
    first[order] = order[group_start]
    repeated = np.flatnonzero(copy > 0)
    copies = {int(i) + 1: int(copy[i]) for i in repeated}
    dups = {int(i) + 1: int(first[i]) + 1 for i in repeated if not blank[i]}
    return dups, copies


def annotation_format(spec: DatasetSpec) -> str:
    """``parquet``, ``jsonl`` or ``json_array``: by suffix, and for ``.json`` by content.

    A ``.json`` file is an array of samples, JSONL under another name, or refused: a single
    object (say ``{id: sample}``) read as JSONL would give one bogus reject per line.
    """
    suffix = Path(spec.annotation).suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix != ".json":
        return "jsonl"
    with open(spec.annotation, "rb") as f:
        at, byte = first_byte(f)
        if byte == b"[":
            return "json_array"
        if not byte or (byte == b"{" and looks_like_jsonl(f, at)):
            return "jsonl"
    what = (
        "one JSON object over several lines"
        if byte == b"{"
        else f"JSON that starts with {byte.decode('latin-1')!r}"
    )
    raise MetaError(
        f"dataset {spec.name!r}: {spec.annotation} holds {what}; a .json annotation file must "
        "be an array of samples ([{...}, ...]) or one sample per line (JSONL)"
    )


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


def plan(
    specs: list[DatasetSpec],
    shard_lines: int,
    chunk_bytes: int = CHUNK_BYTES,
    cache_dir: Path | None = None,
) -> tuple[dict[str, ShardTask], dict[str, int]]:
    """Cut every dataset into shard tasks; also return each dataset's line count (elements,
    for a ``.json`` array, which is read ``chunk_bytes`` at a time).

    With ``cache_dir``, a dataset's tasks are kept there, keyed by its meta entry, the
    settings and its annotation file's size, mtime and inode: a command that finds the file
    unchanged does not read it again (as make and rsync decide)."""
    tasks: dict[str, ShardTask] = {}
    line_counts: dict[str, int] = {}
    for spec in specs:
        cut = _cached_tasks(spec, shard_lines, chunk_bytes, cache_dir)
        line_counts[spec.name] = sum(t.lines for t in cut)
        for k, task in enumerate(cut):
            shard = f"{_slug(spec.name)}-{k:05d}"
            if shard in tasks:  # never silently drop a dataset's lines
                raise MetaError(
                    f"datasets {tasks[shard].spec.name!r} and {spec.name!r} "
                    f"would share shard {shard}: rename one"
                )
            tasks[shard] = task
    return tasks, line_counts


PLAN_CACHE_VERSION = 1  # bump when ShardTask or the planning changes


def _dataset_tasks(spec: DatasetSpec, shard_lines: int, chunk_bytes: int) -> list[ShardTask]:
    kind = annotation_format(spec)
    if kind == "json_array":
        return _array_tasks(spec, shard_lines, chunk_bytes)
    return _line_tasks(spec, shard_lines, jsonl=kind == "jsonl")


def _cached_tasks(
    spec: DatasetSpec, shard_lines: int, chunk_bytes: int, cache_dir: Path | None
) -> list[ShardTask]:
    """A dataset's tasks from the plan cache when its file is unchanged, else planned anew
    (and cached, replacing the dataset's older entry)."""
    if cache_dir is None:
        return _dataset_tasks(spec, shard_lines, chunk_bytes)
    st = os.stat(spec.annotation)
    key = [PLAN_CACHE_VERSION, spec.to_dict(), shard_lines, chunk_bytes]
    key += [os.path.realpath(spec.annotation), st.st_size, st.st_mtime_ns, st.st_ino]
    prefix = _slug(spec.name)
    path = cache_dir / f"{prefix}.{xxhash.xxh3_64_hexdigest(orjson.dumps(key))}.npz"
    if path.exists():
        try:
            return _tasks_from_bytes(path.read_bytes(), spec)
        except (ValueError, KeyError, OSError):
            pass  # an unreadable entry: plan again
    tasks = _dataset_tasks(spec, shard_lines, chunk_bytes)
    for old in cache_dir.glob(f"{prefix}.*.npz"):
        old.unlink(missing_ok=True)
    write_bytes_atomic(_tasks_to_bytes(tasks), path)
    return tasks


def _tasks_to_bytes(tasks: list[ShardTask]) -> bytes:
    """A dataset's tasks as an ``.npz`` (no pickle): their fields as JSON, spans as arrays."""
    fields = [
        {
            "first_line": t.first_line,
            "lines": t.lines,
            "byte_start": t.byte_start,
            "duplicates": list(t.duplicates.items()),
            "content": t.content,
            "copies": list(t.copies.items()),
            "spans": t.spans is not None,
            "truncated": t.truncated,
        }
        for t in tasks
    ]
    arrays = {f"spans{k}": t.spans for k, t in enumerate(tasks) if t.spans is not None}
    buf = io.BytesIO()
    np.savez(buf, tasks=np.frombuffer(orjson.dumps(fields), dtype=np.uint8), **arrays)
    return buf.getvalue()


def _tasks_from_bytes(data: bytes, spec: DatasetSpec) -> list[ShardTask]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        fields = orjson.loads(z["tasks"].tobytes())
        return [
            ShardTask(
                spec,
                f["first_line"],
                f["lines"],
                f["byte_start"],
                dict(map(tuple, f["duplicates"])),
                f["content"],
                dict(map(tuple, f["copies"])),
                z[f"spans{k}"] if f["spans"] else None,
                f["truncated"],
            )
            for k, f in enumerate(fields)
        ]


def _by_shard(
    hashes: np.ndarray, blank: np.ndarray, shard_lines: int
) -> Iterator[tuple[int, int, dict[int, int], dict[int, int]]]:
    """(first index, lines, duplicates, copies) of each shard; one empty shard for no lines."""
    dups, copies = _copies(hashes, blank)
    shard_dups: dict[int, dict[int, int]] = defaultdict(dict)
    shard_copies: dict[int, dict[int, int]] = defaultdict(dict)
    for line, first in dups.items():
        shard_dups[(line - 1) // shard_lines][line] = first
    for line, k in copies.items():
        shard_copies[(line - 1) // shard_lines][line] = k
    for k, start in enumerate(range(0, max(len(hashes), 1), shard_lines)):
        n = min(shard_lines, len(hashes) - start)
        yield start, n, shard_dups.get(k, {}), shard_copies.get(k, {})


def _line_tasks(spec: DatasetSpec, shard_lines: int, jsonl: bool) -> list[ShardTask]:
    lines, crlf, first = _read_lines(spec, jsonl)
    starts = _line_starts(lines, crlf, first)
    blank = np.fromiter((not ln.strip() for ln in lines), dtype=bool, count=len(lines))
    out = []
    for start, n, dups, copies in _by_shard(_line_hashes(spec, lines), blank, shard_lines):
        byte_start = int(starts[start]) if jsonl and n > 0 else None
        content = xxhash.xxh3_64_hexdigest(b"\n".join(lines[start : start + n]))
        out.append(ShardTask(spec, start + 1, n, byte_start, dups, content, copies))
    return out


def _array_tasks(spec: DatasetSpec, shard_lines: int, chunk_bytes: int) -> list[ShardTask]:
    """Shards of a ``.json`` array: element counts and byte spans, so that a worker reads its
    slice of the file only."""
    try:
        index = scan_array(spec.annotation, _prefix(spec), chunk_bytes)
    except MetaError as e:
        raise MetaError(f"dataset {spec.name!r}: {e}") from None
    blank = index.spans[:, 0] == index.spans[:, 1]
    out = []
    for start, n, dups, copies in _by_shard(index.hashes, blank, shard_lines):
        spans = index.spans[start : start + n]
        truncated = index.truncated and n > 0 and start + n == len(index.spans)
        # The elements' hashes stand for their bytes: whitespace around them changes nothing.
        content = xxhash.xxh3_64_hexdigest(
            index.hashes[start : start + n].tobytes() + (b"truncated" if truncated else b"")
        )
        byte_start = int(spans[0, 0]) if n > 0 else None
        out.append(
            ShardTask(spec, start + 1, n, byte_start, dups, content, copies, spans, truncated)
        )
    return out


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


class _Line(NamedTuple):
    number: int
    data: bytes | None  # None: longer than max_line_bytes, so not read
    size: int  # bytes
    sid: str


def _shard_rows(task: ShardTask, max_line_bytes: int) -> Iterator[_Line]:
    """The task's lines (or array elements) with their sample ids."""
    name = task.spec.name
    if task.spans is None:
        for offset, line in enumerate(_shard_lines(task)):
            number = task.first_line + offset
            sid = sample_id(name, line, task.copies.get(number, 0))
            yield _Line(number, line, len(line), sid)
        return
    with open(task.spec.annotation, "rb") as f:
        for offset, (start, end) in enumerate(task.spans.tolist()):
            number = task.first_line + offset
            copy = task.copies.get(number, 0)
            if end - start > max_line_bytes:  # a cut-off file can make one element of the rest
                sid = _streamed_id(f, start, end, name, copy)
                yield _Line(number, None, end - start, sid)
                continue
            f.seek(start)
            data = f.read(end - start)
            yield _Line(number, data, len(data), sample_id(name, data, copy))


def _streamed_id(f, start: int, end: int, dataset: str, copy: int) -> str:
    """``sample_id`` of the bytes ``[start, end)`` of ``f`` (already without surrounding
    whitespace), read a chunk at a time."""
    h = xxhash.xxh3_64(dataset.encode("utf-8"), seed=copy)
    h.update(b"\x00")
    f.seek(start)
    while start < end:
        chunk = f.read(min(CHUNK_BYTES, end - start))
        if not chunk:
            break
        h.update(chunk)
        start += len(chunk)
    return h.hexdigest()


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


ROWS_PER_PART = 4096


def process_shard(task: ShardTask, options: IngestConfig) -> ShardOutput:
    """Parse one shard's lines into sample rows and ledger entries."""
    spec = task.spec
    rows: list[dict] = []
    parts = [SAMPLE_SCHEMA.empty_table()]
    entries: list[LedgerEntry] = []
    rows_in = 0
    for line in _shard_rows(task, options.max_line_bytes):
        rows_in += 1
        if len(rows) == ROWS_PER_PART:  # Python rows of a part at a time, the shard in Arrow
            parts.append(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA))
            rows = []
        problems = _before_parsing(task, line, options.max_line_bytes)
        if problems is None:
            parsed = parse_line(
                line.data,
                spec,
                max_image_pixels=options.max_image_pixels,
                max_line_bytes=options.max_line_bytes,
            )
            if parsed.row is not None:
                rows.append(
                    {"sample_id": line.sid, "dataset": spec.name, "line": line.number, **parsed.row}
                )
                continue
            problems = parsed.problems
        line_entries = [_problem_entry(task, line, p) for p in problems]
        if line.data and line.data.strip() and problems[0].rule != "duplicate_sample":
            # The line never becomes a sample: its first ledger row shows what it held.
            first = line_entries[0]
            raw = f"{first.detail} | raw: {excerpt(line.data)}"
            line_entries[0] = replace(first, detail=raw)
        entries += line_entries
    parts.append(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA))
    return ShardOutput(pa.concat_tables(parts), ledger_table(entries), rows_in=rows_in)


def _before_parsing(task: ShardTask, line: _Line, max_line_bytes: int) -> list[Problem] | None:
    """What rejects a line before its JSON is read: the cut-off end of a ``.json`` array,
    a repeat of an earlier line, an array element too long to read or empty."""
    array = task.spans is not None
    if task.truncated and line.number == task.first_line + task.lines - 1:
        return [
            Problem(
                "malformed_json",
                "no closing ']' after this element: the file is cut off inside it, or an "
                "unclosed '{', '[' or '\"' in it runs to the end of the file",
            )
        ]
    if line.number in task.duplicates:
        first = task.duplicates[line.number]
        data = line.data
        if data is None:  # too long to read: hash it again as the plan did
            with open(task.spec.annotation, "rb") as f:
                start, end = task.spans[line.number - task.first_line].tolist()
                first_id = _streamed_id(f, start, end, task.spec.name, 0)
        else:
            first_id = sample_id(task.spec.name, data)
        unit = "element" if array else "line"
        return [Problem("duplicate_sample", f"same content as {unit} {first} (sample {first_id})")]
    if line.data is None:
        return [Problem("line_too_long", f"{line.size} bytes", line.size, max_line_bytes)]
    if array and not line.data:
        return [Problem("malformed_json", "an empty element (two commas in a row, or ',]')")]
    return None


def _problem_entry(task: ShardTask, line: _Line, p: Problem) -> LedgerEntry:
    spec = task.spec
    if p.rule == "duplicate_sample":  # the detail names the first copy, not this file
        where = ""
    elif task.spans is not None:
        where = f"{spec.annotation} element {line.number}: "
    else:
        where = f"{spec.annotation}:{line.number}: "
    return LedgerEntry(
        line.sid,
        spec.name,
        line.number,
        STAGE,
        p.rule,
        "reject",
        _float(p.value),
        _float(p.threshold),
        where + p.detail,
    )


def excerpt(data: bytes, max_chars: int = RAW_EXCERPT_CHARS) -> str:
    """The start of a raw line as readable text: invalid UTF-8 and control characters as
    ``\\xNN`` escapes (a NUL byte must not reach an HTML report), cut at ``max_chars``."""
    text = data[: 4 * max_chars + 4].decode("utf-8", "backslashreplace")
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= max_chars else text[:max_chars] + "…"


def _float(x: float | None) -> float | None:
    return None if x is None else float(x)


class IngestStage(ShardStage):
    """Annotation files named by a meta JSON -> ``samples/`` (the source of every run)."""

    name = STAGE

    def __init__(self, config: IngestConfig, meta: str | Path) -> None:
        super().__init__(config)
        self.meta = str(Path(meta).resolve())
        self.workers = cpu_workers(config.workers)
        self._tasks: dict[str, ShardTask] | None = None
        self._line_counts: dict[str, int] = {}
        self._specs: list[DatasetSpec] = []

    @property
    def table(self) -> str:
        return "samples"

    def tasks(self, run: RunFolder | None = None) -> dict[str, ShardTask]:
        """Planned once per command; an annotation file unchanged since the run's last
        command is not read again (the plan cache in ``RUN/_cache/ingest``)."""
        if self._tasks is None:
            self._specs = load_meta(self.meta)
            cache = run.path / "_cache" / "ingest" if run is not None else None
            self._tasks, self._line_counts = plan(
                self._specs, self.config.shard_lines, cache_dir=cache
            )
        return self._tasks

    def shards(self, run: RunFolder) -> list[str]:
        return list(self.tasks(run))

    def shard_inputs(self, run: RunFolder, shard: str) -> dict[str, str]:
        task = self.tasks(run)[shard]
        key = [task.spec.to_dict(), task.first_line, task.lines, sorted(task.duplicates.items())]
        if task.copies:  # only then: shards without repeats keep the inputs they always had
            key.append(sorted(task.copies.items()))
        return {"annotation": xxhash.xxh3_64_hexdigest(orjson.dumps(key)) + task.content}

    def prepare(self, run: RunFolder) -> None:
        self.tasks(run)
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
