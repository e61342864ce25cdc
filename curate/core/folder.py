"""The run folder: where every table, ledger, marker and stat of a run lives, and its lock.

Layout::

    RUN/
      run.json                    what the run was made from (meta JSON, datasets, tokenizer)
      samples/<shard>.parquet     ingest output: one row per sample
      <table>/<shard>.parquet     each shard stage's table (budget/, filter/, scores/, ...)
      <folder>/                   a global stage's output (repeat/, packs/, train/, ...)
      ledger/<stage>/<shard>.parquet  every rejected or flagged sample, one row per failed rule
      _done/<stage>/<shard>.json  the engine's marker: what the shard was made from, its counts
      stats/<stage>.json          a stage's totals per dataset and rule
      review/decisions.parquet    review decisions (``curate review``)
      .lock                       held (with pid and command) while a command works on the run

This module knows paths, reads and the lock; ``curate.core.engine`` decides what to (re)do.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.errors import CurateError
from curate.core.io import read_json, read_parquet_files, write_json_atomic
from curate.core.records import LEDGER_SCHEMA


class RunLockedError(CurateError):
    """Another process is working on this run folder."""


class CountInvariantError(RuntimeError):
    """A stage lost or invented rows: rows_in != rows_kept + rows_rejected (a bug, not input)."""


@contextmanager
def exclusive_file_lock(path: Path, busy: Callable[[str], Exception]) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (made if missing) and yield its descriptor,
    emptied for the holder to describe itself; while another process holds it, raise
    ``busy(what that process wrote)`` at once. The lock goes with the process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise busy(holder) from None
        os.ftruncate(fd, 0)
        yield fd
    finally:
        os.close(fd)


class RunFolder:
    """A run folder: paths of tables, ledgers, markers and stats, reads, and the lock."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def shard_path(self, name: str, shard: str) -> Path:
        return self.path / name / f"{shard}.parquet"

    def ledger_path(self, stage: str, shard: str) -> Path:
        return self.path / "ledger" / stage / f"{shard}.parquet"

    def marker_path(self, stage: str, shard: str) -> Path:
        return self.path / "_done" / stage / f"{shard}.json"

    def stats_path(self, stage: str) -> Path:
        return self.path / "stats" / f"{stage}.json"

    def marker(self, stage: str, shard: str) -> dict | None:
        path = self.marker_path(stage, shard)
        return read_json(path) if path.exists() else None

    def markers(self, stage: str) -> dict[str, dict]:
        """Every marker of a stage, by shard name."""
        folder = self.path / "_done" / stage
        if not folder.is_dir():
            return {}
        return {
            p.stem: read_json(p)
            for p in sorted(folder.glob("*.json"))
            if not p.name.startswith(".")
        }

    def shards(self, name: str = "samples") -> list[str]:
        """Shard names present in a table folder, sorted (temp files are never listed)."""
        folder = self.path / name
        if not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob("*.parquet") if not p.name.startswith("."))

    def read(
        self,
        name: str,
        shards: Sequence[str] | None = None,
        schema: pa.Schema | None = None,
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        shards = self.shards(name) if shards is None else shards
        paths = [self.shard_path(name, s) for s in shards]
        if columns is None:
            return read_parquet_files(paths, schema)
        tables = [pq.read_table(p, columns=list(columns)) for p in paths]
        if not tables:
            if schema is None:
                raise ValueError("no files to read and no schema for an empty table")
            return pa.schema([schema.field(c) for c in columns]).empty_table()
        return pa.concat_tables(tables, promote_options="default")

    def ledger(self, stage: str | None = None, stages: Sequence[str] | None = None) -> pa.Table:
        """Ledger rows of one stage, of the named stages, or (neither given) of every stage."""
        root = self.path / "ledger"
        names = [stage] if stage else list(stages) if stages is not None else None
        if names is None:
            files = sorted(p for p in root.glob("*/*.parquet") if not p.name.startswith("."))
        else:
            files = [
                p
                for n in names
                for p in sorted((root / n).glob("*.parquet"))
                if not p.name.startswith(".")
            ]
        return read_parquet_files(files, LEDGER_SCHEMA)

    def stats(self, stage: str) -> dict | None:
        p = self.stats_path(stage)
        return read_json(p) if p.exists() else None

    # -- run.json: what the run was made from ------------------------------------------------
    def info(self) -> dict:
        path = self.path / "run.json"
        return read_json(path) if path.exists() else {}

    def record_info(self, **fields: object) -> None:
        """Add or replace fields of run.json (only while holding the lock)."""
        write_json_atomic({**self.info(), **fields}, self.path / "run.json")

    def datasets(self) -> dict[str, dict]:
        """Dataset specs (and line counts) that ingest recorded, in meta-file order."""
        info = self.info()
        if "datasets" not in info:
            raise CurateError(f"{self.path} has no ingested datasets: run `curate ingest` first")
        return info["datasets"]

    # -- the lock ------------------------------------------------------------------------------
    def remove_stale_temp_files(self) -> int:
        """Delete temp files a killed process left (only safe while holding the lock)."""
        stale = [p for p in self.path.rglob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's lock; a second process gets RunLockedError naming the holder."""

        def busy(holder: str) -> RunLockedError:
            return RunLockedError(
                f"run folder {self.path} is in use by another curate process "
                f"({holder}); wait for it to finish"
            )

        with exclusive_file_lock(self.path / ".lock", busy) as fd:
            command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
            os.pwrite(fd, f"pid {os.getpid()}: {command}".encode(), 0)
            self.remove_stale_temp_files()
            yield
