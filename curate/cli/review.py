"""``curate review``: record keep / reject decisions that override the ledger before packing.

curate review --run RUN --pending                           # flagged samples to look at
curate review --run RUN --sample ID --keep --note "fine"    # one sample
curate review --run RUN --dataset doc_ocr --rule duplicate_lines --keep   # a rule, a dataset
curate review --run RUN --list                              # decisions in force
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


def _sample_rows(run: RunFolder, ids: list[str]) -> list[dict]:
    """Per-sample decisions with their dataset; unknown ids and ingest rejects are errors."""
    import polars as pl

    samples = pl.from_arrow(run.read("samples").select(["sample_id", "dataset"]))
    known = dict(samples.filter(pl.col("sample_id").is_in(ids)).iter_rows())
    missing = [i for i in ids if i not in known]
    if missing:
        ledger = pl.from_arrow(run.ledger("ingest").select(["sample_id", "rule", "detail"]))
        why = []
        for i in missing:
            hit = ledger.filter(pl.col("sample_id") == i)
            why.append(
                f"{i}: rejected at ingest ({hit['rule'][0]}): it never became a sample; "
                "fix the annotation line instead"
                if len(hit)
                else f"{i}: no such sample in {run.path}"
            )
        raise ValueError("\n".join(why))
    return [{"sample_id": i, "dataset": known[i]} for i in ids]


def _rule_rows(run: RunFolder, dataset: str | None, rule: str) -> list[dict]:
    """Per-rule decisions: for ``dataset``, or every dataset the rule failed in."""
    import polars as pl

    everything = pl.from_arrow(run.ledger().select(["dataset", "stage", "rule"]))
    ledger = everything.filter(pl.col("stage") != "ingest")
    if (
        ledger.filter(pl.col("rule") == rule).is_empty()
        and not everything.filter(pl.col("rule") == rule).is_empty()
    ):
        raise ValueError(
            f"rule {rule!r} is an ingest rule: those lines never became samples, so no "
            "decision can restore them; fix the annotation lines instead"
        )
    datasets = ledger.filter(pl.col("rule") == rule)["dataset"].unique().sort().to_list()
    if dataset is not None:
        if dataset not in datasets:
            rules = ledger.filter(pl.col("dataset") == dataset)["rule"].unique().sort()
            raise ValueError(
                f"rule {rule!r} has no ledger rows for dataset {dataset!r}; its rules: "
                + (", ".join(rules.to_list()) or "(none)")
            )
        datasets = [dataset]
    elif not datasets:
        raise ValueError(f"rule {rule!r} has no ledger rows in {run.path}")
    return [{"dataset": d, "rule": rule} for d in datasets]


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
) -> None:
    """Review flagged and rejected samples: keep or reject one sample, or a rule of a dataset.

    A per-sample decision wins over per-rule ones; the latest decision for a key wins.
    `curate pack` packs a sample when its status is keep.
    """
    from curate.cli.console import console
    from curate.cli.console import fail as _fail
    from curate.core.folder import RunFolder, RunLockedError
    from curate.core.status import add_decisions, current_decisions, pending_review, status_totals

    folder = RunFolder(run)
    if not folder.shards("samples"):
        _fail(f"{run} has no samples/: run `curate ingest` (or a pipeline) first")
    deciding = keep is not None
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
            targets = _sample_rows(folder, sample) if sample else _rule_rows(folder, dataset, rule)
            with folder.lock():
                before = status_totals(folder)
                add_decisions(folder, [{**t, "decision": decision, "note": note} for t in targets])
                after = status_totals(folder)
        except (ValueError, RunLockedError) as e:
            _fail(str(e))
        for t in targets:
            what = t.get("sample_id") or f"rule {t['rule']} of dataset {t['dataset']}"
            console.print(f"recorded: {decision} {what}")
        console.print(effect_table(before, after))
    if list_:
        console.print(decisions_table(current_decisions(folder)))
    if pending:
        console.print(pending_table(pending_review(folder), limit))
    if not (deciding or list_ or pending):
        console.print(effect_table(status_totals(folder)))
        console.print("nothing decided: see --pending, --list, --sample ID --keep|--reject")
