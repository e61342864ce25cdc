"""``curate filter``: rule filters and repetition detectors over an ingested run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from curate.pipeline import PipelineContext
    from curate.run import RunFolder, StageSummary


def rule_rows(run: RunFolder, summary: StageSummary) -> list[dict]:
    """Per dataset and rule: samples flagged, samples rejected, and their share of the dataset."""
    # pyarrow, not polars: polars' thread pool in this process would deadlock the forked
    # workers of a later stage that uses polars.
    counts = (
        run.ledger("filter")
        .group_by(["dataset", "rule", "severity"])
        .aggregate([("sample_id", "count_distinct")])
        .to_pylist()
    )
    by_key: dict[tuple[str, str], dict[str, int]] = {}
    for r in counts:
        key = (r["dataset"], r["rule"])
        by_key.setdefault(key, {})[r["severity"]] = r["sample_id_count_distinct"]
    rows = []
    for (dataset, rule), n in sorted(by_key.items()):
        flagged, rejected = n.get("flag", 0), n.get("reject", 0)
        total = summary.by_dataset.get(dataset, [0])[0]
        rows.append(
            {
                "dataset": dataset,
                "rule": rule,
                "flagged": flagged,
                "rejected": rejected,
                "share": (flagged + rejected) / total if total else 0.0,
            }
        )
    return rows


def rule_table(rows: list[dict]) -> Table:
    from rich.table import Table

    t = Table(title="filter: samples per dataset and rule")
    for col in ("dataset", "rule", "flagged", "rejected", "share"):
        t.add_column(col, justify="left" if col in ("dataset", "rule") else "right")
    for r in rows:
        t.add_row(
            r["dataset"], r["rule"], str(r["flagged"]), str(r["rejected"]), f"{r['share']:.1%}"
        )
    return t


def run_filter_stage(ctx: PipelineContext) -> StageSummary:
    """The pipeline's filter stage: progress bar, then the per-dataset/rule table."""
    from curate.console import console, shard_progress
    from curate.filters.stage import run_filter

    with shard_progress("filter", len(ctx.run.shards("samples"))) as on_shard:
        summary = run_filter(
            ctx.run, ctx.config.stages.filter, on_shard=on_shard, executor=ctx.executor
        )
    console.print(rule_table(rule_rows(ctx.run, summary)))
    return summary


def filter_command(
    run: Annotated[Path, typer.Option("--run", help="run folder with ingested samples/")],
    config: Annotated[
        Path | None,
        typer.Option("--config", help="pipeline YAML whose stages.filter section sets the rules"),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="processes over shards (default: the config's, else all cores)"),
    ] = None,
) -> None:
    """Run the rule filters and repetition detectors; every failed rule goes to the ledger."""
    from curate.config import PipelineError, load_pipeline
    from curate.console import console, shard_progress, summary_table
    from curate.filters.config import FilterConfig
    from curate.filters.stage import run_filter
    from curate.run import RunFolder, RunLockedError

    try:
        cfg = FilterConfig()
        if config is not None:
            cfg = load_pipeline(config).stages.filter or cfg
        if workers is not None:
            cfg = cfg.model_copy(update={"workers": workers})
        folder = RunFolder(run)
        if not folder.shards("samples"):
            raise ValueError(f"{run} has no samples/ shards: run `curate ingest` first")
        with folder.lock(), shard_progress("filter", len(folder.shards("samples"))) as on_shard:
            summary = run_filter(folder, cfg, on_shard=on_shard)
    except (PipelineError, RunLockedError, ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    console.print(summary_table(summary))
    console.print(f"flagged for review: {summary.rows_flagged}")
    console.print(rule_table(rule_rows(folder, summary)))
