"""The filter stage: ``samples/`` shards -> ``filter/`` shards + ``ledger/filter``.

The duplicate pass (``dedup.DuplicatesStage``, a global stage before this one) has found exact
duplicates across all shards and datasets (the first by dataset order and line is kept). Then
each shard, in parallel, is measured in vectorised batches and judged: a sample failing any
``reject`` rule is rejected; one failing only ``flag`` rules is kept and flagged for review;
each failed rule of each sample is one ledger row. ``filter/<shard>.parquet`` has one row per
kept (or flagged) sample with every metric, the names of its failed rules,
``repetition_suspect`` (what the LLM repetition check should look at) and ``decision``.

Images are decoded once per run: a shard looks each image up in ``RUN/_cache/filter/`` (by
resolved path, size and mtime) before decoding it, and adds what it decoded; ``prepare``
merges the cache's part files when they pile up. ``images.read_cache_stats`` sums the shards'
lookups, cache hits, decodes and decode rate.
"""

from __future__ import annotations

import os

import pyarrow as pa

from curate.core.errors import CurateError
from curate.core.folder import RunFolder
from curate.core.records import LedgerEntry, ledger_table
from curate.core.stage import ShardInput, ShardOutput, ShardStage
from curate.stages.filters.config import FilterConfig
from curate.stages.filters.dedup import FirstCopy, read_duplicates
from curate.stages.filters.images import PixelCache, compact_cache
from curate.stages.filters.registry import REPETITION_RULES
from curate.stages.filters.rules import METRICS, Batch, Reason, judge, measure

STAGE = "filter"
FILTER_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("dataset", pa.string()), ("line", pa.int64())]
    + [(m, pa.float64()) for m in METRICS]
    + [
        ("flags", pa.list_(pa.string())),
        ("repetition_suspect", pa.bool_()),
        ("decision", pa.string()),
    ]  # keep | flag (rejected samples are in the ledger only)
)


def decide(reasons: list[Reason]) -> str:
    """reject if any reject rule failed, flag if only flag rules failed, else keep."""
    if any(r.severity == "reject" for r in reasons):
        return "reject"
    return "flag" if reasons else "keep"


def filter_table(
    table: pa.Table,
    cfg: FilterConfig,
    duplicates: dict[str, FirstCopy],
    pixels: PixelCache | None = None,
) -> tuple[pa.Table, list[LedgerEntry]]:
    """Measure and judge sample rows: the kept and flagged rows (FILTER_SCHEMA) and the ledger
    entries. ``pixels``: where decoded images are looked up (and kept) across batches."""
    parts, entries = [], []
    pixels = PixelCache() if pixels is None else pixels
    for start in range(0, len(table), cfg.batch_rows):
        part = table.slice(start, cfg.batch_rows)
        batch = Batch.of(part, duplicates)
        batch.pixels = pixels  # images shared by samples are decoded once
        metrics = measure(batch, cfg)
        reasons = judge(batch, metrics, cfg)
        ids = part.column("sample_id").to_pylist()
        datasets = part.column("dataset").to_pylist()
        lines = part.column("line").to_pylist()
        decisions = [decide(why) for why in reasons]
        for sid, ds, line, why in zip(ids, datasets, lines, reasons, strict=True):
            entries += [
                LedgerEntry(
                    sid, ds, line, STAGE, r.rule, r.severity, r.value, r.threshold, r.detail
                )
                for r in why
            ]
        columns = {
            "sample_id": part.column("sample_id"),
            "dataset": part.column("dataset"),
            "line": part.column("line"),
            **{m: pa.array(metrics[m], pa.float64()) for m in METRICS},
            "flags": pa.array([[r.rule for r in why] for why in reasons], pa.list_(pa.string())),
            "repetition_suspect": pa.array(
                [any(r.rule in REPETITION_RULES for r in why) for why in reasons], pa.bool_()
            ),
            "decision": pa.array(decisions, pa.string()),
        }
        kept = pa.array([d != "reject" for d in decisions], pa.bool_())
        parts.append(pa.table(columns, schema=FILTER_SCHEMA).filter(kept))
    return (pa.concat_tables(parts) if parts else FILTER_SCHEMA.empty_table()), entries


class FilterStage(ShardStage):
    """Heuristic rules and repetition detectors on every ingested shard (``filter/``)."""

    name = STAGE
    reads = ("ingest", "duplicates")

    def __init__(self, config: FilterConfig) -> None:
        super().__init__(config)
        self.workers = config.workers or os.cpu_count() or 1

    def prepare(self, run: RunFolder) -> None:
        check_overrides(run, self.config)
        if self.config.decode_images:
            compact_cache(run.path)

    def process(self, shard: ShardInput) -> ShardOutput:
        duplicates = read_duplicates(shard.table("duplicates"))
        pixels = PixelCache(shard.run_path if self.config.decode_images else None)
        rows, entries = filter_table(shard.table("samples"), self.config, duplicates, pixels)
        pixels.save(shard.shard)
        return ShardOutput(rows, ledger_table(entries))


def check_overrides(run: RunFolder, cfg: FilterConfig) -> None:
    """An override naming no dataset or domain of this run is a typo: say so."""
    datasets = run.datasets()
    known = set(datasets) | {d.get("domain") for d in datasets.values()}
    unknown = sorted(set(cfg.overrides) - known)
    if unknown:
        raise CurateError(
            f"filter overrides name unknown datasets/domains {unknown}; "
            f"known: {sorted(k for k in known if k)}"
        )
