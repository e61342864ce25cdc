"""Rich output shared by the commands: a shard progress bar and stage summary tables."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from curate.run import StageSummary

# Wide enough for the budget table when output is a pipe or a CI log (rich assumes 80 there).
console = Console(width=None if Console().is_terminal else 160)


@contextmanager
def shard_progress(stage: str, total: int) -> Iterator[Callable[[str, dict], None]]:
    """A progress bar over shards; yields the ``on_shard`` callback for ``run_shards``."""
    columns = (
        TextColumn(f"[bold]{stage}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rows]} rows"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(stage, total=total, rows=0)
        seen = {"rows": 0}

        def on_shard(shard: str, marker: dict) -> None:
            seen["rows"] += marker["rows_in"]
            progress.update(task, advance=1, rows=seen["rows"])

        yield on_shard


def summary_table(summary: StageSummary) -> Table:
    """Rows in / kept / rejected / flagged per dataset, and the totals."""
    t = Table(
        title=f"{summary.stage}: {summary.rows_in} in, {summary.rows_kept} kept, "
        f"{summary.rows_rejected} rejected ({summary.shards_skipped} of "
        f"{summary.shards} shards already done)"
    )
    for col in ("dataset", "in", "kept", "rejected"):
        t.add_column(col, justify="left" if col == "dataset" else "right")
    for ds, counts in sorted(summary.by_dataset.items()):
        t.add_row(ds, *(str(c) for c in counts[:3]))
    return t


def rules_table(summary: StageSummary) -> Table:
    t = Table(title=f"{summary.stage}: reasons")
    t.add_column("severity")
    t.add_column("rule")
    t.add_column("samples", justify="right")
    for key, n in sorted(summary.by_rule.items(), key=lambda kv: -kv[1]):
        sev, rule = key.split(":", 1)
        t.add_row(sev, rule, str(n))
    return t


def budget_rich_table(rows: list[dict]) -> Table:
    cols = [
        "dataset",
        "samples",
        "rejected",
        "images",
        "tiles",
        "visual_tokens",
        "text_tokens",
        "repeat_time",
        "copies",
        "effective_tokens",
    ]
    t = Table(title="budget per dataset")
    for c in cols:
        t.add_column(c.replace("_", " "), justify="left" if c == "dataset" else "right")
    totals = {c: sum(r[c] for r in rows) for c in cols if c not in ("dataset", "repeat_time")}
    for r in rows:
        t.add_row(*(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols))
    t.add_row("[bold]total", *(f"[bold]{totals[c]:,}" if c in totals else "" for c in cols[1:]))
    return t
