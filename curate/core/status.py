"""Review decisions and every sample's status, computed from the stages before the one asking.

A sample's status (keep / reject / flag) comes from the ledgers of the stages named, never
from the asking stage's own earlier output, plus review decisions. A stage that must have
judged every sample (``requires``: pack requires score when the pipeline scores) adds a
``<stage>_missing`` rejection for each sample it has no row and no ledger row for.

The paper reviews flagged samples by hand before removal. A decision overrides the ledger:

- per sample: ``keep`` (restore a rejected sample, accept a flagged one) or ``reject``;
- per rule of a dataset (``sample_id`` null, ``dataset`` and ``rule`` set): ``keep`` waives that
  rule's failures for the dataset, ``reject`` turns that rule's flags into rejections.

A sample-level decision wins over rule-level ones; the latest decision for a key wins.
"""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.folder import RunFolder
from curate.core.io import write_parquet_atomic

DECISION_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),  # null for a per-rule decision
        ("dataset", pa.string()),
        ("rule", pa.string()),  # null for a per-sample decision
        ("decision", pa.string()),  # keep | reject
        ("note", pa.string()),
        ("decided_at", pa.float64()),  # unix seconds: later decisions win
    ]
)


def decisions_path(run: RunFolder) -> Path:
    return run.path / "review" / "decisions.parquet"


def load_decisions(run: RunFolder) -> pl.DataFrame:
    path = decisions_path(run)
    table = pq.read_table(path) if path.exists() else DECISION_SCHEMA.empty_table()
    return pl.from_arrow(table)


def add_decisions(run: RunFolder, rows: list[dict], now: float | None = None) -> int:
    """Append decisions (dicts with DECISION_SCHEMA keys; ``decided_at`` filled in: ``now``,
    else the current time, so a caller that may undo them knows their timestamp)."""
    for r in rows:
        if r.get("decision") not in ("keep", "reject"):
            raise ValueError(f"decision must be keep or reject, got {r.get('decision')!r}")
        if not r.get("sample_id") and not (r.get("dataset") and r.get("rule")):
            raise ValueError("a decision names a sample_id, or a dataset and a rule")
    now = time.time() if now is None else now
    new = pa.Table.from_pylist(
        [{**{k: None for k in DECISION_SCHEMA.names}, **r, "decided_at": now} for r in rows],
        schema=DECISION_SCHEMA,
    )
    table = pa.concat_tables([load_decisions(run).to_arrow().cast(DECISION_SCHEMA), new])
    write_parquet_atomic(table, decisions_path(run))
    return len(rows)


def withdraw_decision(
    run: RunFolder,
    decided_at: float,
    sample_id: str | None = None,
    dataset: str | None = None,
    rule: str | None = None,
) -> int:
    """Remove the decision made at ``decided_at`` for a sample (``sample_id``) or a rule of a
    dataset (``dataset`` and ``rule``): an undo. The key's earlier decision, if any, is in force
    again. Returns the rows removed (0: none matched, e.g. already withdrawn)."""
    df = load_decisions(run)
    if sample_id:
        key = pl.col("sample_id") == sample_id
    elif dataset and rule:
        key = pl.col("sample_id").is_null() & (pl.col("dataset") == dataset)
        key = key & (pl.col("rule") == rule)
    else:
        raise ValueError("an undo names a sample_id, or a dataset and a rule")
    hit = key & (pl.col("decided_at") == decided_at)
    removed = int(df.select(hit.sum()).item() or 0)
    if removed:
        table = df.filter(~hit.fill_null(False)).to_arrow().cast(DECISION_SCHEMA)
        write_parquet_atomic(table, decisions_path(run))
    return removed


def _latest(df: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    return df.sort("decided_at").group_by(keys, maintain_order=True).last()


def _missing(run: RunFolder, stage: str, table: str, candidates: pl.DataFrame) -> pl.DataFrame:
    """Ledger-shaped rows for candidates that ``stage`` left without a row or a ledger row."""
    seen = pl.concat(
        [
            pl.from_arrow(run.read(table, columns=["sample_id"], schema=_ID_SCHEMA)),
            pl.from_arrow(run.ledger(stage).select(["sample_id"])),
        ]
    )
    missing = candidates.join(seen, on="sample_id", how="anti")
    return missing.select(
        "sample_id",
        "dataset",
        stage=pl.lit(stage),
        rule=pl.lit(f"{stage}_missing"),
        severity=pl.lit("reject"),
    )


_ID_SCHEMA = pa.schema([("sample_id", pa.string())])
_LEDGER_COLS = ["sample_id", "dataset", "stage", "rule", "severity"]


def sample_status(
    run: RunFolder,
    stages: tuple[str, ...] | list[str] | None = None,
    requires: dict[str, str] | None = None,
    flagged: str = "exclude",
) -> pl.DataFrame:
    """Every ingested sample with its status: ``keep`` | ``reject`` | ``flag`` (awaiting review).

    ``stages``: whose ledgers count (default: every stage but ingest, whose rejects never
    became samples). ``requires``: stage -> its table; a sample that passed the stages before
    it but has neither a row nor a ledger row there is rejected as ``<stage>_missing``.
    ``flagged="include"`` counts flagged samples nobody reviewed as ``keep``.
    Columns: sample_id, dataset, status, reasons (the rules still standing against it).
    """
    samples = pl.from_arrow(run.read("samples", columns=["sample_id", "dataset"], schema=_S))
    if stages is None:
        ledger = pl.from_arrow(run.ledger().select(_LEDGER_COLS))
        ledger = ledger.filter(pl.col("stage") != "ingest")
    else:
        ledger = pl.from_arrow(run.ledger(stages=list(stages)).select(_LEDGER_COLS))
    for stage, table in (requires or {}).items():
        before = stages[: list(stages).index(stage)] if stages and stage in stages else []
        rejected = ledger.filter(
            pl.col("stage").is_in(list(before)) & (pl.col("severity") == "reject")
        )
        candidates = samples.join(rejected.select("sample_id"), on="sample_id", how="anti")
        ledger = pl.concat([ledger, _missing(run, stage, table, candidates)])
    return _status(samples, ledger, load_decisions(run), flagged)


def status_of(
    samples: pl.DataFrame, ledger: pl.DataFrame, decisions: pl.DataFrame, flagged: str = "exclude"
) -> pl.DataFrame:
    """``sample_status`` on frames already read: ``samples`` (sample_id, dataset), ``ledger``
    (sample_id, dataset, rule, severity) and ``decisions``; for a caller that keeps the ledger
    in memory and re-reads only the decisions (the review app, after each keystroke)."""
    cols = ["sample_id", "dataset", "rule", "severity"]
    return _status(samples.select("sample_id", "dataset"), ledger.select(cols), decisions, flagged)


_S = pa.schema([("sample_id", pa.string()), ("dataset", pa.string())])


def _status(
    samples: pl.DataFrame, ledger: pl.DataFrame, decisions: pl.DataFrame, flagged: str
) -> pl.DataFrame:
    by_rule = _latest(decisions.filter(pl.col("sample_id").is_null()), ["dataset", "rule"])
    by_sample = _latest(decisions.filter(pl.col("sample_id").is_not_null()), ["sample_id"])
    ledger = ledger.join(
        by_rule.select("dataset", "rule", rule_decision="decision"),
        on=["dataset", "rule"],
        how="left",
    )
    ledger = ledger.filter(pl.col("rule_decision").fill_null("") != "keep").with_columns(
        severity=pl.when(pl.col("rule_decision") == "reject")
        .then(pl.lit("reject"))
        .otherwise(pl.col("severity"))
    )
    per_sample = ledger.group_by("sample_id").agg(
        rejected=(pl.col("severity") == "reject").any(),
        flagged=(pl.col("severity") == "flag").any(),
        reasons=pl.col("rule").unique().sort(),
    )
    df = samples.join(per_sample, on="sample_id", how="left").join(
        by_sample.select("sample_id", sample_decision="decision"), on="sample_id", how="left"
    )
    flag_status = "keep" if flagged == "include" else "flag"
    status = (
        pl.when(pl.col("sample_decision").is_not_null())
        .then(pl.col("sample_decision"))
        .when(pl.col("rejected").fill_null(False))
        .then(pl.lit("reject"))
        .when(pl.col("flagged").fill_null(False))
        .then(pl.lit(flag_status))
        .otherwise(pl.lit("keep"))
    )
    return df.with_columns(status=status, reasons=pl.col("reasons").fill_null([])).select(
        "sample_id", "dataset", "status", "reasons"
    )


def current_decisions(run: RunFolder) -> pl.DataFrame:
    """The decisions in force: the latest per sample and per (dataset, rule), newest first.

    Columns: DECISION_SCHEMA's plus ``scope`` (sample | rule) and ``superseded`` (how many
    earlier decisions for the same key it replaced).
    """
    decisions = load_decisions(run)
    parts = []
    for scope, keys, rows in (
        ("sample", ["sample_id"], decisions.filter(pl.col("sample_id").is_not_null())),
        ("rule", ["dataset", "rule"], decisions.filter(pl.col("sample_id").is_null())),
    ):
        counts = rows.group_by(keys).agg(superseded=pl.len() - 1)
        latest = _latest(rows, keys).join(counts, on=keys, how="left")
        parts.append(latest.with_columns(scope=pl.lit(scope)))
    cols = [*DECISION_SCHEMA.names, "scope", "superseded"]
    return pl.concat([p.select(cols) for p in parts]).sort("decided_at", descending=True)


def pending_review(run: RunFolder) -> pl.DataFrame:
    """Flagged samples awaiting a decision, with the flag rules standing against each.

    Columns: sample_id, dataset, line, rules (list of ``rule (value vs threshold)`` strings
    from the ledger) and reasons (the rule names ``sample_status`` reports).
    """
    status = sample_status(run).filter(pl.col("status") == "flag")
    ledger = pl.from_arrow(
        run.ledger().select(
            ["sample_id", "dataset", "line", "stage", "rule", "severity", "value", "threshold"]
        )
    )
    standing = status.select("sample_id", rule="reasons").explode("rule")
    ledger = ledger.filter(pl.col("stage") != "ingest").join(
        standing, on=["sample_id", "rule"], how="semi"
    )
    text = pl.format(
        "{} ({} vs {})",
        "rule",
        pl.col("value").round(4).cast(pl.Utf8).fill_null("-"),
        pl.col("threshold").round(4).cast(pl.Utf8).fill_null("-"),
    )
    per_sample = ledger.group_by("sample_id").agg(
        line=pl.col("line").max(), rules=text.unique().sort()
    )
    return (
        status.join(per_sample, on="sample_id", how="left")
        .select("sample_id", "dataset", "line", "rules", "reasons")
        .sort("dataset", "line")
    )


def status_totals(run: RunFolder, flagged: str = "exclude") -> dict[str, int]:
    """How many samples are keep / reject / flag right now (``sample_status`` counted)."""
    counts = dict(sample_status(run, flagged=flagged).group_by("status").len().iter_rows())
    return {s: int(counts.get(s, 0)) for s in ("keep", "reject", "flag")}
