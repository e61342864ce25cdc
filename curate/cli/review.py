"""``curate review``: record keep / reject decisions that override the ledger before packing.

curate review --run RUN --pending                           # flagged samples to look at
curate review --run RUN --sample ID --keep --note "fine"    # one sample
curate review --run RUN --dataset doc_ocr --rule duplicate_lines --keep   # a rule, a dataset
curate review --run RUN --list                              # decisions in force
curate review --run RUN --serve [--host 127.0.0.1] [--port 8765]   # review in the browser

Decisions go through ``curate.review.decisions``, the same code as the web app's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    import polars as pl
    from rich.table import Table

    from curate.core.folder import RunFolder


def effect_table(before: dict[str, int], after: dict[str, int] | None = None) -> Table:
    """Status counts before and after a decision (or, with ``after`` None, as they are)."""
    from rich.table import Table

    t = Table(title="sample status")
    cols = ("status", "before", "after", "change") if after else ("status", "samples")
    for col in cols:
        t.add_column(col, justify="left" if col == "status" else "right")
    for s in ("keep", "reject", "flag"):
        if after is None:
            t.add_row(s, f"{before[s]:,}")
            continue
        d = after[s] - before[s]
        t.add_row(s, f"{before[s]:,}", f"{after[s]:,}", f"{d:+,}" if d else "0")
    return t


def decisions_table(df: pl.DataFrame) -> Table:
    import datetime as dt

    from rich.table import Table

    t = Table(title=f"review decisions in force ({len(df)})")
    for col in ("scope", "sample / rule", "dataset", "decision", "note", "decided", "replaced"):
        t.add_column(col, justify="right" if col == "replaced" else "left")
    for r in df.iter_rows(named=True):
        when = dt.datetime.fromtimestamp(r["decided_at"]).strftime("%Y-%m-%d %H:%M:%S")
        colour = "green" if r["decision"] == "keep" else "red"
        t.add_row(
            r["scope"],
            r["sample_id"] or r["rule"],
            r["dataset"] or "",
            f"[{colour}]{r['decision']}[/{colour}]",
            r["note"] or "",
            when,
            str(r["superseded"]),
        )
    return t


def pending_table(df: pl.DataFrame, limit: int) -> Table:
    from rich.table import Table

    more = f", first {limit} shown" if len(df) > limit else ""
    t = Table(title=f"flagged samples awaiting review ({len(df)}{more})")
    for col in ("sample_id", "dataset", "line", "rules (value vs threshold)"):
        t.add_column(col, justify="right" if col == "line" else "left")
    for r in df.head(limit).iter_rows(named=True):
        rules = r["rules"] or r["reasons"] or []
        t.add_row(r["sample_id"], r["dataset"], str(r["line"] or ""), "; ".join(rules))
    return t


def review_command(
    run: Annotated[Path, typer.Option("--run", help="run folder (filtered and/or scored)")],
    sample: Annotated[
        list[str] | None, typer.Option("--sample", help="sample id to decide on (repeatable)")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="dataset of a per-rule decision (with --rule)")
    ] = None,
    rule: Annotated[
        str | None,
        typer.Option(
            help="rule to waive (--keep) or enforce (--reject) for --dataset, or "
            "for every dataset it failed in"
        ),
    ] = None,
    keep: Annotated[
        bool | None,
        typer.Option("--keep/--reject", help="the decision: keep (restore, accept) or reject"),
    ] = None,
    note: Annotated[str, typer.Option(help="why (stored with the decision)")] = "",
    list_: Annotated[bool, typer.Option("--list", help="show the decisions in force")] = False,
    pending: Annotated[
        bool, typer.Option("--pending", help="show flagged samples awaiting review")
    ] = False,
    limit: Annotated[int, typer.Option(help="rows shown by --pending")] = 50,
    serve: Annotated[
        bool, typer.Option("--serve", help="review in the browser: start a local web app")
    ] = False,
    host: Annotated[
        str,
        typer.Option(
            help="--serve: address to bind; any but a loopback one adds a secret token to the URL"
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="--serve: port (0: any free one)")] = 8765,
) -> None:
    """Review flagged and rejected samples: keep or reject one sample, or a rule of a dataset.

    A per-sample decision wins over per-rule ones; the latest decision for a key wins.
    `curate pack` packs a sample when its status is keep.
    """
    from curate.cli.console import console
    from curate.cli.console import fail as _fail
    from curate.core.errors import CurateError
    from curate.core.folder import RunFolder
    from curate.core.status import current_decisions, pending_review, status_totals
    from curate.review.decisions import record, rule_targets, sample_targets

    folder = RunFolder(run)
    if not folder.shards("samples"):
        _fail(f"{run} has no samples/: run `curate ingest` (or a pipeline) first")
    deciding = keep is not None
    if serve and (deciding or list_ or pending or sample or rule is not None):
        _fail("--serve starts the web app: decide there, or drop --serve")
    if serve:
        _serve(folder, host, port)
        return
    if dataset is not None and rule is None:
        _fail("--dataset needs --rule (a per-rule decision)")
    if deciding and not sample and rule is None:
        _fail("--keep/--reject needs --sample ID, or --rule R (with --dataset D)")
    if (sample or rule is not None or dataset is not None) and not deciding:
        _fail("say --keep or --reject")
    if sample and (rule is not None or dataset is not None):
        _fail("a decision is per sample (--sample) or per rule (--dataset/--rule), not both")
    if deciding:
        decision = "keep" if keep else "reject"
        try:
            targets = (
                sample_targets(folder, sample) if sample else rule_targets(folder, dataset, rule)
            )
            done = record(folder, targets, decision, note, totals=True)
        except CurateError as e:
            _fail(str(e))
        for t in targets:
            what = t.get("sample_id") or f"rule {t['rule']} of dataset {t['dataset']}"
            console.print(f"recorded: {decision} {what}")
        console.print(effect_table(done.before, done.after))
    if list_:
        console.print(decisions_table(current_decisions(folder)))
    if pending:
        console.print(pending_table(pending_review(folder), limit))
    if not (deciding or list_ or pending):
        console.print(effect_table(status_totals(folder)))
        console.print(
            "nothing decided: see --pending, --list, --sample ID --keep|--reject, --serve"
        )


def _serve(folder: RunFolder, host: str, port: int) -> None:
    """Start the review web app and block until Ctrl-C; a second server on the run, a busy
    port or missing web libraries are one line, no traceback."""
    import contextlib

    from curate.cli.console import console, user_errors
    from curate.core.status import decisions_path
    from curate.review.serve import open_server

    with user_errors(), open_server(folder, host, port) as server:
        console.print(f"curate review: [bold]{server.url}[/bold]", soft_wrap=True)
        console.print(
            f"{server.data.summary()}; keys: k keep, x reject, s skip, ←/→ previous/next, "
            "u undo, K/X the rest of the rule in the dataset, ? help. Ctrl-C stops."
        )
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it took
            server.run()
    console.print(f"curate review: server stopped; decisions are in {decisions_path(folder)}")
