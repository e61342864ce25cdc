"""Out-of-core partitions: rows spilled to Parquet shard by shard, read back one range of a
hash at a time, so that every row sharing a key is in memory together but never every row.

Each ``write`` (one shard's rows) becomes one file sorted by its uint64 ``part`` column (a
hash of the grouping key: equal keys, equal ``part``), in row groups of ``ROW_GROUP`` rows
whose first and last ``part`` are remembered. ``parts(partition_rows)`` then cuts the hash
space into ceil(rows / partition_rows) equal ranges, chosen after the spill from the rows
actually written, and reads each range from every file (only the row groups that overlap
it). Memory: one range, about ``partition_rows`` rows, whatever the run's size (a key that
more rows share than that comes whole: its rows must meet).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Small row groups: a range reads at most two partial groups per file beyond its own rows.
ROW_GROUP = 8192
_SPAN = 1 << 64  # part is a uint64 hash: ranges split [0, 2^64)


@dataclass(frozen=True)
class _File:
    path: Path
    first: list[int]  # part of each row group's first row
    last: list[int]  # and of its last


class Spill:
    """Rows with a uint64 ``part`` column, written shard by shard and read back by range."""

    def __init__(self, folder: Path, schema: pa.Schema) -> None:
        self.folder = folder
        self.schema = schema
        self.files: list[_File] = []
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        """Spill one batch (sorted here by ``part``); an empty batch writes nothing."""
        if not len(table):
            return
        table = table.select(self.schema.names).cast(self.schema)
        sort = np.argsort(table.column("part").to_numpy())  # numpy's is ~8x arrow's sort_by
        table = table.take(sort)
        part = table.column("part").to_numpy()
        path = self.folder / f"{len(self.files):06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Hashes defeat dictionary encoding (tried per page: 3x the write time); the row group
        # bounds are kept here, not in statistics.
        with pq.ParquetWriter(
            path, self.schema, compression="zstd", use_dictionary=False, write_statistics=False
        ) as writer:
            for start in range(0, len(table), ROW_GROUP):
                writer.write_table(table.slice(start, ROW_GROUP))
        starts = range(0, len(table), ROW_GROUP)
        first = [int(part[s]) for s in starts]
        last = [int(part[min(s + ROW_GROUP, len(table)) - 1]) for s in starts]
        self.files.append(_File(path, first, last))
        self.rows += len(table)

    def ranges(self, partition_rows: int) -> list[tuple[int, int]]:
        """[lo, hi) ranges of ``part`` holding about ``partition_rows`` rows each."""
        n = max(1, -(-self.rows // max(partition_rows, 1)))
        bounds = [k * _SPAN // n for k in range(n)] + [_SPAN]
        return list(zip(bounds[:-1], bounds[1:], strict=True))

    def parts(self, partition_rows: int) -> Iterator[pa.Table]:
        """Every row once, one range at a time (rows sharing ``part`` come together)."""
        for lo, hi in self.ranges(partition_rows):
            yield self.read(lo, hi)

    def read(self, lo: int, hi: int) -> pa.Table:
        """The rows with lo <= part < hi, from every file."""
        pieces = []
        for f in self.files:
            spans = zip(f.first, f.last, strict=True)
            groups = [g for g, (first, last) in enumerate(spans) if first < hi and last >= lo]
            if not groups:
                continue
            with pq.ParquetFile(f.path) as file:
                table = file.read_row_groups(groups)
            part = table.column("part").to_numpy()
            start = int(np.searchsorted(part, np.uint64(lo), side="left"))
            end = len(part) if hi >= _SPAN else int(np.searchsorted(part, np.uint64(hi), "left"))
            pieces.append(table.slice(start, end - start))
        if not pieces:
            return self.schema.empty_table()
        return pa.concat_tables(pieces).combine_chunks()
