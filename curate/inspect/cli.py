"""``curate report`` and the pipeline's report step."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from curate.inspect.report import ReportResult
    from curate.inspect.tables import RunTables
    from curate.pipeline import PipelineContext
    from curate.run import StageSummary


def report_table(tables: RunTables, result: ReportResult) -> Table:
    from rich.table import Table

    from curate.inspect.tables import status_counts

    status = status_counts(tables)
    t = Table(title="report")
    t.add_column("measure")
    t.add_column("value", justify="right")
    rows = [
        ("samples", f"{len(tables.samples):,}"),
        (
            "keep / reject / flag",
            " / ".join(f"{int(status[c].sum()):,}" for c in ("keep", "reject", "flag")),
        ),
        ("ledger rows", f"{len(tables.ledger):,}"),
        ("review decisions", f"{len(tables.decisions):,}"),
        ("plots", str(result.plots)),
        ("gallery rules", str(result.rules)),
        ("samples shown / not shown", f"{result.shown:,} / {result.not_shown:,}"),
        ("size", f"{result.bytes / 1024:,.0f} KiB"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def _build(run: Path, out: Path | None, per_rule: int, thumbnail_px: int):
    from curate.console import console
    from curate.inspect.report import write_report
    from curate.inspect.tables import load_run_tables

    with console.status("reading the run folder"):
        tables = load_run_tables(run)
    with console.status("drawing plots and thumbnails"):
        result = write_report(tables, out, per_rule=per_rule, thumb_px=thumbnail_px)
    return tables, result


def report_command(
    run: Annotated[Path, typer.Argument(help="run folder")],
    out: Annotated[
        Path | None, typer.Option(help="HTML file to write (default RUN/report.html)")
    ] = None,
    per_rule: Annotated[int, typer.Option(help="samples shown per rule in the gallery")] = 24,
    thumbnail_px: Annotated[
        int, typer.Option(help="longest side of embedded thumbnails, pixels")
    ] = 160,
) -> None:
    """Write one self-contained HTML report: counts, plots, rejected samples per rule."""
    from curate.cli import _fail
    from curate.console import console

    if per_rule < 0 or not 16 <= thumbnail_px <= 1024:
        _fail("--per-rule must be >= 0 and --thumbnail-px within 16..1024")
    try:
        tables, result = _build(run, out, per_rule, thumbnail_px)
    except (FileNotFoundError, OSError) as e:
        _fail(str(e))
    console.print(report_table(tables, result))
    console.print(f"report: {result.path.resolve()}")


def run_report_stage(ctx: PipelineContext) -> StageSummary:
    """The pipeline's last step: write the report and print its path.

    Its summary is the status of every sample after all stages and review decisions.
    """
    from curate.console import console
    from curate.inspect.config import ReportConfig
    from curate.inspect.tables import status_counts
    from curate.run import StageSummary

    cfg = ctx.config.stages.report or ReportConfig()
    tables, result = _build(ctx.run.path, cfg.out, cfg.per_rule, cfg.thumbnail_px)
    status = status_counts(tables)
    by_dataset = {
        r["dataset"]: [r["samples"], r["keep"], r["reject"] + r["flag"], r["flag"]]
        for r in status.iter_rows(named=True)
    }
    summary = StageSummary(
        "report",
        rows_in=int(status["samples"].sum()),
        rows_kept=int(status["keep"].sum()),
        rows_rejected=int(status["reject"].sum() + status["flag"].sum()),
        rows_flagged=int(status["flag"].sum()),
        by_dataset=by_dataset,
    )
    console.print(f"[bold]report:[/bold] {result.path.resolve()}")
    return summary
