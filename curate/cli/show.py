"""What the commands print after the engine ran: one line per stage, then each stage's table."""

from __future__ import annotations

from collections.abc import Callable

from rich.table import Table

from curate.cli.console import console, rules_table, summary_line, summary_table
from curate.core.engine import StageSummary
from curate.core.folder import RunFolder

SAMPLE_TABLE_STAGES = ("ingest", "filter", "score")


def _budget(run: RunFolder, summary: StageSummary) -> None:
    from curate.cli.console import budget_rich_table
    from curate.core.io import read_json

    path = run.path / "repeat" / "budget_table.json"
    if path.exists():
        console.print(budget_rich_table(read_json(path)))


def _filter(run: RunFolder, summary: StageSummary) -> None:
    from curate.cli.filters import image_line, rule_rows, rule_table
    from curate.stages.filters.images import read_cache_stats

    console.print(rule_table(rule_rows(run, summary)))
    stats = read_cache_stats(run.path)
    if stats["images"]:
        console.print(image_line(stats))


def _score(run: RunFolder, summary: StageSummary, stage=None) -> None:
    from curate.cli.score import distribution_table
    from curate.stages.score.stage import score_distribution

    console.print(distribution_table(score_distribution(run)))
    stats = getattr(stage, "engine_stats", None)
    if stats is not None and stats.requests:
        hit = "n/a" if stats.cache_hit_rate is None else f"{stats.cache_hit_rate:.1%}"
        rate = stage.samples_scored / stats.seconds if stats.seconds else 0.0
        console.print(
            f"score: {stage.samples_scored} samples, {stats.requests} requests, "
            f"{stats.seconds:.1f} s in the engine ({rate:.1f} samples/s), "
            f"prefix-cache hit rate {hit}"
        )


def _pack(run: RunFolder, summary: StageSummary) -> None:
    from curate.cli.pack import pack_report_table

    if summary.report:
        console.print(pack_report_table(summary.report))


def _train(run: RunFolder, summary: StageSummary) -> None:
    from curate.cli.train import print_result

    print_result(summary.report)


def report_table(report: dict) -> Table:
    """What the report shows: sample status after review, and the gallery's extent."""
    t = Table(title="report")
    t.add_column("measure")
    t.add_column("value", justify="right")
    status = " / ".join(f"{report.get(s, 0):,}" for s in ("keep", "reject", "flag"))
    shown = f"{report.get('shown', 0):,} / {report.get('not_shown', 0):,}"
    rows = [
        ("samples", f"{report.get('samples', 0):,}"),
        ("keep / reject / flag", status),
        ("ledger rows", f"{report.get('ledger_rows', 0):,}"),
        ("review decisions", f"{report.get('decisions', 0):,}"),
        ("plots", str(report.get("plots", 0))),
        ("gallery rules", str(report.get("rules", 0))),
        ("samples shown / not shown", shown),
        ("size", f"{report.get('bytes', 0) / 1024:,.0f} KiB"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def _report(run: RunFolder, summary: StageSummary) -> None:
    if summary.report:
        console.print(report_table(summary.report))
    console.print(f"[bold]report:[/bold] {summary.report.get('path')}")


AFTER: dict[str, Callable[[RunFolder, StageSummary], None]] = {
    "repeat": _budget,
    "filter": _filter,
    "pack": _pack,
    "train": _train,
    "report": _report,
}


def show_summaries(pipeline, summaries: dict[str, StageSummary]) -> None:
    for name, summary in summaries.items():
        console.print(summary_line(summary))
        if name in SAMPLE_TABLE_STAGES and summary.redone:
            console.print(summary_table(summary))
            if summary.by_rule:
                console.print(rules_table(summary))
        if name == "score":
            _score(pipeline.run, summary, pipeline.engine.stages[name])
        elif name in AFTER:
            AFTER[name](pipeline.run, summary)


def plan_table(planned, title: str, run: RunFolder | None = None) -> Table:
    """Per stage: done / to redo (how many units, why) / waits for an earlier stage / missing;
    with ``run``, also the stage's counts from its stats."""
    t = Table(title=title)
    for col in ("stage", "state", "units", "why", *(("in", "kept", "rejected") if run else ())):
        t.add_column(col, justify="right" if col in ("units", "in", "kept", "rejected") else "left")
    for item in planned:
        plan = item.plan
        state, why = _state(item)
        units = f"{len(plan.todo)}/{len(plan.units)}" if plan.units else "-"
        counts = ()
        if run is not None:
            stats = run.stats(plan.stage) or {}
            counts = tuple(
                "-" if stats.get(k) is None else f"{stats[k]:,}"
                for k in ("rows_in", "rows_kept", "rows_rejected")
            )
        t.add_row(plan.stage, state, units, why, *counts)
    return t


def _state(item) -> tuple[str, str]:
    plan = item.plan
    if plan.blocked:
        return "[red]missing[/red]", plan.blocked
    if item.waits_for and (plan.todo or plan.units):
        new = [u for u in plan.todo if u.state == "new"]
        if new and len(new) == len(plan.units):
            return "[yellow]missing[/yellow]", f"after {item.waits_for}"
        return "[yellow]after " + item.waits_for + "[/yellow]", (
            f"redoes what {item.waits_for}'s changes reach"
        )
    if not plan.todo and not plan.remove:
        return "[green]done[/green]", ""
    reasons = sorted({u.why for u in plan.todo})
    if plan.remove:
        reasons.append(f"{len(plan.remove)} shards gone upstream")
    state = "missing" if all(u.state == "new" for u in plan.todo) and plan.todo else "stale"
    colour = "yellow"
    return f"[{colour}]{state}[/{colour}]", "; ".join(reasons[:3])
