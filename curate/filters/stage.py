"""The filter stage: ``samples/`` shards -> ``filter/`` shards + ``ledger/filter``.

First one global pass hashes every sample's content to find exact duplicates across all
shards and datasets (the first by dataset order and line is kept). Then each shard, in
parallel, is measured in vectorised batches and judged: a sample failing any ``reject`` rule
is rejected; one failing only ``flag`` rules is kept and flagged for review; each failed rule
of each sample is one ledger row. ``filter/<shard>.parquet`` has one row per kept (or
flagged) sample with every metric, the names of its failed rules, ``repetition_suspect`` (what
the LLM repetition check should look at) and ``decision``.
"""

from __future__ import annotations

import os
from functools import partial

import pyarrow as pa

from curate.filters.config import FilterConfig
from curate.filters.dedup import FirstCopy, find_duplicates
from curate.filters.registry import REPETITION_RULES
from curate.filters.rules import METRICS, Batch, Reason, judge, measure
from curate.io import read_json, write_json_atomic
from curate.records import LedgerEntry, ledger_table
from curate.run import RunFolder, ShardResult, StageSummary, run_shards

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
    table: pa.Table, cfg: FilterConfig, duplicates: dict[str, FirstCopy]
) -> tuple[list[dict], list[LedgerEntry], dict[str, list[int]]]:
    """Measure and judge sample rows: output rows, ledger entries, counts per dataset."""
    rows, entries, by_ds = [], [], {}
    pixels: dict = {}
    for start in range(0, len(table), cfg.batch_rows):
        part = table.slice(start, cfg.batch_rows)
        batch = Batch.of(part, duplicates)
        batch.pixels = pixels  # images shared by samples of one shard are decoded once
        metrics = measure(batch, cfg)
        reasons = judge(batch, metrics, cfg)
        ids = part.column("sample_id").to_pylist()
        datasets = part.column("dataset").to_pylist()
        lines = part.column("line").to_pylist()
        for i, (sid, ds, line, why) in enumerate(zip(ids, datasets, lines, reasons, strict=True)):
            decision = decide(why)
            counts = by_ds.setdefault(ds, [0, 0, 0, 0])  # in, kept, rejected, flagged
            counts[0] += 1
            counts[1 if decision != "reject" else 2] += 1
            counts[3] += decision == "flag"
            entries += [
                LedgerEntry(
                    sid, ds, line, STAGE, r.rule, r.severity, r.value, r.threshold, r.detail
                )
                for r in why
            ]
            if decision == "reject":
                continue
            rows.append(
                {
                    "sample_id": sid,
                    "dataset": ds,
                    "line": line,
                    **{m: float(metrics[m][i]) for m in METRICS},
                    "flags": [r.rule for r in why],
                    "repetition_suspect": any(r.rule in REPETITION_RULES for r in why),
                    "decision": decision,
                }
            )
    return rows, entries, by_ds


def process_shard(
    run_path: str, cfg: FilterConfig, duplicates: dict[str, FirstCopy], shard: str
) -> ShardResult:
    table = RunFolder(run_path).read("samples", [shard])
    rows, entries, by_ds = filter_table(table, cfg, duplicates)
    rejected = sum(c[2] for c in by_ds.values())
    return ShardResult(
        outputs={STAGE: pa.Table.from_pylist(rows, schema=FILTER_SCHEMA)},
        ledger=ledger_table(entries),
        rows_in=len(table),
        rows_kept=len(table) - rejected,
        rows_rejected=rejected,
        rows_flagged=sum(c[3] for c in by_ds.values()),
        rows_by_dataset=by_ds,
    )


def dataset_order(run: RunFolder) -> list[str]:
    """Datasets in meta-file order (run.json lists them sorted: read the meta when it exists)."""
    from curate.ingest.meta import MetaError, load_meta
    from curate.ingest.stage import load_datasets

    try:
        return [s.name for s in load_meta(read_json(run.path / "run.json")["meta"])]
    except (OSError, KeyError, MetaError):
        return list(load_datasets(run))


def check_overrides(run: RunFolder, cfg: FilterConfig) -> None:
    """An override naming no dataset or domain of this run is a typo: say so."""
    from curate.ingest.stage import load_datasets

    datasets = load_datasets(run)
    known = set(datasets) | {d.get("domain") for d in datasets.values()}
    unknown = sorted(set(cfg.overrides) - known)
    if unknown:
        raise ValueError(
            f"filter overrides name unknown datasets/domains {unknown}; "
            f"known: {sorted(k for k in known if k)}"
        )


def _settings(cfg: FilterConfig) -> dict:
    # What decides the results (not how fast they come): a change means the stage reruns.
    return cfg.model_dump(mode="json", exclude={"workers", "batch_rows"})


def run_filter(
    run: RunFolder, config: FilterConfig | None = None, on_shard=None, executor=None
) -> StageSummary:
    """Filter every ingested shard of the run; finished shards are skipped, unless the rule
    settings changed since they were filtered (then the whole stage runs again).
    ``executor`` (``curate.executors``) decides where shards are filtered; default: here."""
    cfg = config or FilterConfig()
    check_overrides(run, cfg)
    settings_path = run.path / "stats" / "filter_settings.json"
    if settings_path.exists() and read_json(settings_path) != _settings(cfg):
        run.clear_stage(STAGE, [STAGE])
    write_json_atomic(_settings(cfg), settings_path)
    shards = run.shards("samples")
    workers = cfg.workers or os.cpu_count() or 1
    todo = [s for s in shards if not run.is_done(STAGE, s)]
    duplicates = find_duplicates(run, shards, dataset_order(run), workers) if todo else {}
    process = partial(process_shard, str(run.path), cfg, duplicates)
    return run_shards(
        run, STAGE, shards, process, workers=workers, on_shard=on_shard, executor=executor
    )
