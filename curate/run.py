"""The run folder and the stage bookkeeping every stage shares.

Layout of a run folder::

    RUN/
      run.json                  what the run was made from (meta JSON, dataset specs)
      samples/<shard>.parquet   ingest output: kept sample rows
      <stage>/<shard>.parquet   each stage's per-sample output (budget/, filter/, scores/, ...)
      ledger/<stage>/<shard>.parquet   every rejected or flagged sample, one row per rule
      stats/<stage>.json        counts per dataset and rule, written when the stage finishes
      _done/<stage>/<shard>.json       completion marker with the shard's counts
      .lock                     held while a command works on the run

A shard is finished when its marker exists; the marker is written last, after the shard's
outputs and ledger were renamed into place, so a crash at any point leaves either a finished
shard or one that is redone in full on the next run. Counts are checked per shard:
``rows_in == rows_kept + rows_rejected``.
"""

from __future__ import annotations

import fcntl
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import xxhash

from curate.io import read_json, read_parquet_files, write_json_atomic, write_parquet_atomic
from curate.records import LEDGER_SCHEMA

if TYPE_CHECKING:
    from curate.executors import Executor


class RunLockedError(RuntimeError):
    """Another process is working on this run folder."""


class CountInvariantError(RuntimeError):
    """A stage lost or invented rows: rows_in != rows_kept + rows_rejected."""


@dataclass
class ShardResult:
    """What a stage made of one shard: its outputs by run subfolder, its ledger, its counts.

    ``rows_by_dataset`` maps dataset -> [rows_in, kept, rejected, flagged] for the stats table.
    """

    outputs: dict[str, pa.Table]
    ledger: pa.Table
    rows_in: int
    rows_kept: int
    rows_rejected: int
    rows_flagged: int = 0
    rows_by_dataset: dict[str, list[int]] = field(default_factory=dict)

    def check(self, stage: str, shard: str) -> None:
        if self.rows_in != self.rows_kept + self.rows_rejected:
            raise CountInvariantError(
                f"{stage}/{shard}: rows in {self.rows_in} != kept {self.rows_kept} "
                f"+ rejected {self.rows_rejected}"
            )


@dataclass
class StageSummary:
    """Totals of a stage over all its shards (finished earlier or now)."""

    stage: str
    shards: int = 0
    shards_skipped: int = 0
    rows_in: int = 0
    rows_kept: int = 0
    rows_rejected: int = 0
    rows_flagged: int = 0
    seconds: float = 0.0
    by_dataset: dict[str, list[int]] = field(default_factory=dict)
    by_rule: dict[str, int] = field(default_factory=dict)


class RunFolder:
    """A run folder: paths of stage outputs, ledgers, markers and stats."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def dir(self, name: str) -> Path:
        return self.path / name

    def shard_path(self, name: str, shard: str) -> Path:
        return self.path / name / f"{shard}.parquet"

    def ledger_path(self, stage: str, shard: str) -> Path:
        return self.path / "ledger" / stage / f"{shard}.parquet"

    def marker_path(self, stage: str, shard: str) -> Path:
        return self.path / "_done" / stage / f"{shard}.json"

    def stats_path(self, stage: str) -> Path:
        return self.path / "stats" / f"{stage}.json"

    def is_done(self, stage: str, shard: str, fingerprint: str = "") -> bool:
        """A shard is done when its marker exists and was made with the same settings."""
        marker = self.marker_path(stage, shard)
        return marker.exists() and read_json(marker).get("fingerprint", "") == fingerprint

    def shards(self, name: str = "samples") -> list[str]:
        """Shard names present in a subfolder, sorted (temp files are never listed)."""
        folder = self.path / name
        if not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob("*.parquet") if not p.name.startswith("."))

    def read(self, name: str, shards: Sequence[str] | None = None, schema=None) -> pa.Table:
        shards = self.shards(name) if shards is None else shards
        return read_parquet_files([self.shard_path(name, s) for s in shards], schema)

    def ledger(self, stage: str | None = None) -> pa.Table:
        """All ledger rows, of one stage or of every stage."""
        root = self.path / "ledger"
        pattern = f"{stage}/*.parquet" if stage else "*/*.parquet"
        files = sorted(p for p in root.glob(pattern) if not p.name.startswith("."))
        return read_parquet_files(files, LEDGER_SCHEMA)

    def stats(self, stage: str) -> dict | None:
        p = self.stats_path(stage)
        return read_json(p) if p.exists() else None

    def clear_stage(self, stage: str, outputs: Sequence[str]) -> None:
        """Forget a stage's results so it runs again (used when its settings change)."""
        for sub in [*outputs, f"ledger/{stage}", f"_done/{stage}"]:
            folder = self.path / sub
            if folder.is_dir():
                for p in folder.iterdir():
                    p.unlink()
        self.stats_path(stage).unlink(missing_ok=True)

    def remove_stale_temp_files(self) -> int:
        """Delete temp files a killed process left (only safe while holding the lock)."""
        stale = [p for p in self.path.rglob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's lock; a second process on the same run gets RunLockedError."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise RunLockedError(
                    f"run folder {self.path} is in use by another curate process; "
                    "wait for it to finish (or remove .lock if that process is gone)"
                ) from e
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self.remove_stale_temp_files()
            yield
        finally:
            os.close(fd)


def commit_shard(
    run: RunFolder,
    stage: str,
    shard: str,
    result: ShardResult,
    seconds: float,
    fingerprint: str = "",
) -> dict:
    """Write a shard's outputs and ledger atomically, then its marker (last: it means 'done')."""
    result.check(stage, shard)
    for name, table in result.outputs.items():
        write_parquet_atomic(table, run.shard_path(name, shard))
    write_parquet_atomic(result.ledger, run.ledger_path(stage, shard))
    rules = Counter(
        f"{sev}:{rule}"
        for rule, sev in zip(
            result.ledger.column("rule").to_pylist(),
            result.ledger.column("severity").to_pylist(),
            strict=True,
        )
    )
    marker = {
        "rows_in": result.rows_in,
        "rows_kept": result.rows_kept,
        "rows_rejected": result.rows_rejected,
        "rows_flagged": result.rows_flagged,
        "by_dataset": result.rows_by_dataset,
        "by_rule": dict(rules),
        "seconds": round(seconds, 3),
        "fingerprint": fingerprint,
    }
    write_json_atomic(marker, run.marker_path(stage, shard))
    return marker


def _add_marker(summary: StageSummary, marker: dict) -> None:
    summary.shards += 1
    summary.rows_in += marker["rows_in"]
    summary.rows_kept += marker["rows_kept"]
    summary.rows_rejected += marker["rows_rejected"]
    summary.rows_flagged += marker["rows_flagged"]
    summary.seconds += marker["seconds"]
    for ds, counts in marker["by_dataset"].items():
        acc = summary.by_dataset.setdefault(ds, [0] * len(counts))
        summary.by_dataset[ds] = [a + b for a, b in zip(acc, counts, strict=True)]
    for rule, n in marker["by_rule"].items():
        summary.by_rule[rule] = summary.by_rule.get(rule, 0) + n


def run_shards(
    run: RunFolder,
    stage: str,
    shards: Sequence[str],
    process: Callable[[str], ShardResult],
    *,
    workers: int = 1,
    on_shard: Callable[[str, dict], None] | None = None,
    fingerprint: str = "",
    executor: Executor | None = None,
) -> StageSummary:
    """Run ``process`` on every unfinished shard, commit each, and total all markers.

    ``executor`` decides where ``process(shard)`` runs (``curate.executors``; default: this
    machine, ``workers`` processes); the commits, markers and stats happen here, on the
    driver, whichever it is. ``process`` must be picklable when ``workers > 1`` or on Ray (a
    module-level function or a ``functools.partial`` of one). Finished shards are skipped, so
    a rerun after a crash only does what is missing. ``on_shard(shard, marker)`` is called
    after each commit (progress bars live in the caller). ``fingerprint`` names the stage's
    settings: a shard finished under other settings is done again.
    """
    from curate.executors import LocalExecutor

    todo = [s for s in shards if not run.is_done(stage, s, fingerprint)]
    executor = executor or LocalExecutor()
    for shard, result, seconds in executor.map_shards(process, todo, workers=workers):
        marker = commit_shard(run, stage, shard, result, seconds, fingerprint)
        if on_shard:
            on_shard(shard, marker)
    return finish_stage(run, stage, shards, skipped=len(shards) - len(todo))


def settings_fingerprint(*parts: object) -> str:
    """A short stable hash of a stage's settings (pydantic models, paths, strings)."""
    h = xxhash.xxh3_64()
    for part in parts:
        text = part.model_dump_json() if hasattr(part, "model_dump_json") else str(part)
        h.update(text.encode())
        h.update(b"\x00")
    return h.hexdigest()


def finish_stage(
    run: RunFolder, stage: str, shards: Sequence[str], skipped: int = 0
) -> StageSummary:
    """Total the markers of ``shards`` into stats/<stage>.json and return the summary."""
    summary = StageSummary(stage=stage, shards_skipped=skipped)
    for shard in shards:
        _add_marker(summary, read_json(run.marker_path(stage, shard)))
    summary.seconds = round(summary.seconds, 3)
    write_json_atomic(asdict(summary), run.stats_path(stage))
    return summary
