"""The stage contract: what a stage declares and the one function it implements.

A stage is small and knows nothing of markers, counts, stats, progress, locks or executors
(``curate.core.engine`` owns all of those). It declares:

- ``name``: its name in the pipeline, its ledger folder and (by default) its table folder;
- ``config``: its pydantic settings; ``settings()`` is the part that decides its results
  (worker counts and batch sizes are left out, so changing them redoes nothing);
- ``reads``: the stages whose outputs it reads; their outputs' hashes are its inputs, so a
  change upstream redoes exactly the shards that read what changed;
- ``respects``: the stages whose rejections remove a sample from its input (score does not
  judge what the filters rejected; pack packs what every earlier stage and review kept);

and implements either

- ``process(ShardInput) -> ShardOutput`` for one shard (``ShardStage``: ingest, budget,
  filter, score, tokenize), or
- ``run(GlobalInput) -> GlobalOutput`` once over the whole run (``GlobalStage``: the
  duplicate pass, repeat copies, pack, train, report).

Tables a stage returns are keyed by sample: every row has ``sample_id``, ``dataset`` and
``line``; a row is a sample the stage kept (or flagged, or scored), a ledger row is one failed
rule. The engine checks that every input sample comes out as a row or a rejection, once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from curate.core.folder import RunFolder
from curate.core.records import LEDGER_SCHEMA
from curate.core.status import sample_status


@dataclass
class ShardOutput:
    """One shard's result: the stage's table and its ledger rows.

    ``rows_in`` is for source stages only (ingest: annotation lines read); other stages' input
    is counted by the engine.
    """

    rows: pa.Table
    ledger: pa.Table = field(default_factory=LEDGER_SCHEMA.empty_table)
    rows_in: int | None = None


@dataclass(frozen=True)
class ShardInput:
    """What a stage may read for one shard (picklable: it travels to worker processes)."""

    run_path: str
    shard: str
    respects: tuple[str, ...] = ()

    @property
    def run(self) -> RunFolder:
        return RunFolder(self.run_path)

    def table(self, name: str, columns: Sequence[str] | None = None) -> pa.Table:
        """This shard of a run table (``samples``, ``budget``, ``filter``, ...)."""
        return self.run.read(name, [self.shard], columns=columns)

    def samples(self, columns: Sequence[str] | None = None) -> pa.Table:
        """This shard's samples, less those a respected earlier stage rejected."""
        table = self.table("samples", columns)
        if not self.respects:
            return table
        rejected = rejected_ids(self.run, self.respects, [self.shard])
        if not rejected:
            return table
        ids = table.column("sample_id")
        keep = pc.invert(pc.is_in(ids, pa.array(sorted(rejected))))
        return table.filter(keep)


def rejected_ids(run: RunFolder, stages: Sequence[str], shards: Sequence[str]) -> set[str]:
    """Sample ids the ledgers of ``stages`` reject in ``shards`` (before review decisions:
    a shard stage's input does not change when a reviewer decides; pack's does)."""
    ids: set[str] = set()
    for stage in stages:
        for shard in shards:
            path = run.ledger_path(stage, shard)
            if path.exists():
                t = pq.read_table(path, columns=["sample_id", "severity"])
                sev = t.column("severity")
                ids.update(t.filter(pc.equal(sev, "reject"))["sample_id"].to_pylist())
    return ids


@dataclass
class GlobalInput:
    """What a global stage may read: the run, its staging folder, and its eligible samples."""

    run: RunFolder
    out: Path  # write outputs here; the engine swaps them into the run folder when done
    respects: tuple[str, ...] = ()
    requires: dict[str, str] = field(default_factory=dict)  # stage -> its table
    flagged: str = "exclude"

    _status: object = field(default=None, init=False, repr=False)

    def status(self):
        """Every sample's status from the respected stages' ledgers and review decisions
        (computed once: the stage and the engine's count check both ask)."""
        if self._status is None:
            self._status = sample_status(self.run, self.respects, self.requires, self.flagged)
        return self._status


@dataclass
class GlobalOutput:
    """A global stage's result.

    ``rows``: per-sample outcome (``sample_id``, ``dataset``, ``line`` + the stage's columns)
    for the samples it kept; ``ledger``: the ones it rejected. Both may be None for a stage
    that does not decide on samples (train, report). ``report``: the stage's own measures,
    saved in its stats. ``written``: files it wrote itself (not under ``GlobalInput.out``),
    which the engine hashes and checks are still there on the next run.
    """

    rows: pa.Table | None = None
    ledger: pa.Table | None = None
    report: dict = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)


class Stage:
    """What every stage declares (see the module docstring)."""

    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ()
    respects: ClassVar[tuple[str, ...]] = ()
    # Settings fields that change speed, not results (a change redoes nothing).
    speed_fields: ClassVar[frozenset[str]] = frozenset({"workers", "batch_rows"})

    def __init__(self, config: BaseModel) -> None:
        self.config = config

    @property
    def table(self) -> str:
        """The folder its rows go to."""
        return self.name

    def settings(self) -> dict:
        return self.config.model_dump(mode="json", exclude=set(self.speed_fields))

    def extra_inputs(self, run: RunFolder) -> dict[str, str]:
        """Inputs outside the run's tables (files, review decisions), by name -> identity."""
        return {}


def cpu_workers(configured: int | None) -> int:
    """Processes for a stage's shards: the configured number, else every core."""
    return configured or os.cpu_count() or 1


class ShardStage(Stage):
    """A stage applied shard by shard, independently (in parallel, on any executor)."""

    workers: int = 1
    # Rows per Parquet row group of its output (None: one group). Small groups let a reader
    # fetch one row without decoding the shard (the trainer reads samples from ``tokens/``).
    row_group_rows: ClassVar[int | None] = None

    def shards(self, run: RunFolder) -> list[str]:
        """The shards to process: by default, every ingested shard."""
        return run.shards("samples")

    def shard_inputs(self, run: RunFolder, shard: str) -> dict[str, str]:
        """Inputs of one shard outside the run's tables (ingest: its annotation bytes)."""
        return {}

    def prepare(self, run: RunFolder) -> None:
        """Called once on the driver before shards run (load what every shard shares)."""

    def process(self, shard: ShardInput) -> ShardOutput:
        raise NotImplementedError


class GlobalStage(Stage):
    """A stage run once over the whole run (it sees every sample)."""

    # Run folders it writes: staged under ``GlobalInput.out`` and swapped in when it is done.
    outputs: ClassVar[tuple[str, ...]] = ()
    # Stages that must have judged every eligible sample (pack requires score when scored).
    requires: tuple[str, ...] = ()
    flagged: str = "exclude"

    def run(self, inp: GlobalInput) -> GlobalOutput:
        raise NotImplementedError
