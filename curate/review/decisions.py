"""Review decisions: check what they name, then record or withdraw them under the run lock.

The one place both faces of review go through: ``curate review --sample ID --keep`` (the CLI)
and ``curate review --serve`` (the web app). A decision names a sample that ingest accepted,
or a rule of a dataset that has ledger rows there; it is written at once, atomically, to
``RUN/review/decisions.parquet`` (``curate.core.status``) while holding the run's lock, so a
decision never interleaves with a stage reading the decisions or another reviewer's write.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import polars as pl

from curate.core.errors import CurateError
from curate.core.folder import RunFolder, RunLockedError
from curate.core.status import add_decisions, status_totals, withdraw_decision

DECISIONS = ("keep", "reject")
# How often a writer that found the run locked tries again while it may wait.
LOCK_POLL_S = 0.05


class ReviewError(CurateError):
    """A decision that cannot be recorded as asked (unknown sample, rule without rows...)."""


def sample_targets(
    run: RunFolder, ids: list[str], samples: pl.DataFrame | None = None
) -> list[dict]:
    """Per-sample decision targets with their dataset; unknown ids and ingest rejects are
    errors (an ingest reject never became a sample: no decision can restore it).

    ``samples`` (sample_id, dataset): the samples a caller already holds (the web app: those
    in its queue), instead of reading every sample of the run."""
    if samples is None:
        samples = pl.from_arrow(run.read("samples", columns=["sample_id", "dataset"]))
    samples = samples.select("sample_id", "dataset")
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
        raise ReviewError("\n".join(why))
    return [{"sample_id": i, "dataset": known[i]} for i in ids]


def rule_targets(
    run: RunFolder, dataset: str | None, rule: str, ledger: pl.DataFrame | None = None
) -> list[dict]:
    """Per-rule decision targets: for ``dataset``, or every dataset the rule failed in.

    ``ledger`` (dataset, stage, rule): the ledger a caller already holds, instead of reading it.
    """
    if ledger is None:
        ledger = pl.from_arrow(run.ledger().select(["dataset", "stage", "rule"]))
    everything = ledger.select("dataset", "stage", "rule")
    ledger = everything.filter(pl.col("stage") != "ingest")
    if (
        ledger.filter(pl.col("rule") == rule).is_empty()
        and not everything.filter(pl.col("rule") == rule).is_empty()
    ):
        raise ReviewError(
            f"rule {rule!r} is an ingest rule: those lines never became samples, so no "
            "decision can restore them; fix the annotation lines instead"
        )
    datasets = ledger.filter(pl.col("rule") == rule)["dataset"].unique().sort().to_list()
    if dataset is not None:
        if dataset not in datasets:
            rules = ledger.filter(pl.col("dataset") == dataset)["rule"].unique().sort()
            raise ReviewError(
                f"rule {rule!r} has no ledger rows for dataset {dataset!r}; its rules: "
                + (", ".join(rules.to_list()) or "(none)")
            )
        datasets = [dataset]
    elif not datasets:
        raise ReviewError(f"rule {rule!r} has no ledger rows in {run.path}")
    return [{"dataset": d, "rule": rule} for d in datasets]


@contextmanager
def locked(run: RunFolder, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the run lock, trying again for up to ``wait_s`` seconds while another process
    holds it (a CLI decision takes it for milliseconds); then RunLockedError naming it."""
    deadline = time.monotonic() + wait_s
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(run.lock())
                break
            except RunLockedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(LOCK_POLL_S)
        yield


@dataclass
class Recorded:
    """What ``record`` wrote: the rows, their timestamp (the key to undo them), and the status
    totals before and after (when asked for: they read every sample)."""

    rows: list[dict]
    decided_at: float
    before: dict[str, int] | None = None
    after: dict[str, int] | None = None


def record(
    run: RunFolder,
    targets: list[dict],
    decision: str,
    note: str = "",
    *,
    wait_s: float = 0.0,
    totals: bool = False,
) -> Recorded:
    """Write ``decision`` for every target (``sample_targets`` / ``rule_targets`` rows) under
    the run lock; ``totals``: also count keep / reject / flag before and after."""
    if decision not in DECISIONS:
        raise ReviewError(f"a decision is keep or reject, not {decision!r}")
    if not targets:
        raise ReviewError("nothing to decide on")
    rows = [{**t, "decision": decision, "note": note or None} for t in targets]
    before = after = None
    with locked(run, wait_s):
        if totals:
            before = status_totals(run)
        now = time.time()
        add_decisions(run, rows, now=now)
        if totals:
            after = status_totals(run)
    return Recorded(rows, now, before, after)


def withdraw(
    run: RunFolder,
    decided_at: float,
    *,
    sample_id: str | None = None,
    dataset: str | None = None,
    rule: str | None = None,
    wait_s: float = 0.0,
) -> int:
    """Undo one recorded decision (the key and timestamp ``record`` returned) under the lock;
    the key's earlier decision, if any, is in force again. Returns the rows removed."""
    with locked(run, wait_s):
        return withdraw_decision(run, decided_at, sample_id=sample_id, dataset=dataset, rule=rule)
