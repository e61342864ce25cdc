"""Rich output shared by the commands: a shard progress bar and stage summary tables."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from curate.core.engine import Event, StageSummary
from curate.core.errors import CurateError

# Wide enough for the budget table when output is a pipe or a CI log (rich assumes 80 there).
console = Console(width=None if Console().is_terminal else 160)


def fail(message: str) -> None:
    """One red line and exit status 2.

    The message is printed as it is: never wrapped (a long path stays on the error line, so
    ``grep error:`` finds all of it) and never read as markup (``[...]`` in a message stays).
    """
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def user_errors() -> Iterator[None]:
    """Foreseeable errors become one red line and exit status 2, never a traceback."""
    try:
        yield
    except (CurateError, FileNotFoundError) as e:
        fail(str(e))


class EngineProgress:
    """A progress bar per shard stage with work to do, from the engine's events."""

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rows]} rows"),
        TimeElapsedColumn(),
    )

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task = 0
        self.rows = 0

    def __call__(self, event: Event) -> None:
        if not event.shards:
            # No live bar (its refresh thread) while a global stage runs: training forks
            # DataLoader workers, and a fork while another thread holds a lock can hang.
            if event.kind == "start" and event.total:
                console.print(f"[bold]{event.stage}[/bold] running")
            return
        if event.kind == "start" and event.total:
            self.progress = Progress(*self.columns, console=console)
            self.progress.start()
            self.task = self.progress.add_task(
                event.stage, total=event.total + event.done, completed=event.done, rows=0
            )
            self.rows = 0
        elif event.kind == "unit" and self.progress is not None:
            self.rows += event.rows
            self.progress.update(self.task, advance=1, rows=self.rows)
        elif event.kind == "end":
            self.stop()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __enter__(self) -> EngineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def summary_line(summary: StageSummary) -> str:
    """What the engine did to a stage, in one line."""
    units = "shards" if summary.kind == "shard" else "runs"
    did = (
        f"redone {len(summary.redone)} of {summary.shards} {units}"
        if summary.redone
        else f"up to date ({summary.shards} {units})"
    )
    removed = f", removed {len(summary.removed)} gone upstream" if summary.removed else ""
    counts = (
        ""
        if summary.rows_in is None
        else f": {summary.rows_in:,} in, {summary.rows_kept:,} kept, "
        f"{summary.rows_rejected:,} rejected, {summary.rows_flagged:,} flagged"
    )
    return f"[bold]{summary.stage}[/bold] {did}{removed}{counts}"


def summary_table(summary: StageSummary) -> Table:
    """Rows in / kept / rejected / flagged per dataset, and the totals."""
    t = Table(
        title=f"{summary.stage}: {summary.rows_in} in, {summary.rows_kept} kept, "
        f"{summary.rows_rejected} rejected, {summary.rows_flagged} flagged "
        f"({summary.shards_skipped} of {summary.shards} shards already done)"
    )
    for col in ("dataset", "in", "kept", "rejected", "flagged"):
        t.add_column(col, justify="left" if col == "dataset" else "right")
    for ds, counts in sorted(summary.by_dataset.items()):
        t.add_row(ds, *(str(c) for c in counts[:4]))
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
    """The budget table per dataset; ``share before`` / ``share after``: each dataset's part of
    the effective tokens at the meta JSON's repeat_time and at the repeat factors used (they
    differ when the mixture solver ran)."""
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
        "share_before",
        "share_after",
    ]
    shares = ("share_before", "share_after")
    cols = [c for c in cols if c not in shares or all(c in r for r in rows)]  # older tables

    def cell(r: dict, c: str) -> str:
        if c in shares:
            return f"{r[c]:.1%}"
        return f"{r[c]:,}" if isinstance(r[c], int) else str(r[c])

    t = Table(title="budget per dataset")
    for c in cols:
        t.add_column(c.replace("_", " "), justify="left" if c == "dataset" else "right")
    totals = {c: sum(r[c] for r in rows) for c in cols if c not in ("dataset", "repeat_time")}
    for r in rows:
        t.add_row(*(cell(r, c) for c in cols))
    total_cells = [
        f"[bold]{totals[c]:.0%}" if c in shares else f"[bold]{totals[c]:,}" if c in totals else ""
        for c in cols[1:]
    ]
    t.add_row("[bold]total", *total_cells)
    return t
